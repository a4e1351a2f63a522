"""A child forked while a writer is open (a DataLoader worker, say) does not keep the store locked:
the parent's lock holds while its writer is open, and closing the writer releases the store while
the child still lives. Also with another thread opening and closing writers during the forks."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
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
PARENT = os.getpid()


def _readable(fd: int, timeout: float) -> bool:
    """Whether `fd` is readable (or at end of file) within `timeout` seconds; poll, as select()
    takes no descriptor beyond FD_SETSIZE."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(timeout * 1000))


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
        status = os.read(status_r, 1) if _readable(status_r, 60) else b"hung"
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
    """Whether opening a writer of `path` is refused as another writer's store. In a child, where
    the lock is its parent's (another process), without trying again for long."""
    if os.getpid() != PARENT:
        locks.RETRY_S = 0.1
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


def _descriptors() -> int:
    return len(os.listdir("/dev/fd"))


def _store_and_pipe_descriptors(root: Path) -> list[str]:
    """Sorted targets of this process's descriptors that are files under `root` or pipes, what the
    store's locks and _forked open. Other descriptors may come and go beside the test, opened and
    closed by threads the earlier tests left running (in CI's pytest process one more appeared once
    during the forks, and once one was closed between listing /dev/fd and reading its link): those
    whose link cannot be read are such descriptors, closed meanwhile, and are left out."""
    targets = []
    for fd in os.listdir("/dev/fd"):
        try:
            target = os.readlink(f"/dev/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("pipe:", str(root))):
            targets.append(target)
    return sorted(targets)


def test_a_release_right_after_the_fork_is_tried_again_until_the_child_closed_its_copies(tmp_path, monkeypatch):
    """The child's hook closes its copies only once the parent's reopen was refused a first time:
    the parent's fork returned without waiting for the child, and the reopen tries again."""
    root = tmp_path / "s"
    w = tracin.GradientStore.create(root, **SPEC)
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    real_close, real_try = os.close, locks._try_flock
    waited, refused = [], []

    def close(fd: int) -> None:  # in the child only, the first close waits for the parent's refusal
        if os.getpid() != PARENT and not waited:
            waited.append(_readable(go_r, 60))
        real_close(fd)

    def try_flock(fd: int, exclusive: bool) -> bool:
        taken = real_try(fd, exclusive)
        if not taken and not refused:
            refused.append(os.write(go_w, b"x"))
        return taken

    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(locks, "_try_flock", try_flock)
    monkeypatch.setattr(locks, "RETRY_S", 60.0, raising=False)  # the child is slow only on a loaded machine
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        forked = time.monotonic() - start
        w.close()  # the child still has its copy of the lock's descriptor
        assert _finish(root)
        assert refused, "the reopen was never refused: the child closed its copies before it"
        assert forked < 5, f"the parent's fork waited for the child's hook ({forked:.1f} s)"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child exited early"
    finally:
        os.write(done_w, b"x")
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        for fd in (go_r, go_w, done_r, done_w):
            real_close(fd)


def test_forks_with_descriptors_beyond_fd_setsize_leave_no_descriptor_and_raise_nothing(tmp_path, monkeypatch):
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1024 + _descriptors() + 100
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} open files, the hard limit is {hard}")
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    padding = []
    try:
        padding = [os.open(os.devnull, os.O_RDONLY) for _ in range(1024)]
        w = tracin.GradientStore.create(tmp_path / "s", **SPEC)  # its descriptors are beyond 1024
        before = _store_and_pipe_descriptors(tmp_path)
        assert any(target.startswith(str(tmp_path)) for target in before)  # the writer's lock
        for _ in range(3):
            with _forked(lambda: True):
                pass
        assert (_store_and_pipe_descriptors(tmp_path), unraisable) == (before, [])
        w.close()
        assert _finish(tmp_path / "s")
    finally:
        for fd in padding:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_lock_held_by_another_process_is_tried_again_before_the_unchanged_refusal(tmp_path, monkeypatch):
    root = tmp_path / "s"
    kept = []
    monkeypatch.setattr(locks, "RETRY_S", 0.3)
    with _forked(lambda: kept.append(tracin.GradientStore.create(root, **SPEC)) is None):  # the child's own writer
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="being written by another writer .*close that writer first"):
            tracin.GradientStore.create(root, **SPEC)
        assert time.monotonic() - start >= 0.3


def test_a_lock_held_by_this_process_is_refused_at_once(tmp_path, monkeypatch):
    root = tmp_path / "s"
    tracin.GradientStore.create(root, **SPEC).close()
    monkeypatch.setattr(locks, "RETRY_S", 60.0)
    start = time.monotonic()
    with tracin.GradientStore.create(root, **SPEC, rows=(0, 5)):
        for rows in [None, (0, 5)]:
            with pytest.raises(RuntimeError, match="close that writer first"):
                tracin.GradientStore.create(root, **SPEC, rows=rows)
    with tracin.GradientStore.create(root, **SPEC):
        with pytest.raises(RuntimeError, match="being written by a writer of the whole store"):
            tracin.GradientStore.create(root, **SPEC, rows=(5, 10))
    assert time.monotonic() - start < 30


def test_an_interrupt_while_a_lock_is_tried_again_leaves_no_descriptor(tmp_path, monkeypatch):
    root = tmp_path / "s"
    kept = []
    monkeypatch.setattr(locks, "RETRY_S", 60.0)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)  # the alarm acts as Ctrl-C
    try:
        with _forked(lambda: kept.append(tracin.GradientStore.create(root, **SPEC)) is None):
            before, registered = _store_and_pipe_descriptors(root), dict(locks._FORKS.held)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                tracin.GradientStore.create(root, **SPEC)
            assert (_store_and_pipe_descriptors(root), locks._FORKS.held) == (before, registered)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fork_goes_on_when_another_thread_keeps_the_guard(tmp_path, monkeypatch):
    """A thread inside the guard that waits for the forking thread (a finalizer run there that
    needs a lock another library's before-fork hook took) does not deadlock the fork: it waits for
    the guard at most GUARD_WAIT_S. The child still closes the copies of the registered locks."""
    monkeypatch.setattr(locks, "GUARD_WAIT_S", 0.2, raising=False)
    root = tmp_path / "s"
    w = tracin.GradientStore.create(root, **SPEC)
    held, forked = threading.Event(), threading.Event()

    def hold() -> None:
        with locks._FORKS.guard:
            held.set()
            forked.wait(10)  # the fork returns first, or this thread gives up

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10), "the thread did not take the guard"
        start = time.monotonic()
        with _forked(lambda: True):
            waited = time.monotonic() - start
            forked.set()
            thread.join()
            w.close()
            assert _finish(root)
        assert waited < 5, f"the fork waited {waited:.1f} s for the guard"
    finally:
        forked.set()
        thread.join()


def _run(script: str, *args: str, timeout: float = 60) -> str:
    """Runs `script` in a fresh interpreter, in a session of its own; its stdout, once it exited 0.
    A hang fails the test: past `timeout` the session (with any child the script forked) is killed."""
    command = [sys.executable, "-c", script, *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    assert p.returncode == 0, err
    return out


_C_FORK = """
import ctypes, os, signal, sys, threading
import numpy as np
import tracin
from tracin.store import _locks

def finish(path):
    w = tracin.GradientStore.create(path, n_rows=10, dims=[4])
    w.write(0, 0, np.ones((10, 4), np.float32))
    return w.finalize().complete

unraisable = []
sys.unraisablehook = unraisable.append
signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the child's alarm ends it if it hangs
w = tracin.GradientStore.create(sys.argv[1], n_rows=10, dims=[4])
status_r, status_w = os.pipe()
done_r, done_w = os.pipe()
held, go = threading.Event(), threading.Event()

def hold():
    with _locks._FORKS.guard:
        held.set()
        go.wait()

thread = threading.Thread(target=hold)
thread.start()
assert held.wait(10), "the thread did not take the guard"
libc = ctypes.PyDLL(None)
pid = libc.fork()
if pid == 0:
    code = 3
    try:
        libc.alarm(30)
        ctypes.pythonapi.PyOS_AfterFork_Child()
        code = 2 if unraisable else 0 if finish(sys.argv[2]) else 1
        os.write(status_w, bytes([code]))
        os.read(done_r, 1)
    finally:
        os._exit(code)
go.set()
thread.join()
os.close(status_w)
status = os.read(status_r, 1)
assert status == b"\\0", f"the child's hook raised (2), its writer failed (1) or it hung: {status!r}"
w.close()
assert finish(sys.argv[1]), "the parent's store stayed locked"  # the child closed its copy
os.write(done_w, b"x")
assert os.waitpid(pid, 0)[1] == 0
"""


def test_a_fork_from_c_that_skips_the_before_fork_hook_leaves_the_child_working_locks(tmp_path):
    """fork() called from C and then PyOS_AfterFork_Child() in the child, without the before-fork
    hook (an embedding server's workers), while another thread holds the guard: the child's hook
    raises nothing, the child can open writers, and the parent's writer releases the store. In a
    fresh interpreter: a C fork skips Python's own before-fork step too, so a child forked beside
    the threads pytest's earlier tests leave (JAX, torch, Dask) can hang on the runtime's locks."""
    _run(_C_FORK, str(tmp_path / "s"), str(tmp_path / "child"), timeout=60)


_RELOADED = """
import importlib, os, sys
import tracin
from tracin.store import _locks
w = tracin.GradientStore.create(sys.argv[1], n_rows=10, dims=[4])
forks = _locks._FORKS
importlib.reload(_locks)
assert _locks._FORKS is forks, "the reload replaced the registry of open locks"
w.close()
assert forks.held == {}, f"the closed writer's lock is still registered: {forks.held}"
fd = os.open(os.devnull, os.O_RDONLY)  # the number the lock's descriptor had
pid = os.fork()
if pid == 0:
    try:
        os.fstat(fd)
    except OSError:
        os._exit(1)
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0, "the child lost an unrelated descriptor at fork"
"""


def test_a_reload_of_the_locks_module_keeps_one_registry_and_one_set_of_fork_hooks(tmp_path):
    """importlib.reload while a writer is open: its close unregisters the lock, and no hook left by
    the module's first run closes the descriptor's number in a later child once it names another file."""
    _run(_RELOADED, str(tmp_path / "s"))


_LOCK_ORDER = """
import os, sys, threading, time
held_by_hook = threading.Lock()  # another library's lock, taken by its before-fork hook (as logging's)
os.register_at_fork(before=held_by_hook.acquire, after_in_parent=held_by_hook.release)
import tracin  # after that library: tracin's before-fork hook runs first and takes the guard
from tracin.store import _locks
_locks.GUARD_WAIT_S = 0.5
w = tracin.GradientStore.create(sys.argv[1], n_rows=10, dims=[4])
inside = threading.Event()

def close_while_holding_the_librarys_lock():
    with held_by_hook:
        inside.set()
        while _locks._FORKS.guard.acquire(blocking=False):  # until the fork holds the guard
            _locks._FORKS.guard.release()
            time.sleep(0.001)
        w.close()  # as a finalizer run while that library's lock is held

thread = threading.Thread(target=close_while_holding_the_librarys_lock)
thread.start()
inside.wait()
start = time.monotonic()
pid = os.fork()
if pid == 0:
    os._exit(0)
waited = time.monotonic() - start
os.waitpid(pid, 0)
thread.join()
tracin.GradientStore.create(sys.argv[1], n_rows=10, dims=[4]).close()  # the close released the store
print(waited)
"""


def test_a_close_waiting_for_the_guard_held_across_a_fork_does_not_deadlock_it(tmp_path):
    """A thread that holds a lock another library's before-fork hook waits for, and then closes a
    writer, while the fork holds the guard: the close waits for the guard at most GUARD_WAIT_S, then
    closes without it, so the hook and the fork go on."""
    waited = float(_run(_LOCK_ORDER, str(tmp_path / "s"), timeout=30))
    assert 0.5 <= waited < 5, f"the fork took {waited:.2f} s"


_FIFO = """
import os, sys
from tracin.store import _locks
try:
    _locks.DirectoryLock(sys.argv[1])
except NotADirectoryError:
    assert _locks._FORKS.held == {}
else:
    raise AssertionError("a FIFO was locked as a store's directory")
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_in_place_of_the_store_directory_is_refused_at_once(tmp_path):
    """Opening the directory to lock it does not block (holding the guard, so every fork waits) on
    a FIFO put in its place until some process opens the FIFO for writing."""
    os.mkfifo(tmp_path / "s")
    _run(_FIFO, str(tmp_path / "s"), timeout=30)


@contextmanager
def _child(work: Callable[[], str]) -> Iterator[Callable[[], str]]:
    """Forks a child (the writers open now are inherited) that waits for the parent's go, then runs
    work() and sends back what it returned, or what it raised as 'Type: text'. Yields go(): it lets
    the child run and returns what the child sent (once the child exited)."""
    out_r, out_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(out_r)
            os.close(go_w)
            os.read(go_r, 1)
            try:
                sent = work()
            except BaseException as e:
                sent = f"{type(e).__name__}: {e}"
            os.write(out_w, sent.encode())
        finally:
            os._exit(0)
    os.close(out_w)
    os.close(go_r)
    done = False

    def go() -> str:
        nonlocal done
        os.write(go_w, b"g")
        chunks = []
        while _readable(out_r, 60) and (chunk := os.read(out_r, 1 << 16)):
            chunks.append(chunk)
        os.waitpid(pid, 0)
        done = True
        return b"".join(chunks).decode()

    try:
        yield go
    finally:
        os.close(go_w)
        os.close(out_r)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _tried(*calls: Callable[[], object]) -> str:
    """Each call's outcome on a line: 'accepted', or what it raised as 'Type: text'."""
    lines = []
    for call in calls:
        try:
            call()
            lines.append("accepted")
        except Exception as e:
            lines.append(f"{type(e).__name__}: {e}")
    return "\n".join(lines)


def _refused_for_fork(outcome: str) -> bool:
    return outcome.startswith("RuntimeError: this writer of gradient store ") and (
        f"was opened by process {os.getpid()} before a fork" in outcome and "open a writer in the child" in outcome
    )


def test_a_writer_inherited_by_a_forked_child_refuses_to_write_and_its_close_touches_nothing(tmp_path):
    """write() and finalize() through the parent's writer in a forked child are refused naming the parent
    (the child holds no lock); close() there writes nothing and leaves the parent's lock taken; the parent
    writes on and finalizes (review117 F2)."""
    root = tmp_path / "s"
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    w = tracin.GradientStore.create(root, **SPEC)
    w.write(0, 0, rows[:5])
    files = {p.name: p.read_bytes() for p in root.iterdir()}

    def child() -> str:
        outcome = _tried(lambda: w.write(0, 5, -rows[5:]), w.finalize, lambda: w.write(0, 0, -rows[:5]))
        w.close()
        return f"{outcome}\nrefused={_refused(root)}"  # closing the child's copy released nothing

    with _child(child) as go:
        *outcomes, still_locked = go().split("\n")
    assert len(outcomes) == 3 and all(_refused_for_fork(o) for o in outcomes), outcomes
    assert still_locked == "refused=True"
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files
    assert _refused(root)  # the parent's writer holds the store and writes on
    w.write(0, 5, rows[5:])
    np.testing.assert_array_equal(np.load(w.finalize().path / "checkpoint_000.npy"), rows)


def test_a_writer_inherited_by_a_child_cannot_reopen_a_store_another_writer_finished(tmp_path):
    """review117 fork_inherited_writer.py: the parent closes its writer, a new one finishes the store, then
    the child writes through its copy of the first: refused, and the finished store is unchanged (before,
    its manifest went back to unfinished, the rows of the second writer unrecorded)."""
    root = tmp_path / "s"
    spec = {"n_rows": 20, "dims": [4]}
    w = tracin.GradientStore.create(root, **spec)
    w.write(0, 0, np.ones((10, 4), np.float32))
    with _child(lambda: _tried(lambda: w.write(0, 0, np.full((10, 4), 7, np.float32)), w.close)) as go:
        w.close()
        w2 = tracin.GradientStore.create(root, **spec)
        w2.write(0, 10, np.full((10, 4), 2, np.float32))
        w2.finalize()
        files = {p.name: p.read_bytes() for p in root.iterdir()}
        write, close = go().split("\n")
    assert _refused_for_fork(write) and close == "accepted"
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files
    store = tracin.GradientStore.open(root)
    assert store.complete
    expected = np.concatenate([np.ones((10, 4)), np.full((10, 4), 2.0)])
    np.testing.assert_array_equal(np.load(root / "checkpoint_000.npy"), expected)


def test_a_range_writer_inherited_by_a_forked_child_refuses_to_write_and_records_nothing(tmp_path):
    """The same for a range writer: the child's write() and finalize() are refused, its progress file
    and data are not rewritten, and the parent writes on."""
    root = tmp_path / "s"
    tracin.GradientStore.create(root, **SPEC).close()
    w = tracin.GradientStore.create(root, **SPEC, rows=(0, 5))
    w.write(0, 0, np.ones((2, 4), np.float32))
    files = {p.name: p.read_bytes() for p in root.iterdir()}
    with _child(lambda: _tried(lambda: w.write(0, 2, np.full((3, 4), 7, np.float32)), w.finalize, w.close)) as go:
        write, finalize, close = go().split("\n")
    assert _refused_for_fork(write) and _refused_for_fork(finalize) and close == "accepted"
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files
    w.write(0, 2, np.ones((3, 4), np.float32))
    w.close()
    np.testing.assert_array_equal(np.load(_finish_whole(root).path / "checkpoint_000.npy")[:5], np.ones((5, 4)))


def _fork_inside_recording(w, progress: Path) -> int:
    """Forks inside a recording_once block of `w` holding a written row; the child leaves the block, then
    exits 0 if `progress` is unchanged (1 if changed, 2 if leaving raised). The parent waits for the child
    before it leaves the block itself; returns the child's exit status."""
    pid = -1
    try:
        with w.recording_once():
            w.write(0, 2, np.ones((1, 4), np.float32))
            before = progress.read_bytes()
            pid = os.fork()
            if pid:
                status = os.waitpid(pid, 0)[1]
    except BaseException:
        if pid == 0:
            os._exit(2)
        raise
    if pid == 0:
        os._exit(0 if progress.read_bytes() == before else 1)
    return status


def test_a_child_forked_inside_a_recording_block_leaves_it_without_recording(tmp_path):
    """The rows pending in the block are the parent's: the child leaves the block quietly, recording
    nothing, and the parent records them on leaving."""
    root = tmp_path / "s"
    tracin.GradientStore.create(root, **SPEC).close()
    w = tracin.GradientStore.create(root, **SPEC, rows=(0, 5))
    w.write(0, 0, np.ones((2, 4), np.float32))
    assert _fork_inside_recording(w, root / "rows-0-5.json") == 0
    assert w.rows_done(0) == 3
    w.close()
    assert tracin.GradientStore.create(root, **SPEC, rows=(0, 5)).rows_done(0) == 3  # recorded on disk


def _finish_whole(root: Path) -> tracin.GradientStore:
    """The store at `root` finalized after a writer of the whole store wrote rows 5-10 as twos."""
    w = tracin.GradientStore.create(root, **SPEC)
    w.write(0, 5, np.full((5, 4), 2, np.float32))
    return w.finalize()


def _sum_of_squares(x: int) -> int:
    return x * x


def test_multiprocessing_fork_workers_that_leave_the_writer_alone_change_nothing(tmp_path):
    """A fork Pool started while a writer is open (as DataLoader workers): the workers run and exit, the
    parent writes and finalizes meanwhile, and the workers kept no lock (a new writer opens at once)."""
    import multiprocessing

    root = tmp_path / "s"
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    w = tracin.GradientStore.create(root, **SPEC)
    w.write(0, 0, rows[:5])
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_sum_of_squares, range(8)) == [x * x for x in range(8)]
        w.write(0, 5, rows[5:])
        np.testing.assert_array_equal(np.load(w.finalize().path / "checkpoint_000.npy"), rows)
        with tracin.GradientStore.create(root, **SPEC, overwrite=True) as again:  # the workers hold no lock
            assert again.missing(0) == [[0, 10]]


def test_an_inherited_writer_answers_in_a_child_forked_while_another_thread_recorded(tmp_path):
    """A child forked while another thread of the parent held the writer's record lock (recording its
    rows) gets a lock of its own: rows_done(), missing() and repr() of its copy answer, not hang."""
    w = tracin.GradientStore.create(tmp_path / "s", **SPEC)
    w.write(0, 0, np.ones((3, 4), np.float32))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with w._recording:  # as a thread inside _record when the fork comes
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(60)

        def answers() -> bool:
            signal.signal(signal.SIGALRM, lambda *_: os._exit(4))  # hung on the inherited lock
            signal.alarm(10)
            return w.rows_done(0) == 3 and w.missing(0) == [[3, 10]] and "rows_done=[3]" in repr(w)

        with _forked(answers):
            pass
    finally:
        release.set()
        thread.join()
    w.close()
