"""aggregate's warning of shards= above the test store's row chunks counts a last, shorter chunk
(r385 hand mutant M18: the count rounded down). 15 rows in chunks of up to 7 rows are 3 chunks
([0, 7), [7, 14), [14, 15)): shards=3 runs 3 shards, no warning; shards=4 is told of 3 chunks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
from tracin.distributed._api import _warn_chunks


def _store(path, rows: int) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(path, rows, [4], [1.0])
    writer.write(0, 0, np.arange(rows * 4, dtype=np.float32).reshape(rows, 4))
    writer.finalize()
    return tracin.GradientStore.open(path, chunk_bytes=7 * 4 * 4)


def test_a_last_short_chunk_counts(tmp_path):
    store = _store(tmp_path / "s", 15)
    assert store.row_chunks() == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_chunks(store, 3)
    with pytest.warns(UserWarning, match=r"shards=4, but the test store .* has 3 row chunk\(s\) \(up to 7 rows each\)"):
        _warn_chunks(store, 4)
