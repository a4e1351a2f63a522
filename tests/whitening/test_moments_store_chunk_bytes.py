"""Whitening.fit over a store opened with a small chunk_bytes: the rows of each block product are gathered
from the store's smaller pieces, so R (its bits, the fingerprint) is the same for any chunk_bytes and the fit
does not pay a d x d product and float64 sum per piece; R matches float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening


def _store(path, blocks, dtype):
    w = tracin.GradientStore.create(path, n_rows=len(blocks[0]), dims=[b.shape[1] for b in blocks], dtype=dtype)
    for c, b in enumerate(blocks):
        w.write(c, 0, b)
    w.finalize()
    return path


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_r_is_the_same_bits_for_any_chunk_bytes_and_matches_float64(tmp_path, dtype):
    rng = np.random.default_rng(5)
    blocks = [(rng.standard_normal((700, k)) * np.geomspace(3, 0.01, k)).astype(dtype) for k in (96, 40)]
    path = _store(tmp_path / "train", blocks, dtype)
    whole = Whitening.fit(tracin.GradientStore.open(path))
    row_bytes = (96 + 40) * np.dtype(dtype).itemsize
    for rows in (1, 7, 64):
        store = tracin.GradientStore.open(path, chunk_bytes=rows * row_bytes)
        assert store.row_chunks() == rows
        w = Whitening.fit(store)
        assert w.spec.fingerprint == whole.spec.fingerprint
        for got, want in zip(w._moments, whole._moments, strict=True):
            assert np.array_equal(got, want)
    for got, g in zip(whole._moments, blocks, strict=True):
        g64 = g.astype(np.float64)
        exact = g64.T @ g64 / len(g64)
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
