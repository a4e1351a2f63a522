"""The count of stale range locks in the error of a store held by range writers leaves out a lock file
removed between the listing and the probe (the store finalized meanwhile): it is neither held nor
stale (r385 hand mutant E20: it was counted as a stale file)."""

from __future__ import annotations

import pytest

from tracin.distributed import _export
from tracin.store import _locks


@pytest.mark.skipif(_locks.fcntl is None, reason="no flocks here: every lock is taken as held")
def test_a_lock_file_gone_before_its_probe_is_not_counted(tmp_path, monkeypatch):
    (tmp_path / "rows-20-40.lock").write_bytes(b"")  # held by no process: stale
    listed = [("rows-0-20.lock", 0, 20, "lock"), ("rows-20-40.lock", 20, 40, "lock")]  # rows-0-20: gone since
    monkeypatch.setattr(_export, "range_files", lambda root: listed)
    assert _export._range_locks(tmp_path) == ([], 1)
