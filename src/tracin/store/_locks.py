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

A refusal names the holder where it can: a writer of the whole store records its pid, host and start
time in writer.info (removed when it lets go), a range writer in its lock file. These records only
inform: the flocks decide. A record that is missing, garbled, too long, or stale (a range lock file no
one holds, a writer.info of a dead process on this host) is left out of the refusal, and a writer that
takes the directory lock removes any writer.info left behind (no writer of the whole store is live then).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ._files import create_file, open_file, remove_if_present
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

# The record of the live writer of the whole store (pid, host, start time), and the most bytes read of
# any holder record (a longer one is left out of refusals, unread).
INFO_FILE = "writer.info"
_MAX_RECORD = 4096
# A refusal names at most this many holders (range writers may be many).
_HOLDERS_NAMED = 5

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
    writer. release() is idempotent: the descriptor is closed once, by whoever releases first, and
    the writer.info that record() wrote is removed before."""

    def __init__(self, root: Path, shared: bool = False):
        super().__init__()
        self._root = root
        self._info: Path | None = None  # the writer.info this lock wrote (record())
        if fcntl is None:
            return
        fd = self._open(root, _DIRECTORY)
        try:
            taken = self._flock(fd, exclusive=not shared)
        except BaseException:
            self.release()
            raise
        if taken:
            _remove_quietly(root / INFO_FILE)  # a killed writer's: no writer of the whole store is live now
            return
        self.release()
        if shared:
            raise RuntimeError(
                f"gradient store {root} is being written by a writer of the whole store (in this or "
                f"another process{_held_by(_writer_holder(root))}); close it before opening range writers (rows=)"
            )
        holders = _writer_holder(root) or _range_holders(root)
        raise RuntimeError(
            f"gradient store {root} is being written by another writer (in this or another "
            f"process; a writer of the whole store or range writers{_held_by(holders)}); close that writer first"
        )

    def record(self) -> None:
        """Writes this process's record into writer.info (exclusively, never through a link), for the
        refusals of other writers; nothing if the lock is not held or the file cannot be written."""
        if self._fd is None or not self._exclusive:
            return
        path = self._root / INFO_FILE
        try:
            fd = create_file(path)
            try:
                os.write(fd, _record())
            finally:
                os.close(fd)
        except (OSError, ValueError):  # read-only folder, full disk, a directory there: the refusals omit it
            _remove_quietly(path)
            return
        self._info = path

    def release(self) -> None:
        info, self._info = self._info, None
        if info is not None and self._fd is not None:  # still held (not in a forked child): it is ours
            _remove_quietly(info)
        super().release()


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
                        f"rows [{start}, {stop}) of gradient store {path.parent} are being written by another "
                        f"range writer (in this or another process{_held_by(_read_record(fd))}); close that "
                        "writer first"
                    )
                if _same_file(fd, path):
                    _write_record(fd)
                    return created
            except BaseException:
                self.release()
                raise
            self.release()
        raise OSError(errno.EAGAIN, "the lock file kept being replaced while it was taken", str(path))


def _record() -> bytes:
    """This process's holder record: pid, host name and the time (UTC) it took the lock, as JSON."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode() + b"\n"


def _write_record(fd: int) -> None:
    """Replaces the content of the held range lock file at `fd` by this process's record (nothing on failure)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record(), 0)
    except OSError:
        pass


def _read_record(fd: int) -> str | None:
    """The holder in the record at `fd` as "pid P on host H since T"; None if it is empty, longer
    than _MAX_RECORD bytes, unreadable or not a record."""
    try:
        data = os.pread(fd, _MAX_RECORD + 1, 0)
        doc = json.loads(data) if len(data) <= _MAX_RECORD else None
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    if not isinstance(doc, dict):
        return None
    pid, host, since = doc.get("pid"), doc.get("host"), doc.get("since")
    # a pid beyond a 32-bit pid_t is no process's (os.kill would raise OverflowError on it)
    if not (type(pid) is int and 0 < pid < 2**31 and isinstance(host, str) and isinstance(since, str)):
        return None
    host, since = _printable(host), _printable(since)
    if host == socket.gethostname() and not _alive(pid):
        return None
    return f"pid {pid} on host {host} since {since}"


def _printable(text: str) -> str:
    """`text` without control characters, at most 100 characters (a record is anyone's to write)."""
    return "".join(ch for ch in text if ch.isprintable())[:100]


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (True where that cannot be told)."""
    if os.name != "posix":  # os.kill elsewhere would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        pass
    return True


def _writer_holder(root: Path) -> list[str]:
    """The holder named by the store's writer.info, if it is a regular file holding a valid record
    (a link, FIFO or device there is not opened, see open_file)."""
    try:
        fd = open_file(root / INFO_FILE)
    except (OSError, ValueError):
        return []
    try:
        found = _read_record(fd)
    finally:
        os.close(fd)
    return [found] if found else []


def _range_holders(root: Path) -> list[str]:
    """The holders named by the range lock files of `root` that a live range writer holds."""
    try:
        names = [(name, a, b) for name, a, b, kind in range_files(root) if kind == "lock"]
    except OSError:
        return []
    found = [(_range_holder(root / name), a, b) for name, a, b in names]
    return [f"{holder} (rows [{a}, {b}))" for holder, a, b in found if holder]


def _range_holder(path: Path) -> str | None:
    """The holder named by the range lock file at `path` if a live writer holds its flock (found by
    trying a shared flock: one taken at once means no live holder; released at once)."""
    probe = _Held()  # a fork meanwhile: the child closes its copy (a shared flock may be on it)
    try:
        fd = open_file(path, opener=probe._open, closer=lambda _: probe.release())
        return None if _try_flock(fd, exclusive=False) else _read_record(fd)
    except (OSError, ValueError):  # gone meanwhile, or a link, FIFO or directory: no holder to name
        return None
    finally:
        probe.release()


def _held_by(holders: str | list[str] | None) -> str:
    """ "; held by ..." naming `holders` (at most _HOLDERS_NAMED), or "" if there are none."""
    if not holders:
        return ""
    holders = [holders] if isinstance(holders, str) else holders
    more = f" and {len(holders) - _HOLDERS_NAMED} more" if len(holders) > _HOLDERS_NAMED else ""
    return "; held by " + ", ".join(holders[:_HOLDERS_NAMED]) + more


def _remove_quietly(path: Path) -> None:
    """Removes the file `path` (a link itself) if it is there and can be removed; nothing otherwise."""
    try:
        remove_if_present(path)
    except (OSError, ValueError):
        pass


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
