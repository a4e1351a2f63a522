"""Projection.apply_store refuses segments= where no layout applies (a factored store, a whole-row projection)
instead of ignoring it, and makes no store there; the same call without it projects as apply / apply_factored."""

from __future__ import annotations

import numpy as np
import pytest

import tracin


def _store(path, rows):
    factored = isinstance(rows, tuple)
    dims = [(rows[0].shape[1], rows[1].shape[1])] if factored else [rows.shape[1]]
    n = (rows[0] if factored else rows).shape[0]
    writer = tracin.GradientStore.create(path, n, dims, factored=factored)
    writer.write(0, 0, rows)
    writer.finalize()
    return tracin.GradientStore.open(path)


def test_a_factored_store_refuses_segments(tmp_path):
    rng = np.random.default_rng(0)
    pair = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    source = _store(tmp_path / "src", pair)
    proj = tracin.Projection(4, seed=1)
    with pytest.raises(ValueError, match=r"^segments applies to full rows; a factored store's rows are projected by"):
        proj.apply_store(source, tmp_path / "out", segments=[4, 6])
    assert not (tmp_path / "out").exists()
    out = proj.apply_store(source, tmp_path / "out")
    left, right = proj.apply_factored(*pair)
    assert np.array_equal(out.kernel_side().blocks[0], left) and np.array_equal(out.kernel_side().blocks[1], right)


def test_a_whole_row_projection_refuses_segments(tmp_path):
    rows = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)
    source = _store(tmp_path / "src", rows)
    proj = tracin.Projection(4, seed=2)
    with pytest.raises(ValueError, match=r"^segments applies with per_layer=True only"):
        proj.apply_store(source, tmp_path / "out", segments=[4, 6])
    assert not (tmp_path / "out").exists()
    assert np.array_equal(proj.apply_store(source, tmp_path / "out").kernel_side().blocks[0], proj.apply(rows))
