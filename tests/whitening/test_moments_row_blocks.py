"""How whitening reads rows (whitening._moments): at most BLOCK_BYTES of float32 rows of the widest block per
read, 4 bytes a value (mutant M2: one byte a value, four times the rows and memory), and a block with an all-zero
column (a dead unit) takes the plain float32 product, not the rescaled one meant for tiny non-zero columns (mutant
M3: every such block multiplied twice); R matches float64 NumPy either way."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening, _moments


def test_reads_hold_at_most_block_bytes_of_float32_rows_of_the_widest_block(monkeypatch):
    rng = np.random.default_rng(2)
    blocks = [rng.standard_normal((100, k)).astype(np.float32) for k in (50, 20)]
    train = tracin.Gradients(blocks)
    monkeypatch.setattr(_moments, "BLOCK_BYTES", 8 * 4 * 50)  # eight float32 rows of the 50-wide block
    reads = []
    original = train.kernel_side

    def spy(start=0, stop=None):
        reads.append((start, stop))
        return original(start, stop)

    monkeypatch.setattr(train, "kernel_side", spy)
    w = Whitening.fit(train, precision="float64")
    # hand-worked: 1600 bytes / (4 bytes x 50 columns) = 8 rows a read
    assert reads == [(a, min(a + 8, 100)) for a in range(0, 100, 8)]
    for got, g in zip(w._moments, blocks, strict=True):
        g64 = np.asarray(g, dtype=np.float64)
        np.testing.assert_allclose(got, g64.T @ g64 / 100, rtol=1e-12, atol=1e-15)


def test_an_all_zero_column_takes_the_plain_float32_product(monkeypatch):
    rng = np.random.default_rng(8)
    g = rng.standard_normal((60, 7)).astype(np.float32)
    g[:, 3] = 0.0  # a unit no example moves
    monkeypatch.setattr(_moments, "scaled_gram", lambda x: pytest.fail("scaled_gram called for an all-zero column"))
    w = Whitening.fit(tracin.Gradients([g]))
    exact = g.astype(np.float64).T @ g.astype(np.float64) / 60
    np.testing.assert_allclose(w._moments[0], exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    assert np.all(w._moments[0][3] == 0.0) and np.all(w._moments[0][:, 3] == 0.0)
