"""NaN or Inf in the in-memory side is the error tracin's own functions raise, on the client, before
anything is sent (review141 F2: every task raised it, and the error named a shard of the other side)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tracin
import tracin.distributed as td
from tracin import gradients
from tracin.distributed._run import Job


@pytest.fixture(scope="module")
def bad_side(tied: dict) -> tracin.Gradients:
    """12 rows of the tied store's widths and weights: Inf in row 10 of checkpoint 0, NaN in seven rows of
    checkpoint 1 (the error names checkpoint 0's row, the first block holding any)."""
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((12, d)).astype(np.float32) for d in (6, 3)]
    blocks[0][10, 2] = np.inf
    blocks[1][[2, 4, 6, 7, 8, 9, 11], 1] = np.nan
    return tracin.Gradients(blocks, [0.5, 2.0])


@pytest.mark.parametrize(
    "distributed, local",
    [
        (lambda b, s, kw: td.top_k(b, s, 3, **kw), lambda b, s: tracin.top_k(b, s, 3)),
        (lambda b, s, kw: td.top_k(b, s, 3, side="both", **kw), lambda b, s: tracin.top_k(b, s, 3, side="both")),
        (lambda b, s, kw: td.aggregate(b, s, **kw), lambda b, s: tracin.aggregate(b, s)),
        (lambda b, s, kw: td.top_k(s, b, 3, **kw), lambda b, s: tracin.top_k(s, b, 3)),
        (lambda b, s, kw: td.aggregate(s, b, **kw), lambda b, s: tracin.aggregate(s, b)),
    ],
    ids=["top_k test in memory", "top_k both", "aggregate test in memory", "top_k train in memory", "aggregate train"],
)
def test_non_finite_in_memory_side_is_one_process_error_before_any_task(
    client, tied, bad_side, monkeypatch, distributed, local
):
    submitted = []
    monkeypatch.setattr(Job, "submit", lambda self, fn, *a, **kw: submitted.append(fn))
    with pytest.raises(ValueError) as want:
        local(bad_side, tied["store"])
    with pytest.raises(ValueError) as got:
        distributed(bad_side, tied["store"], {"client": client, "shards": 4, "progress": False})
    assert str(got.value) == str(want.value)
    assert str(got.value).endswith(" checkpoint 0 contains NaN or Inf values, first in rows [10]")
    assert submitted == []


def test_first_five_non_finite_rows_of_the_first_block_are_named(client, tied, monkeypatch):
    """The block holding them is checkpoint 1's, also checked on the client before any task (review332)."""
    rng = np.random.default_rng(4)
    blocks = [rng.standard_normal((9, d)).astype(np.float16) for d in (6, 3)]
    blocks[1][[1, 3, 4, 5, 7, 8], 0] = np.nan
    test = tracin.Gradients(blocks, [0.5, 2.0])
    submitted = []
    monkeypatch.setattr(Job, "submit", lambda self, fn, *a, **kw: submitted.append(fn))
    with pytest.raises(ValueError) as got:
        td.top_k(test, tied["store"], 3, client=client, shards=4, progress=False)
    assert str(got.value) == "test checkpoint 1 contains NaN or Inf values, first in rows [1, 3, 4, 5, 7]"
    assert submitted == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rows_read_in_pieces_are_named_as_one_read_would(monkeypatch, client, tied, dtype):
    """The side is read a few rows at a time (FINITE_CHECK_BYTES): rows found across pieces, every dtype,
    bfloat16 NaN payloads and its largest finite values, against a float64 reference of the values."""
    monkeypatch.setattr(gradients, "FINITE_CHECK_BYTES", 3 * 4 * 6)  # 3 rows of checkpoint 0 at a time
    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal((40, d)).astype(np.float32) for d in (6, 3)]
    blocks[1][[4, 17, 18, 29, 33, 38], [0, 2, 1, 0, 2, 1]] = [np.nan, np.inf, -np.inf, np.nan, np.inf, np.nan]
    blocks = [b.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype) for b in blocks]
    if dtype == "bfloat16":
        bits = blocks[1].view(np.uint16)
        bits[4, 0], bits[29, 0], bits[5, 1], bits[6, 2] = 0x7F81, 0xFFC1, 0x7F7F, 0xFF7F  # NaNs; +-largest finite
    with np.errstate(invalid="ignore"):  # the signalling NaN 0x7F81, cast
        reference = np.flatnonzero(~np.isfinite(blocks[1].astype(np.float64)).all(axis=1))[:5].tolist()
    assert reference == [4, 17, 18, 29, 33]
    with pytest.raises(ValueError) as got:
        td.top_k(tracin.Gradients(blocks, [0.5, 2.0]), tied["store"], 3, client=client, shards=4, progress=False)
    assert str(got.value) == f"test checkpoint 1 contains NaN or Inf values, first in rows {reference}"


class _Failed:
    """A failed task's future as Job._raise reads it."""

    def __init__(self, error: BaseException):
        self.error = error

    def result(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    "cut, named, sentence", [("train", "test", False), ("test", "train", False), ("train", "train", True)]
)
def test_shard_sentence_only_for_rows_of_the_side_cut(cut, named, sentence):
    """A shard's NaN/Inf error naming rows of the side sent whole is raised as it is: those rows are no shard's."""
    job = Job(None, "top_k (proponents)")
    job.shards = {(cut, 0, 75), (cut, 75, 150)}
    message = f"{named} checkpoint 1 contains NaN or Inf values, first in rows [2]"
    error = ValueError(message)
    error.tracin_shard = (cut, 75, 150)
    with pytest.raises(ValueError) as got:
        job._raise(_Failed(error))
    if sentence:
        assert str(got.value) == (
            f"{message}. These rows are from the shard of {cut} rows 75 to 149, the first shard to fail; other "
            "shards may hold more such rows (tracin.top_k in one process names the first ones)"
        )
    else:
        assert str(got.value) == message
