"""Writing a file whole: through a temporary file beside it, renamed over it once complete, so that
the file is either the complete new contents or, untouched, what it was before."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import IO

from .store._files import fsync_dir

TEMP_PREFIX = ".tracin-"
"""Names of the temporary files: TEMP_PREFIX, 8 hex digits, ".tmp" (short, so that a path whose
file name is as long as its folder allows can still be written)."""


@contextlib.contextmanager
def whole_file(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A file object (binary, else text with newline="") to write `path` through, which ends up its
    complete new contents or, after an exception in the block (interrupts included), as it was. A
    symbolic link is followed (resolve: as fs.protected_symlinks allows) and kept; its target is
    written. The contents go to a temporary file beside the target, created with open()'s mode
    (0o666 less the umask, which is never changed) or, if the target exists, given its permission
    bits, owner and group (by descriptor); on leaving the block it is fsynced and renamed over the
    target, and the folder fsynced where it can be; on an exception it is removed. An existing file
    a rename cannot replace is rewritten in place (its inode kept): one with other hard links, one
    whose owner or group this process cannot give a new file, one in a folder that refuses new
    files. Its contents are staged whole in an unnamed
    temporary file (beside it, else in tempfile's folder) and copied over it on leaving the block:
    only an interrupt or error during that copy (a full disk) leaves it partly written. A FIFO or
    device is written directly (streamed). PermissionError naming `path` for an existing file this
    process may not write; IsADirectoryError for a folder; OSError naming the folder when a new file
    cannot be created there; IsADirectoryError for a name ending in a separator, as open() refuses."""
    name = os.fsdecode(os.fspath(path))
    if name.endswith(SEPARATORS):  # as open() refuses it, not written as the name without it
        raise IsADirectoryError(errno.EISDIR, f"cannot write {name}: a name ending in {name[-1]!r} names a folder")
    target = resolve(path)
    try:
        old = os.stat(path)  # the kernel's lookup: /dev/stdout's magic link leads to a pipe
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode) and not stat.S_ISDIR(old.st_mode):
        with open(path, "wb") if binary else open(path, "w", newline="") as f:  # streamed, not resolved
            yield f
        return
    if old is not None:
        old = os.stat(target)
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {name}: it is a folder")
    if old is not None and not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, f"cannot write {name} (permission denied)")
    replacement = _replacement(name, target, old)
    if replacement is None:
        with _in_place(target, binary) as f:
            yield f
        return
    fd, temp = replacement
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(temp, target)
        fsync_dir(os.path.dirname(target))  # the rename itself, best effort
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


SEPARATORS = tuple(filter(None, (os.sep, os.altsep)))
"""What ends a name that names a folder (refused: whole_file writes files)."""

MAX_LINKS = 40
"""Symbolic links followed in one path before giving up (Linux's limit)."""


def resolve(path: str | os.PathLike) -> str:
    """The absolute path of the file `path` names, symbolic links followed one at a time (each
    folder and the last name). A link in a sticky world-writable folder (/tmp) is followed only if
    its owner is this process's effective user or the folder's owner, as the kernel's
    fs.protected_symlinks rule for open(): else PermissionError naming `path` and the link (a link
    planted by another user would send the write elsewhere). OSError (ELOOP) naming `path` after
    MAX_LINKS links. What cannot be looked up (a missing or unsearchable folder) is kept as named,
    with the rest of the path ("." and empty parts dropped; ".." kept, not collapsed)."""
    name = os.fsdecode(os.fspath(path))
    pending = name.split("/")
    resolved = "/" if os.path.isabs(name) else os.getcwd()
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        try:
            link = os.lstat(candidate)
        except OSError:  # ".." not collapsed: "missing/../f" then fails to open as open() fails
            return os.path.join(candidate, *(p for p in pending if p not in ("", ".")))
        if not stat.S_ISLNK(link.st_mode):
            resolved = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise OSError(errno.ELOOP, f"cannot write {name}: more than {MAX_LINKS} symbolic links (a loop?)")
        _check_link(name, candidate, link, resolved)
        to = os.fsdecode(os.readlink(candidate))
        if os.path.isabs(to):
            resolved = "/"
        pending[:0] = to.split("/")
    return resolved


def _check_link(name: str, link_path: str, link: os.stat_result, folder: str) -> None:
    """PermissionError unless the link at `link_path` (in `folder`) may be followed (resolve)."""
    where = os.stat(folder)
    sticky_shared = where.st_mode & stat.S_ISVTX and where.st_mode & stat.S_IWOTH
    if sticky_shared and link.st_uid not in (os.geteuid(), where.st_uid):
        raise PermissionError(
            errno.EACCES,
            f"cannot write {name}: symbolic link {link_path} belongs to another user (uid {link.st_uid}) "
            f"in the shared sticky folder {folder}, and is not followed",
        )


@contextlib.contextmanager
def _in_place(target: str, binary: bool) -> Iterator[IO]:
    """A file to write `target` in place through: an unnamed temporary file (beside `target`, else
    in tempfile's folder) whose complete contents are copied over `target`'s on leaving the block."""
    mode = "w+b" if binary else "w+"
    try:
        staging = tempfile.TemporaryFile(mode, newline=None if binary else "", dir=os.path.dirname(target))
    except OSError:  # a folder refusing new files
        staging = tempfile.TemporaryFile(mode, newline=None if binary else "")
    with staging as f:
        yield f
        f.flush()
        os.lseek(f.fileno(), 0, os.SEEK_SET)
        flags = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        with open(f.fileno(), "rb", closefd=False) as source, open(os.open(target, flags), "wb") as out:
            shutil.copyfileobj(source, out)
            out.truncate()
            out.flush()
            os.fsync(out.fileno())


def _replacement(path: str, target: str, old: os.stat_result | None) -> tuple[int, str] | None:
    """An open temporary file beside `target` (descriptor, path) with the permission bits, owner
    and group of `old` if it exists; None where `target` must be written in place."""
    if old is not None and old.st_nlink > 1:
        return None
    folder = os.path.dirname(target)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        temp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, flags, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
        except PermissionError as e:
            if old is not None:  # a writable file in a folder that refuses new files
                return None
            raise PermissionError(e.errno, f"cannot create {path}: folder {folder} does not allow new files") from e
        except OSError as e:  # the same type (FileNotFoundError for a missing folder), naming the path
            raise type(e)(e.errno, f"cannot write {path}: no file can be created in {folder} ({e.strerror})") from e
    if old is None:
        return fd, temp
    try:
        new = os.fstat(fd)
        if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
            os.fchown(fd, old.st_uid, old.st_gid)
        os.fchmod(fd, old.st_mode & 0o7777)  # after fchown, which clears set-id bits
    except BaseException as e:
        os.close(fd)
        os.unlink(temp)
        if isinstance(e, PermissionError):  # another's owner or group: kept by writing in place
            return None
        raise
    return fd, temp
