"""Locks of tracin.store._locks that conflict with one this process holds are refused at once (no other
process can release them meanwhile, so waiting RETRY_S would only delay the refusal), and only a writer of
the whole store (an exclusive directory lock) records itself in writer.info."""

from __future__ import annotations

import json
import os
import time

import pytest

from tracin.store import _locks

pytestmark = pytest.mark.skipif(_locks.fcntl is None, reason="no flocks here: every lock is taken as held")

SLOW_RETRY_S = 20.0  # a refusal that waited for it would show


@pytest.fixture
def slow_retry(monkeypatch):
    monkeypatch.setattr(_locks, "RETRY_S", SLOW_RETRY_S)


def _refused_in(seconds: float, make) -> RuntimeError:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        make()
    assert time.monotonic() - start < seconds, "refused only after waiting for a lock this process holds"
    return e.value


@pytest.mark.parametrize(("held_shared", "wanted_shared"), [(False, False), (False, True), (True, False)])
def test_a_directory_lock_conflicting_with_one_of_this_process_is_refused_at_once(
    tmp_path, slow_retry, held_shared, wanted_shared
):
    held = _locks.DirectoryLock(tmp_path, shared=held_shared)
    try:
        error = _refused_in(SLOW_RETRY_S / 4, lambda: _locks.DirectoryLock(tmp_path, shared=wanted_shared))
        assert f"gradient store {tmp_path} is being written by" in str(error)
    finally:
        held.release()
    _locks.DirectoryLock(tmp_path, shared=wanted_shared).release()  # free once released


def test_shared_directory_locks_of_this_process_coexist(tmp_path, slow_retry):
    first = _locks.DirectoryLock(tmp_path, shared=True)
    second = _locks.DirectoryLock(tmp_path, shared=True)
    first.release()
    second.release()


def test_a_range_lock_held_in_this_process_is_refused_at_once(tmp_path, slow_retry):
    held = _locks.RangeLock(tmp_path, 0, 10)
    try:
        error = _refused_in(SLOW_RETRY_S / 4, lambda: _locks.RangeLock(tmp_path, 0, 10))
        assert f"rows [0, 10) of gradient store {tmp_path} are being written by another range writer" in str(error)
        assert f"held by pid {os.getpid()} on host" in str(error)
    finally:
        held.release()


def test_only_an_exclusive_directory_lock_records_its_holder(tmp_path):
    shared = _locks.DirectoryLock(tmp_path, shared=True)
    shared.record()
    assert not (tmp_path / _locks.INFO_FILE).exists()
    shared.release()
    exclusive = _locks.DirectoryLock(tmp_path)
    exclusive.record()
    assert json.loads((tmp_path / _locks.INFO_FILE).read_bytes())["pid"] == os.getpid()
    exclusive.release()
    assert not (tmp_path / _locks.INFO_FILE).exists()


def test_a_range_lock_file_removed_between_its_open_and_its_flock_is_made_anew_and_held(tmp_path, monkeypatch):
    """A writer of the whole store removes rows-*.lock files as it merges: a range writer that opened the old
    file just before must not hold its flock on the removed file (a second writer of the same rows would then
    make a new file and take it too); it takes the lock file that the path names."""
    path = tmp_path / "rows-0-10.lock"
    path.write_bytes(b"")
    real_open, removed = _locks._Held._open, []

    def open_then_removed(self, name, flags):
        fd = real_open(self, name, flags)
        if not flags & os.O_CREAT and not removed:  # the existing file, opened: another process removes it
            removed.append(name)
            os.unlink(name)
        return fd

    monkeypatch.setattr(_locks._Held, "_open", open_then_removed)
    held = _locks.RangeLock(tmp_path, 0, 10)
    try:
        assert [os.fspath(name) for name in removed] == [os.fspath(path)]
        on_disk, mine = os.stat(path), os.fstat(held._fd)
        assert (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
        monkeypatch.setattr(_locks, "RETRY_S", 0.05)
        with pytest.raises(RuntimeError, match=r"rows \[0, 10\) .* are being written by another range writer"):
            _locks.RangeLock(tmp_path, 0, 10)
    finally:
        held.release()
