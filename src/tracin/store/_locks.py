"""Who may write a store: flocks on its directory and on each range writer's lock file.

A writer of the whole store holds an exclusive flock on the directory; range writers (rows=) hold a
shared one, so they run beside each other but never beside a writer of the whole store. Each range
writer also holds an exclusive flock on rows-<start>-<stop>.lock: one live writer per range. Where
the OS or the file system has no flock the locks are no-ops (the overlap check of ranges still runs).
"""

from __future__ import annotations

import errno
import os
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


class DirectoryLock:
    """A flock on a store directory: exclusive for a writer of the whole store, shared for a range
    writer. release() is idempotent: the descriptor is closed once, by whoever releases first."""

    def __init__(self, root: Path, shared: bool = False):
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(root, os.O_RDONLY)
        try:
            taken = _try_flock(fd, exclusive=not shared)
        except BaseException:
            os.close(fd)
            raise
        if taken:
            self._fd = fd
            return
        os.close(fd)
        if shared:
            raise RuntimeError(
                f"gradient store {root} is being written by a writer of the whole store (in this or "
                "another process); close it before opening range writers (rows=)"
            )
        raise RuntimeError(
            f"gradient store {root} is being written by another writer (in this or another "
            "process; a writer of the whole store or range writers); close that writer first"
        )

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


class RangeLock:
    """The claim of one range writer on rows [start, stop) of a store: an exclusive flock on
    rows-<start>-<stop>.lock (created if absent, never through a link), then a check that no other
    range writer's files name rows overlapping these. Two writers claiming overlapping ranges at
    once: each made its file before looking, so at least one sees the other and is refused.
    release() is idempotent."""

    def __init__(self, root: Path, start: int, stop: int):
        path = root / range_file(start, stop, "lock")
        fd, created = self._take(path, start, stop)
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
            os.close(fd)
            raise
        self._fd: int | None = fd

    @staticmethod
    def _take(path: Path, start: int, stop: int) -> tuple[int, bool]:
        """(descriptor holding the flock on the lock file at `path`, whether this call created it)."""
        for _ in range(8):  # the file may be removed between our open and our flock: open it again
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd, created = open_file(path, writable=True), False
                except FileNotFoundError:
                    continue
            try:
                if not _try_flock(fd, exclusive=True):
                    raise RuntimeError(
                        f"rows [{start}, {stop}) of gradient store {path.parent} are being written by "
                        "another range writer (in this or another process); close that writer first"
                    )
                if _same_file(fd, path):
                    return fd, created
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OSError(errno.EAGAIN, "the lock file kept being replaced while it was taken", str(path))

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


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
