"""Whitening.fit over a store of many blocks (K-FAC factors of many checkpoints) opened with a small chunk_bytes:
each piece of rows is read once per block product, not once per kernel block (each read maps, or for a store of
many files reads, every block's rows: a 40-checkpoint factored store at chunk_bytes=1 MiB fitted in 43 s, not
1 s); R matches float64 NumPy and is the same bits as with the default chunk_bytes."""

from __future__ import annotations

import numpy as np

import tracin
from tracin.whitening import Whitening


def test_factored_store_reads_each_piece_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    n, dims = 300, [(5, 3), (4, 6), (2, 7), (6, 2), (3, 3), (7, 4)]
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=n, dims=dims, factored=True)
    factors = []
    for c, (p, q) in enumerate(dims):
        left = (rng.standard_normal((n, p)) * rng.uniform(0.1, 3, p)).astype(np.float32)
        right = (rng.standard_normal((n, q)) * rng.uniform(0.1, 3, q)).astype(np.float32)
        w.write(c, 0, (left, right))
        factors += [left, right]
    w.finalize()
    whole = Whitening.fit(tracin.GradientStore.open(tmp_path / "s"), progress=False)

    store = tracin.GradientStore.open(
        tmp_path / "s", chunk_bytes=10 * tracin.GradientStore.open(tmp_path / "s").row_bytes
    )
    assert store.row_chunks() == 10
    calls = []
    read = tracin.GradientStore.kernel_side

    def counted(self, start=0, stop=None):
        calls.append((start, stop))
        return read(self, start, stop)

    monkeypatch.setattr(tracin.GradientStore, "kernel_side", counted)
    fitted = Whitening.fit(store, progress=False)
    monkeypatch.undo()
    pieces = [(a, a + 10) for a in range(0, n, 10)]
    assert [c for c in calls if c[1] != c[0]] == pieces  # each piece once (12 blocks: 12 times each before)
    assert fitted.spec.fingerprint == whole.spec.fingerprint
    for got, want, f in zip(fitted._moments, whole._moments, factors, strict=True):
        assert np.array_equal(got, want)
        f64 = f.astype(np.float64)
        exact = f64.T @ f64 / n
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_blocks_gathered_in_groups_of_at_most_block_bytes(tmp_path, monkeypatch):
    from tracin.whitening import _moments

    rng = np.random.default_rng(12)
    n, dims = 300, [5, 3, 4, 6, 2, 7, 6, 2, 3, 3, 7, 4]
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=n, dims=dims)
    blocks = [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
    for c, g in enumerate(blocks):
        w.write(c, 0, g)
    w.finalize()
    monkeypatch.setattr(_moments, "BLOCK_BYTES", 4 * n * 12)  # buffers of 12 columns of 300 rows at once
    groups = _moments._groups(dims, n)
    assert [b for g in groups for b in g] == list(range(len(dims)))
    assert all(4 * n * sum(dims[b] for b in g) <= _moments.BLOCK_BYTES for g in groups) and len(groups) > 1
    store = tracin.GradientStore.open(tmp_path / "s", chunk_bytes=10 * 4 * sum(dims))
    calls = []
    read = tracin.GradientStore.kernel_side
    monkeypatch.setattr(
        tracin.GradientStore, "kernel_side", lambda self, a=0, b=None: calls.append((a, b)) or read(self, a, b)
    )
    fitted = Whitening.fit(store, progress=False)
    assert len([c for c in calls if c[1] != c[0]]) == 30 * len(groups)
    for got, g in zip(fitted._moments, blocks, strict=True):
        g64 = g.astype(np.float64)
        exact = g64.T @ g64 / n
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
