"""A store's data file rewritten in place at the same size (its store id unchanged): refused by the
client when it happened before the call, as tracin.top_k refuses it, and by each task when its worker
sees files other than those the client opened (rewritten since, or a per-machine copy that differs)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest

import tracin
import tracin.distributed as td
from tracin.distributed._run import Job
from tracin.distributed._shards import StoreRows, same_mtime
from tracin.store import StoreChangedError


def _copy(store: tracin.GradientStore, path) -> tracin.GradientStore:
    shutil.copytree(store.path, path)  # copy2: the files keep their modification times
    return tracin.GradientStore.open(path)


def _rewrite_in_place(path) -> None:
    """Every value of the .npy file at `path` negated, in place: same inode and size, a new mtime."""
    before = os.stat(path)
    data = np.load(path, mmap_mode="r+")
    data[:] = -data
    data.flush()
    del data
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9 + 1))  # newer, even on a coarse clock
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert after.st_mtime_ns != before.st_mtime_ns


def _on_a_worker(client, fn):
    """fn() run by a task; its future released even when it fails (the error's frames would keep it
    held on the session's cluster)."""
    future = client.submit(fn, pure=False)
    try:
        return future.result()
    finally:
        future.release()


def _local_error(call) -> str:
    with pytest.raises(StoreChangedError) as e:
        call()
    return str(e.value)


def test_a_same_size_rewrite_before_the_call_is_the_local_error(client, tied, tmp_path):
    """The old code scored the rewritten data silently (the client checked only the store id)."""
    store = _copy(tied["store"], tmp_path / "s")
    test_store = _copy(tied["store"], tmp_path / "t")[:9]
    rewritten = store.path / "checkpoint_001.npy"
    _rewrite_in_place(rewritten)
    _rewrite_in_place(test_store.path / "checkpoint_000.npy")
    local = _local_error(lambda: tracin.top_k(tied["test"], store, 3))
    assert f"{rewritten} was replaced or modified after the gradient store was opened" in local
    for call in (
        lambda: td.top_k(tied["test"], store, 3, client=client, shards=2),
        lambda: td.self_influence(store[100:], client=client, shards=3),
        lambda: td.aggregate(tied["test"], store, client=client, shards=2),
    ):
        with pytest.raises(StoreChangedError, match=re.escape(local)):
            call()
    local = _local_error(lambda: tracin.top_k(test_store, tied["test"], 3))
    with pytest.raises(StoreChangedError, match=re.escape(local)):  # the store on the test side
        td.top_k(test_store, tied["test"], 3, client=client, shards=2)


def test_a_rewrite_after_the_clients_check_is_refused_by_the_task_naming_the_file(client, tied, tmp_path):
    store = _copy(tied["store"], tmp_path / "s")
    job = Job(client, "test")
    rows = job.rows_of(store)  # checked on the client, its files recorded
    assert [name for name, _, _ in rows.files] == ["checkpoint_000.npy", "checkpoint_001.npy"]
    rewritten = store.path / "checkpoint_000.npy"
    recorded = rewritten.stat().st_mtime_ns
    _rewrite_in_place(rewritten)
    task = job.submit(rows.rows(10, 20).open, label="rows [10, 20)")  # the task opens the store by path there
    with pytest.raises(StoreChangedError) as e:
        job.wait([task], progress=False)
    message = str(e.value)
    assert (
        message.startswith(f"{rewritten} on worker tcp://127.0.0.1:") and "is not the file the client opened" in message
    )
    seconds = re.escape(f"{recorded % 10**9:09d} UTC on the client")
    assert re.search(rf"modified at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.{seconds}, at .* here\)", message)
    assert "bytes" not in message  # the same size: only the time differs
    assert "cp -p, rsync -a" in message


def test_a_workers_copy_of_another_size_is_refused(client, tied, tmp_path):
    """A per-machine copy keeping the store id but not the client's file: its size is named."""
    store = _copy(tied["store"], tmp_path / "s")
    rows = StoreRows.of(store)
    (name, size, mtime), second = rows.files
    other = replace(rows, files=((name, size + 8, mtime), second))
    with pytest.raises(StoreChangedError, match=rf"{size + 8} bytes on the client, {size} here\): .* open it again$"):
        _on_a_worker(client, other.open)
    np.testing.assert_array_equal(  # the rows as recorded: opened
        _on_a_worker(client, lambda: tracin.self_influence(rows.rows(0, 5).open(), progress=False)),
        tracin.self_influence(store[:5], progress=False),
    )


def test_a_copy_keeping_whole_seconds_only_is_accepted(client, tied, tmp_path):
    """A copy on a file system (or by a tool) that keeps the time to the second or microsecond only:
    the same file. A time a second off, or a nanosecond off at full resolution, is another file."""
    store = _copy(tied["store"], tmp_path / "s")
    data = store.path / "checkpoint_001.npy"
    os.utime(data, ns=(0, 1_700_000_000_123_456_789))
    store = tracin.GradientStore.open(store.path)
    rows = StoreRows.of(store)
    expected = tracin.self_influence(store, progress=False)
    for copied in (1_700_000_000_000_000_000, 1_700_000_000_123_456_000):
        os.utime(data, ns=(0, copied))
        found = _on_a_worker(client, lambda r=rows: tracin.self_influence(r.open(), progress=False))
        np.testing.assert_array_equal(found, expected)
    os.utime(data, ns=(0, 1_700_000_001_000_000_000))
    differs = r"modified at 2023-11-14 22:13:20.123456789 UTC on the client, at 2023-11-14 22:13:21.000000000 UTC here"
    with pytest.raises(StoreChangedError, match=rf"checkpoint_001.npy on worker \S+ is not the file .*\({differs}\)"):
        _on_a_worker(client, rows.open)
    assert same_mtime(1_700_000_000_123_456_789, 1_700_000_000_123_000_000)
    assert not same_mtime(1_700_000_000_123_456_789, 1_700_000_000_123_457_789)  # 1 us apart
    # a time copied through a float of seconds (os.utime with st_mtime, tarfile): a few hundred ns off
    kept = 1_700_000_000_123_456_789
    assert int(kept / 1e9 * 1e9) != kept and same_mtime(kept, int(kept / 1e9 * 1e9))
    assert not same_mtime(1_700_000_000_123_456_789, 1_700_000_001_000_000_000)
    assert not same_mtime(1_700_000_000_100_000_000, 1_700_000_000_200_000_000)
    assert not same_mtime(1_700_000_000_000_000_000, 1_700_000_001_100_000_000)


def test_an_unfinished_store_records_no_times(client, tmp_path):
    """A writer may still be writing an unfinished store: its files' times are not compared (as in one process)."""
    rng = np.random.default_rng(4)
    writer = tracin.GradientStore.create(tmp_path / "s", 40, [5], None)
    rows = rng.standard_normal((40, 5)).astype(np.float32)
    writer.write(0, 0, rows[:20])
    store = tracin.GradientStore.open(tmp_path / "s", allow_partial=True)
    assert StoreRows.of(store).files == ()
    exact = (rows[:20].astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(td.self_influence(store, client=client, shards=2, progress=False), exact, rtol=1e-6)
    writer.write(0, 20, rows[20:])  # written on while it is scored: later rows only
    np.testing.assert_allclose(td.self_influence(store, client=client, shards=2, progress=False), exact, rtol=1e-6)
    writer.close()
