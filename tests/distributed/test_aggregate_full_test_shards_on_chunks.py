"""Full gradients, the test store cut: aggregate's chain of column-sum tasks starts its shards on the
store's row chunks, as its warning says ("2 shard(s) run" for shards=5 over 2 chunks of 7 rows), and
sums as float64 NumPy does (r385 hand mutant M23: shards cut by rows alone ran 5 tasks, not the 2 told)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
import tracin.distributed as td
from tracin.distributed import _api

from .conftest import write_store


def test_test_shards_follow_the_row_chunks_as_warned(client, tmp_path, monkeypatch):
    rng = np.random.default_rng(21)
    test = rng.integers(-3, 4, (14, 4)).astype(np.float32)
    train = rng.integers(-3, 4, (5, 4)).astype(np.float32)
    store = write_store(tmp_path / "test", [test], [0.5], chunk_bytes=7 * 4 * 4)
    assert store.row_chunks() == 7
    cuts: list = []

    def recorded(*args):
        ranges = list(_api.shard_ranges.__wrapped__(*args))
        cuts.append(ranges)
        return ranges

    recorded.__wrapped__ = _api.shard_ranges
    monkeypatch.setattr(_api, "shard_ranges", recorded)
    with pytest.warns(UserWarning, match=r"shards=5, but the test store .* 2 row chunk\(s\) .* 2 shard\(s\) run"):
        got = td.aggregate(store, tracin.Gradients([train], [0.5]), shards=5, client=client, progress=False)
    assert cuts == [[(0, 7), (7, 14)]]
    exact = 0.5 * (test.astype(np.float64) @ train.astype(np.float64).T).sum(0)
    np.testing.assert_array_equal(got, exact.astype(np.float32))  # small integers: exact in float32
