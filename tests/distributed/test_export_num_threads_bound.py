"""tracin.distributed.export_gradients' num_threads bound (r385 hand mutant E1): above tracin's
MAX_THREADS (4096) it is a ValueError naming num_threads and the bound, raised before the client is
looked at (a bad client here would be the next error), the data read or the store created."""

from __future__ import annotations

import pytest

import tracin.distributed as td
from tracin._validate import MAX_THREADS


def test_num_threads_above_the_bound_is_refused_first(tmp_path):
    assert MAX_THREADS == 4096
    with pytest.raises(ValueError, match=r"num_threads must be a positive integer no larger than 4096, got 4097"):
        td.export_gradients("torch", None, [], None, None, store=tmp_path / "s", num_threads=4097, client="x")
    assert not (tmp_path / "s").exists()


def test_num_threads_at_the_bound_passes_to_the_next_check(tmp_path):
    with pytest.raises(TypeError, match="client must be a distributed.Client or None"):
        td.export_gradients("torch", None, [], None, None, store=tmp_path / "s", num_threads=4096, client="x")
    assert not (tmp_path / "s").exists()
