"""Factored aggregate cut on the test side: a test shard of several row chunks hands back one sum per
chunk, which the chain adds in row order after the shards before it, as tracin.aggregate adds its chunks
one after another; not the shard's chunks summed first (another rounding)."""

from __future__ import annotations

import numpy as np

import tracin
import tracin.distributed as td


def _factored_store(path, left: np.ndarray, right: np.ndarray, **open_kw) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(path, len(left), [(left.shape[1], right.shape[1])], None, factored=True)
    writer.write(0, 0, (left, right))
    writer.finalize()
    return tracin.GradientStore.open(path, **open_kw)


def test_a_later_shards_chunks_are_added_one_by_one_after_the_earlier_shards(client, tmp_path):
    """Test rows scoring 1e20, -1e20 and 1 against each train row of ones, in chunks of one row; two shards,
    rows [0, 1) and [1, 3). Added in row order: (1e20 - 1e20) + 1 = 1, the exact sum. Summing the second
    shard's chunks first gives -1e20 + 1 = -1e20 in float64, then 1e20 - 1e20 = 0."""
    left = np.array([[1e10], [-1e10], [1.0]], np.float32)
    right = np.array([[1e10], [1e10], [1.0]], np.float32)
    test = _factored_store(tmp_path / "test", left, right, chunk_bytes=8)  # one row (left 4 + right 4 bytes)
    assert test.row_chunks() == 1
    train = tracin.FactoredGradients(np.ones((2, 1), np.float32), np.ones((2, 1), np.float32))
    scores = (left.astype(np.float64) @ np.ones((1, 2))) * (right.astype(np.float64) @ np.ones((1, 2)))
    in_order = np.zeros(2)
    for row in scores:  # float64, row after row
        in_order = in_order + row
    np.testing.assert_array_equal(in_order, [1.0, 1.0])
    np.testing.assert_array_equal(td.aggregate(test, train, client=client, shards=2, progress=False), [1.0, 1.0])
    np.testing.assert_array_equal(tracin.aggregate(test, train), [1.0, 1.0])
