"""A shard of one row that fails on NaN/Inf rows is named as that row ("train row 2"), not as a range
whose last row comes before its first ("rows 2 to 1")."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
import tracin.distributed as td
from tracin.distributed._run import Job

from .conftest import write_store


class _Failed:
    """A failed task's future as Job._raise reads it."""

    def __init__(self, error: BaseException):
        self.error = error

    def result(self) -> None:
        raise self.error


def test_a_one_row_shards_error_names_its_row(client, tmp_path):
    """Four train shards of one row each; only row 2 holds a NaN, so its shard is the one to fail."""
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows[2, 1] = np.nan
    store = write_store(tmp_path / "nan", [rows], None)
    small = tracin.Gradients(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError) as got:
        td.top_k(small, store, 2, client=client, shards=4, progress=False)
    assert str(got.value) == (
        "train checkpoint 0 contains NaN or Inf values, first in rows [2]. These rows are from the shard of "
        "train row 2, the first shard to fail; other shards may hold more such rows (tracin.top_k in one "
        "process names the first ones)"
    )


@pytest.mark.parametrize("stop, named", [(76, "test row 75"), (77, "test rows 75 to 76")])
def test_the_shard_sentence_names_one_row_or_a_range(stop, named):
    job = Job(None, "aggregate")
    job.shards = {("test", 0, 75), ("test", 75, stop)}
    error = ValueError("test checkpoint 0 contains NaN or Inf values, first in rows [75]")
    error.tracin_shard = ("test", 75, stop)
    with pytest.raises(ValueError) as got:
        job._raise(_Failed(error))
    assert str(got.value) == (
        f"test checkpoint 0 contains NaN or Inf values, first in rows [75]. These rows are from the shard of "
        f"{named}, the first shard to fail; other shards may hold more such rows (tracin.aggregate in one "
        "process names the first ones)"
    )
