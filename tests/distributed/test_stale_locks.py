"""A whole-store writer refused while range writers hold a store: the error names only the range
lock files a writer holds, and counts those no process holds (left by writers that ended or died)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tracin
from tracin.distributed._export import _range_writers_named
from tracin.store import _locks as locks

SPEC = {"n_rows": 60, "dims": [4], "weights": None}


def _refused(path: Path) -> str:
    """The error of a writer of the whole store opened at `path` as an export's client does."""
    with pytest.raises(RuntimeError) as raised, _range_writers_named(str(path)):
        tracin.GradientStore.create(path, **SPEC)
    return str(raised.value)


def _refused_while_the_directory_is_held(path: Path, stale: tuple[str, ...] = ()) -> str:
    """_refused for a new store at `path` holding the `stale` lock files (held by no process), its directory
    held shared as another export's client holds it, none of its range locks."""
    tracin.GradientStore.create(path, **SPEC).close()
    for name in stale:
        (path / name).touch()
    held = locks.DirectoryLock(path, shared=True)
    try:
        return _refused(path)
    finally:
        held.release()


@pytest.mark.parametrize("stale", [["rows-40-60.lock"], ["rows-0-20.lock", "rows-40-60.lock"]])
def test_only_held_range_locks_are_named_and_stale_ones_counted(tmp_path, stale):
    path = tmp_path / "store"
    tracin.GradientStore.create(path, **SPEC).close()
    writer = tracin.GradientStore.create(path, **SPEC, rows=(20, 40))  # holds rows-20-40.lock
    try:
        for name in stale:  # a killed writer's lock file: no process holds its flock
            (path / name).touch()
        message = _refused(path)
    finally:
        writer.close()
    assert "Range writers of this store (rows-20-40.lock) may be the tasks of an interrupted" in message
    assert not any(name in message for name in stale), message
    plural = (
        "2 other rows-*.lock files of this store, held by no process, were"
        if len(stale) == 2
        else ("1 other rows-*.lock file of this store, held by no process, was")
    )
    assert message.endswith(f"({plural} left by range writers that ended or died: not listed)"), message
    assert sorted(p.name for p in path.glob("rows-*.lock")) == sorted(["rows-20-40.lock", *stale])  # left as is


def test_no_held_range_lock_names_none_and_counts_the_stale_ones(tmp_path):
    """The store's directory held, none of its lock files: by another call's client while its tasks are queued
    (or a range writer between its locks), which the error names."""
    message = _refused_while_the_directory_is_held(tmp_path / "store", ("rows-0-20.lock",))
    assert "Range writers of this store" not in message, message
    assert ". It may be held by another tracin.distributed export of this store (its client holds it" in message
    assert "or by the tasks of an interrupted or failed tracin.distributed export" in message
    assert "rows-0-20.lock" not in message
    assert message.endswith(
        "(1 rows-*.lock file of this store, held by no process, was left by range writers "
        "that ended or died: not listed)"
    ), message


def test_without_range_lock_files_the_error_is_the_stores(tmp_path):
    message = _refused_while_the_directory_is_held(tmp_path / "store")
    assert "Range writers" not in message and "is being written by" in message


def test_another_exports_client_holding_the_store_is_named_without_lock_files(tmp_path):
    """Another export's client holds the store while its tasks are queued, no rows-*.lock file there yet (the
    usual case): the error names that export, not only 'close that writer first' (review327 F4)."""
    message = _refused_while_the_directory_is_held(tmp_path / "store")
    assert ". It may be held by another tracin.distributed export of this store (its client holds it" in message


def test_held_range_locks_may_be_a_running_export(tmp_path):
    """Range writers holding their locks may be a running export's tasks: waiting for it is advised beside
    client.restart(), which would stop them (review327 F4)."""
    path = tmp_path / "store"
    tracin.GradientStore.create(path, **SPEC).close()
    writer = tracin.GradientStore.create(path, **SPEC, rows=(20, 40))
    try:
        message = _refused(path)
    finally:
        writer.close()
    assert "another tracin.distributed export of this store still running, wait for that call to end" in message


def test_no_held_range_lock_does_not_advise_waiting_for_running_tasks(tmp_path):
    """Only held range locks may be a running export's tasks: with none held (stale ones only) the error does
    not tell of tasks still running."""
    message = _refused_while_the_directory_is_held(tmp_path / "store", ("rows-0-20.lock",))
    assert "still running, wait for that call to end instead" not in message, message
