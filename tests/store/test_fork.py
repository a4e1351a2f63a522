"""A child forked while a writer is open (a DataLoader worker, say) does not keep the store locked:
the parent's lock holds while its writer is open, and closing the writer releases the store while
the child still lives. Also with another thread opening and closing writers during the forks."""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest

import tracin
from tracin.store import _locks as locks

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork") or locks.fcntl is None, reason="needs fork and flock (POSIX)"),
    pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning"),  # forking beside a thread (3.12+)
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),  # JAX's, where an earlier test loaded it
]

SPEC = {"n_rows": 10, "dims": [4]}


@contextmanager
def _forked(check: Callable[[], bool]) -> Iterator[int]:
    """Forks a child that runs check() at once and then lives until the block ends; yields its pid
    once the child reported that check() returned True."""
    status_r, status_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3  # check() raised
        try:
            os.close(status_r)
            os.close(go_w)
            code = 0 if check() else 2
            os.write(status_w, bytes([code]))
            os.read(go_r, 1)  # returns when the parent closes its end
        finally:
            os._exit(code)
    os.close(status_w)
    os.close(go_r)
    status = b""
    try:
        ready, _, _ = select.select([status_r], [], [], 60)
        status = os.read(status_r, 1) if ready else b"hung"
        assert status == b"\0", f"the child's check failed (b'\\x02'), raised (b'') or hung: {status!r}"
        yield pid
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child exited early"
    finally:
        os.close(go_w)
        os.close(status_r)
        if status != b"\0":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _refused(path: Path, **kwargs) -> bool:
    """Whether opening a writer of `path` is refused as another writer's store."""
    try:
        tracin.GradientStore.create(path, **SPEC, **kwargs).close()
    except RuntimeError as e:
        return "close that writer first" in str(e)
    return False


def _finish(path: Path) -> bool:
    """Writes and finalizes the store at `path`; whether it came out complete."""
    w = tracin.GradientStore.create(path, **SPEC)
    w.write(0, 0, np.ones((10, 4), np.float32))
    return w.finalize().complete


def test_closing_the_writer_releases_the_store_while_a_forked_child_lives(tmp_path):
    root = tmp_path / "s"
    w = tracin.GradientStore.create(root, **SPEC)
    with _forked(lambda: _refused(root)):  # in the child the parent's writer still holds the store
        assert _refused(root)  # the fork released nothing in the parent
        w.write(0, 0, np.ones((10, 4), np.float32))
        w.close()
        assert _finish(root)


def test_closing_a_range_writer_releases_its_range_and_the_store_while_a_forked_child_lives(tmp_path):
    root = tmp_path / "s"
    tracin.GradientStore.create(root, **SPEC).close()
    w = tracin.GradientStore.create(root, **SPEC, rows=(0, 5))
    with _forked(lambda: _refused(root, rows=(0, 5)) and _refused(root)):
        assert _refused(root, rows=(0, 5)) and _refused(root)
        w.write(0, 0, np.ones((5, 4), np.float32))
        w.close()
        tracin.GradientStore.create(root, **SPEC, rows=(0, 5)).close()  # the range lock is free
        assert _finish(root)  # and the shared lock on the directory


def test_forks_beside_a_thread_opening_and_closing_writers_leave_no_lock_behind(tmp_path):
    root = tmp_path / "s"
    tracin.GradientStore.create(root, **SPEC).close()
    stop, errors = threading.Event(), []

    def churn() -> None:
        try:
            while not stop.is_set():
                for rows in [(0, 5), (5, 10), None]:
                    tracin.GradientStore.create(root, **SPEC, rows=rows).close()
        except Exception as e:  # a lock a child kept: reported below
            errors.append(e)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        with ExitStack() as children:
            for i in range(12):  # each child can write a store of its own: the hook left no lock taken
                children.enter_context(_forked(lambda i=i: _finish(tmp_path / f"child{i}")))
            stop.set()
            thread.join()
            assert errors == []
            assert _finish(root)
    finally:
        stop.set()
        thread.join()
