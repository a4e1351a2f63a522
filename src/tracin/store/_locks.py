"""Who may write a store: flocks on its directory and on each range writer's lock file.

A writer of the whole store holds an exclusive flock on the directory; range writers (rows=) hold a
shared one, so they run beside each other but never beside a writer of the whole store. Each range
writer also holds an exclusive flock on rows-<start>-<stop>.lock: one live writer per range. Where
the OS or the file system has no flock the locks are no-ops (the overlap check of ranges still runs).

A flock belongs to the open file description, which a forked child shares: a child forked while a
writer is open (a DataLoader worker, say) would keep the store locked after the parent closed its
writer. So the child closes its copies of every held lock's descriptor right after the fork (close
only: unlocking would release the parent's lock too); a writer it inherited refuses to write or
finalize there (the writer checks the process that opened it) and its close() touches no file.
The parent does not wait for that: a lock found taken is tried again for up to RETRY_S seconds
before the writer is refused, unless this process itself holds the conflicting lock.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from ._files import open_file, remove_if_present
from ._format import RANGE_FILE, range_file

try:
    import fcntl
except ImportError:  # no flock on this OS
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# A store's directory is opened with these: a FIFO or device put in its place fails at once instead
# of blocking the open (and so every fork, see _Forks) until another process opens its other end.
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0)

# How long a lock found taken is tried again before the writer is refused (when no lock of this
# process conflicts): a child forked just before its parent released the lock may not have closed
# its copy yet. The waits between tries grow from 1 ms to 50 ms.
RETRY_S = 2.0
# How long a fork waits for another thread's open or close of a lock's descriptor (microseconds, but
# see _Forks) before it goes on without it, and how long an open or close waits for a fork.
GUARD_WAIT_S = 5.0

# flock errors that mean "no locks on this file system" (some network file systems, e.g. exclusive locks
# on a directory over NFS): the store is then written unlocked, as where the OS has no flock.
_NO_LOCKS = {errno.ENOLCK, errno.EBADF, errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


class _Forks:
    """The locks of this process holding a descriptor (by descriptor), and the at-fork hooks that
    close the child's copies (one instance, module state on purpose: a fork is process-wide).

    `guard` is held while a descriptor is opened and registered, or unregistered and closed, and
    across each fork, so a child never inherits a lock's descriptor unregistered. The guarded code is
    a system call and a dict update, with no callout; the guard is reentrant, as a garbage collection
    or a signal handler run inside it may release another writer's lock. Either side may wait for
    the other: a thread holding a lock that another library's before-fork hook waits for (hooks run
    after the fork took the guard) may need the guard to close a writer's lock (a finalizer), or
    code run inside the guard may wait for a lock that such a hook took in the forking thread. So
    neither waits forever: a fork, an open or a close waits at most GUARD_WAIT_S seconds for the
    guard, then goes on without it; a child forked meanwhile may then keep the copy of the one
    descriptor being opened or closed. The parent never waits for the child. The child gets a fresh
    guard: a fork from C that skips the before-fork hook (an embedding server's workers) may have
    happened while another thread held it. One instance serves the process even if the module is
    reloaded (importlib.reload), so its hooks are registered once."""

    def __init__(self) -> None:
        self.held: dict[int, _Held] = {}
        self.guard = threading.RLock()

    def before(self) -> None:
        self.guard.acquire(timeout=GUARD_WAIT_S)

    def after_in_parent(self) -> None:
        try:
            self.guard.release()
        except RuntimeError:  # before() gave up waiting, or a fork from C skipped it: not held here
            pass

    def after_in_child(self) -> None:
        """Closes the child's copies of the held locks' descriptors (close only: unlocking would
        release the parent's locks too)."""
        self.guard = threading.RLock()
        held, self.held = self.held, {}
        for fd, lock in held.items():
            lock._fd = None
            try:
                os.close(fd)
            except OSError:
                pass


_FORKS: _Forks = globals().get("_FORKS") or _Forks()  # the locks open before a reload stay registered
if hasattr(os, "register_at_fork") and "_HOOKED" not in globals():
    os.register_at_fork(
        before=_FORKS.before, after_in_parent=_FORKS.after_in_parent, after_in_child=_FORKS.after_in_child
    )
    _HOOKED = True


class _Held:
    """At most one descriptor holding a flock, closed once by release() (idempotent) and never
    inherited by a forked child."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file, once flocked
        self._exclusive = False

    def _open(self, path: str | Path, flags: int) -> int:
        """os.open(path, flags), held (none may be held yet)."""
        path = os.fspath(path)  # no Python code runs while the guard is held
        guard = _FORKS.guard
        guarded = guard.acquire(timeout=GUARD_WAIT_S)
        try:
            fd = os.open(path, flags, 0o666)  # less the umask, as create_file
            self._fd = fd
            _FORKS.held[fd] = self
        finally:
            if guarded:
                guard.release()
        return fd

    def _flock(self, fd: int, exclusive: bool) -> bool:
        """Takes the flock on `fd`, the held descriptor; False if another holder keeps it for RETRY_S
        seconds, or at once if a lock of this process conflicts (it would not be released meanwhile)."""
        st = os.fstat(fd)
        file = (st.st_dev, st.st_ino)
        deadline, pause = time.monotonic() + RETRY_S, 0.001
        while not _try_flock(fd, exclusive):
            left = deadline - time.monotonic()
            if left <= 0 or _held_here(file, exclusive):
                return False
            time.sleep(min(pause, left))
            pause = min(2 * pause, 0.05)
        self._file, self._exclusive = file, exclusive
        return True

    def release(self) -> None:
        guard = _FORKS.guard
        guarded = guard.acquire(timeout=GUARD_WAIT_S)
        try:
            fd, self._file = self._fd, None
            if fd is not None:  # popped before _fd is cleared: a child forked before the pop closes its copy
                _FORKS.held.pop(fd, None)
                self._fd = None
                os.close(fd)  # closing the descriptor releases the flock
        finally:
            if guarded:
                guard.release()


def _held_here(file: tuple[int, int], exclusive: bool) -> bool:
    """Whether a lock of this process holds a flock on `file` that conflicts with one `exclusive` or not."""
    return any(h._file == file and (exclusive or h._exclusive) for h in list(_FORKS.held.values()))


def _try_flock(fd: int, exclusive: bool) -> bool:
    """Takes the flock without waiting; False if another holder has it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
    return True


class DirectoryLock(_Held):
    """A flock on a store directory: exclusive for a writer of the whole store, shared for a range
    writer. release() is idempotent: the descriptor is closed once, by whoever releases first."""

    def __init__(self, root: Path, shared: bool = False):
        super().__init__()
        if fcntl is None:
            return
        fd = self._open(root, _DIRECTORY)
        try:
            taken = self._flock(fd, exclusive=not shared)
        except BaseException:
            self.release()
            raise
        if taken:
            return
        self.release()
        if shared:
            raise RuntimeError(
                f"gradient store {root} is being written by a writer of the whole store (in this or "
                "another process); close it before opening range writers (rows=)"
            )
        raise RuntimeError(
            f"gradient store {root} is being written by another writer (in this or another "
            "process; a writer of the whole store or range writers); close that writer first"
        )


class RangeLock(_Held):
    """The claim of one range writer on rows [start, stop) of a store: an exclusive flock on
    rows-<start>-<stop>.lock (created if absent, never through a link), then a check that no other
    range writer's files name rows overlapping these. Two writers claiming overlapping ranges at
    once: each made its file before looking, so at least one sees the other and is refused.
    release() is idempotent."""

    def __init__(self, root: Path, start: int, stop: int):
        super().__init__()
        path = root / range_file(start, stop, "lock")
        created = self._take(path, start, stop)
        try:
            others = overlapping_ranges(root, start, stop)
            if others:
                if created:  # a refused claim leaves nothing that would block a correct range later
                    remove_if_present(path)
                whose = "another range writer" if len(others) == 1 else "other range writers"
                raise ValueError(
                    f"rows [{start}, {stop}) overlap rows {_text(others)} of {whose} of gradient store {root} "
                    f"(files {_names(others)}): range writers of one store need disjoint row ranges (or the same "
                    "range, to resume it); if no writer of those rows is running (one was killed, or finished "
                    "unmerged), open a writer of the whole store once (GradientStore.create with the same "
                    "arguments, without rows=): it merges their progress and removes those files"
                )
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, start: int, stop: int) -> bool:
        """Holds the flock on the lock file at `path`; whether this call created the file."""
        for _ in range(8):  # the file may be removed between our open and our flock: open it again
            try:
                fd = self._open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW)
                created = True
            except FileExistsError:
                try:
                    fd = open_file(path, writable=True, opener=self._open, closer=lambda _: self.release())
                    created = False
                except FileNotFoundError:
                    continue
            try:
                if not self._flock(fd, exclusive=True):
                    raise RuntimeError(
                        f"rows [{start}, {stop}) of gradient store {path.parent} are being written by "
                        "another range writer (in this or another process); close that writer first"
                    )
                if _same_file(fd, path):
                    return created
            except BaseException:
                self.release()
                raise
            self.release()
        raise OSError(errno.EAGAIN, "the lock file kept being replaced while it was taken", str(path))


def range_files(root: Path) -> list[tuple[str, int, int, str]]:
    """(name, start, stop, kind) of every range writer's file in `root`, kind "json", "json.tmp" or "lock"."""
    found = []
    for name in sorted(os.listdir(root)):
        m = RANGE_FILE.fullmatch(name)
        if m is not None:
            found.append((name, int(m[1]), int(m[2]), m[3]))
    return found


def overlapping_ranges(root: Path, start: int, stop: int) -> list[tuple[int, int]]:
    """Ranges other than [start, stop) that have files in `root` and overlap it."""
    return sorted({(a, b) for _, a, b, _ in range_files(root) if (a, b) != (start, stop) and a < stop and start < b})


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open at `fd` (it was not removed or replaced meanwhile)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# An overlap refusal names at most this many of the other ranges (a store may hold thousands of stale ones).
_NAMED = 20


def _text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges[:_NAMED]) + _more(ranges)


def _names(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(range_file(a, b, "*") for a, b in ranges[:_NAMED]) + _more(ranges)


def _more(ranges: list[tuple[int, int]]) -> str:
    return f", ... and {len(ranges) - _NAMED} more" if len(ranges) > _NAMED else ""
