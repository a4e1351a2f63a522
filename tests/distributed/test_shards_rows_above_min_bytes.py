"""Default shards of rows each larger than MIN_SHARD_BYTES (full gradients of a large model, unprojected):
one row per shard, on a cluster whose size is known or not, never an empty shard nor an endless cut."""

from __future__ import annotations

import signal

import pytest

from tracin.distributed._shards import MAX_SHARD_BYTES, MIN_SHARD_BYTES, shard_ranges


@pytest.fixture
def bounded():
    """Fails a cut that runs longer than 5 s (an endless loop) instead of hanging the test run."""

    def stop(*_):
        raise TimeoutError("shard_ranges did not return within 5 s")

    before = signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("slots", [0, 1, 3])
@pytest.mark.parametrize("row_bytes", [MIN_SHARD_BYTES + 4, 2 * MIN_SHARD_BYTES, MAX_SHARD_BYTES + 4])
def test_rows_above_the_smallest_shard_get_one_row_each_without_workers(bounded, row_bytes, slots):
    ranges = shard_ranges(5, row_bytes, slots, None)
    assert ranges[0][0] == 0 and ranges[-1][1] == 5
    assert all(a < b for a, b in ranges) and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:], strict=False))
    if slots == 0 or row_bytes > MAX_SHARD_BYTES:  # no slots known, or one row above the largest shard
        assert ranges == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
