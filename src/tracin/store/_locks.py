"""Who may write a store: flocks on its directory and on each range writer's lock file.

A writer of the whole store holds an exclusive flock on the directory; range writers (rows=) hold a
shared one, so they run beside each other but never beside a writer of the whole store. Each range
writer also holds an exclusive flock on rows-<start>-<stop>.lock: one live writer per range. Where
the OS or the file system has no flock the locks are no-ops (the overlap check of ranges still runs).

A flock belongs to the open file description, which a forked child shares: a child forked while a
writer is open (a DataLoader worker, say) would keep the store locked after the parent closed its
writer. So the child closes its copies of every held lock's descriptor right after the fork (close
only: unlocking would release the parent's lock too); the child must not use a writer it inherited.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from ._files import open_file, remove_if_present
from ._format import RANGE_FILE, range_file

try:
    import fcntl
except ImportError:  # no flock on this OS
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# flock errors that mean "no locks on this file system" (some network file systems, e.g. exclusive locks
# on a directory over NFS): the store is then written unlocked, as where the OS has no flock.
_NO_LOCKS = {errno.ENOLCK, errno.EBADF, errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


class _Forks:
    """The locks of this process holding a descriptor, and the at-fork hooks that close the child's
    copies (one instance, module state on purpose: a fork is process-wide). `guard` is held while a
    descriptor is opened and registered, or closed and unregistered, and across each fork, so a child
    never inherits a lock's descriptor unregistered; reentrant, as a garbage collection inside the
    guarded code may release another writer's lock. While locks are held, the parent waits (at most
    CHILD_WAIT seconds) until the child has closed its copies, through a pipe whose write end the
    child closes last: the parent may release and retake a lock right after the fork."""

    CHILD_WAIT = 10.0

    def __init__(self) -> None:
        self.held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self.guard = threading.RLock()
        self._pipe: tuple[int, int] | None = None

    def before(self) -> None:
        self.guard.acquire()
        self._pipe = os.pipe() if self.held else None

    def after_in_parent(self) -> None:
        pipe, self._pipe = self._pipe, None
        try:
            if pipe is not None:
                os.close(pipe[1])
                select.select([pipe[0]], [], [], self.CHILD_WAIT)  # readable at EOF: the child closed its end
                os.close(pipe[0])
        finally:
            self.guard.release()

    def after_in_child(self) -> None:
        """Closes the child's copies of the held locks' descriptors (close only: unlocking would
        release the parent's locks too), then the pipe, which lets the parent go on."""
        pipe, self._pipe = self._pipe, None
        for lock in list(self.held):
            fd, lock._fd = lock._fd, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.held.clear()
        for fd in pipe or ():
            os.close(fd)
        self.guard.release()


_FORKS = _Forks()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_FORKS.before, after_in_parent=_FORKS.after_in_parent, after_in_child=_FORKS.after_in_child
    )


class _Held:
    """At most one descriptor holding a flock, closed once by release() (idempotent) and never
    inherited by a forked child."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def _open(self, opener: Callable[[], int]) -> int:
        """The descriptor opener() returns, held (none may be held yet)."""
        with _FORKS.guard:
            fd = opener()
            self._fd = fd
            _FORKS.held.add(self)
        return fd

    def release(self) -> None:
        with _FORKS.guard:
            fd, self._fd = self._fd, None
            _FORKS.held.discard(self)
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock


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
        fd = self._open(lambda: os.open(root, os.O_RDONLY))
        try:
            taken = _try_flock(fd, exclusive=not shared)
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
                names = ", ".join(range_file(a, b, "*") for a, b in others)
                whose = "another range writer" if len(others) == 1 else "other range writers"
                raise ValueError(
                    f"rows [{start}, {stop}) overlap rows {_text(others)} of {whose} of gradient store {root} "
                    f"(files {names}): range writers of one store need disjoint row ranges (or the same range, "
                    "to resume it)"
                )
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, start: int, stop: int) -> bool:
        """Holds the flock on the lock file at `path`; whether this call created the file."""
        for _ in range(8):  # the file may be removed between our open and our flock: open it again
            try:
                fd = self._open(lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
                created = True
            except FileExistsError:
                try:
                    fd, created = self._open(lambda: open_file(path, writable=True)), False
                except FileNotFoundError:
                    continue
            try:
                if not _try_flock(fd, exclusive=True):
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


def _text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)
