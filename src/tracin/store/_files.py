"""Files inside a store directory: opened without following links, OS errors naming the file.

Every file a store reads or writes is first checked with lstat to be a regular file (a planted
symbolic link, FIFO or device node is refused without being opened), then opened by name with
O_NOFOLLOW and O_NONBLOCK (a link or FIFO swapped in between is still never followed and cannot
hang the open) and checked again with fstat; new files are created with O_EXCL. A failed read or
write raises the OSError that happened (permission denied, too many open files, disk full), with
the file's path in it.

Hard links: a file opened for writing must have exactly one link (checked on the open descriptor).
A data file with more links shares its bytes with another path, such as the same file of a snapshot
made with `cp -al` or `rsync --link-dest`, or a file outside the store linked in; writing through it
would silently change that other store's finished rows, so it is refused (a StoreFormatError naming
the file and the link count). Files a store creates have one link, and it never writes any other
way: the manifest and progress files are replaced by rename and a re-create (overwrite=True) unlinks
the old files, which leaves the other links' data untouched. Readers do not check the link count: a
hard-linked snapshot of a finished store is a legitimate backup, and both copies read the same bytes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ._format import CREATING, MANIFEST, Manifest, StoreFormatError, check_containers, parse_manifest

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)
MAX_MANIFEST_BYTES = 64 * 2**20  # far above any real manifest; a bigger one is refused unread


@contextmanager
def naming(path: Path, doing: str) -> Iterator[None]:
    """Re-raises an OSError that carries no file name (pwrite, fsync, mmap, ...) with `path` in it,
    says "the disk is full" for ENOSPC / EDQUOT, and for EMFILE (even one naming a file) suggests
    raising the limit on open files. `doing`: "writing", "reading", ..."""
    try:
        yield
    except OSError as e:
        emfile = e.errno == errno.EMFILE and "ulimit -n" not in (e.strerror or "")
        if (e.filename is not None and not emfile) or e.errno is None:
            raise
        reason = e.strerror or "error"
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            reason = f"the disk is full ({reason})"
        if emfile:
            reason = f"{reason} (the process reached its limit on open files: raise it, e.g. `ulimit -n 65536`)"
        raise type(e)(e.errno, f"{reason}, while {doing}", str(path)) from e


def open_file(
    path: Path,
    writable: bool = False,
    opener: Callable[[Path, int], int] | None = None,
    closer: Callable[[int], None] | None = None,
) -> int:
    """Descriptor of the existing regular file `path`, read-only or read-write, opened by
    opener(path, flags) (default os.open) and closed by closer(fd) (os.close) if it is refused.

    A symbolic link, FIFO, directory or other non-regular file is a StoreFormatError, refused before
    it is opened (opening a device can act on it); so is, when `writable`, a file with more than one
    hard link (see the module docstring); a missing file a FileNotFoundError; any other OS error
    propagates (it names the file; too many open files says to raise the limit).
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | _NOFOLLOW | _NONBLOCK | _BINARY
    opener, closer = opener or os.open, closer or os.close
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise refusal(path, mode)
    try:
        with naming(path, "opening"):  # EMFILE: suggests raising the limit
            fd = opener(path, flags)
    except OSError as e:  # a link or directory swapped in after the lstat
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise refusal(path, stat.S_IFLNK) from None
        if e.errno == errno.EISDIR:
            raise refusal(path, stat.S_IFDIR) from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        closer(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        closer(fd)
        raise refusal(path, st.st_mode)
    if writable and st.st_nlink > 1:
        closer(fd)
        raise StoreFormatError(
            f"{path} has {st.st_nlink} hard links: its data is shared with another path (a snapshot made with "
            "`cp -al` or `rsync --link-dest`, or a hard link), and writing it would change that file too, so it is "
            "not written through; copy the store with `cp -a` (which copies the data) and write the copy"
        )
    return fd


def refusal(path: Path, mode: int) -> StoreFormatError:
    """The StoreFormatError naming `path`, a link, directory or other non-regular file by `mode`."""
    if stat.S_ISLNK(mode):
        return StoreFormatError(
            f"{path} is a symbolic link; a gradient store holds regular files only and never follows links"
        )
    if stat.S_ISDIR(mode):
        return StoreFormatError(f"{path} is a directory (a gradient store holds regular files only)")
    return StoreFormatError(f"{path} is not a regular file (a gradient store holds regular files only)")


def store_root(path: str | os.PathLike, argument: str = "path") -> Path:
    """`path` (a store's folder) made absolute; an empty one ("", which Path() takes as the current
    folder: more likely a missing setting than a request for it) is a ValueError naming `argument`."""
    try:
        text = os.fspath(path)
    except TypeError:
        text = None  # Path() says what it accepts
    if text is not None and not text:
        raise ValueError(
            f"{argument} must name a gradient store folder, got {text!r} (an empty path would be the current "
            "folder; pass '.' for that)"
        )
    return Path(path).absolute()


def create_file(path: Path) -> int:
    """Write descriptor of a new empty file at `path` (0o666 less the umask, as open() makes them: a
    group-shared folder's umask 002 lets the group resume the store); FileExistsError if anything (even
    a link) is there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666)


def write_all(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
    """Writes all of `data` at byte `offset` (pwrite may write less than asked: continue)."""
    view = memoryview(data).cast("B")
    done = 0
    with naming(path, "writing"):
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def sync(fd: int, path: Path) -> None:
    """fsync, naming the file on failure."""
    with naming(path, "flushing it to disk"):
        os.fsync(fd)


def read_all(fd: int, limit: int, path: Path) -> bytes:
    """The whole file open at `fd` (a bytearray: one buffer of the file's size, never a second copy);
    StoreFormatError if it is longer than `limit` bytes."""
    buf = bytearray(min(os.fstat(fd).st_size, limit) + 1)  # a byte more: a file longer than it was shows
    size = 0
    with naming(path, "reading"), io.FileIO(fd, closefd=False) as file:
        while n := _read_into(file, buf, size):
            size += n
            if size > limit:
                raise StoreFormatError(f"{path}: larger than {limit} bytes, refused unread")
            if size == len(buf):  # it grew: read on
                buf.extend(bytes(min(size, limit + 1 - size)))
    del buf[size:]
    return buf


def _read_into(file: io.FileIO, buf: bytearray, start: int) -> int:
    """Reads into buf[start:] (releasing its views after, so that buf can grow); bytes read (0: end)."""
    with memoryview(buf) as view, view[start:] as rest:
        return file.readinto(rest) or 0


def write_new_file(path: Path, data: bytes) -> None:
    """Creates `path` (exclusively, see create_file) holding `data`, durably."""
    fd = create_file(path)
    try:
        write_all(fd, data, 0, path)
        sync(fd, path)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: dict) -> None:
    """Replaces `path` by `doc` atomically: write a new temporary, fsync it, rename it over `path`.

    Readers and a crashed writer see the old or the new document, never a mix. (The rename itself
    becomes durable against power loss with fsync_dir; until then a crash can only lose progress.)
    A stale temporary (or a link planted in its place) is removed first, never written through. A
    document with more JSON arrays and objects than readers accept is an OverCapError, nothing written.
    """
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(doc, allow_nan=False).encode() + b"\n"  # one line: the C encoder, ~20x faster than indented
    check_containers(data, str(path))
    remove_if_present(tmp)
    try:
        write_new_file(tmp, data)
    except BaseException:
        remove_if_present(tmp)
        raise
    os.replace(tmp, path)


def remove_if_present(path: Path) -> None:
    """Unlinks `path` (a link itself, never its target) if it exists; a directory there is a
    StoreFormatError naming it (a store never makes one, and never removes one)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # EISDIR on Linux, EPERM elsewhere
        if e.errno not in (errno.EISDIR, errno.EPERM) or not os.path.isdir(path) or os.path.islink(path):
            raise
        raise StoreFormatError(f"{refusal(path, stat.S_IFDIR)}; remove it") from None


def fsync_dir(path: Path) -> None:
    """Makes renames and new files in a directory durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest_bytes(root: Path) -> bytes:
    """The bytes of the manifest of the store at `root` (unchecked); FileNotFoundError if there is none."""
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"no gradient store at {root} (not a directory)")
    try:
        fd = open_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            interrupted_create(root) or f"no gradient store at {root} (no {MANIFEST}{_npy_files_hint(root)})"
        ) from None
    try:
        return read_all(fd, MAX_MANIFEST_BYTES, path)
    finally:
        os.close(fd)


def _npy_files_hint(root: Path, shown: int = 3) -> str:
    """For a folder holding .npy files (np.save's per-example gradients, say) but no manifest: what it holds and
    how to make a store of them; "" otherwise (or when the folder cannot be listed)."""
    try:
        names = sorted(e.name for e in os.scandir(root) if e.name.endswith(".npy") and e.is_file())
    except OSError:
        return ""
    if not names:
        return ""
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return (
        f"; it holds .npy files ({listed}): make a store of (n, d) float32 arrays with w = GradientStore.create(path, "
        "n_rows=n, dims=[d, ...], weights=[lr, ...]); w.write(checkpoint, 0, rows); w.finalize()"
    )


def interrupted_create(root: str | os.PathLike) -> str | None:
    """What to say of the folder `root` when it holds the creation marker and no manifest (what a
    GradientStore.create that failed or was killed part-way leaves): how to redo or drop it; else None."""
    root = Path(root)
    if not os.path.lexists(root / CREATING) or os.path.lexists(root / MANIFEST):
        return None
    return (
        f"no gradient store at {root} yet: it holds what an interrupted GradientStore.create left (its "
        f"{CREATING} marker, no {MANIFEST}); unless a create is still under way there, call "
        "GradientStore.create again with the same arguments (or rerun the export) to redo it, or delete the folder"
    )


def enclosing_store(path: Path) -> Path | None:
    """The nearest folder above `path` (its own folder first, links resolved) whose manifest.json is a
    gradient store's, or None (another program's manifest.json, such as a web project's, does not
    count; nor does anything but a regular file of at most MAX_MANIFEST_BYTES: a FIFO is not read)."""
    for folder in path.resolve().parents:
        try:
            parse_manifest(read_manifest_bytes(folder), str(folder / MANIFEST))
        except (OSError, ValueError):  # none, unreadable, not a file, or not a store's (StoreFormatError)
            continue
        return folder
    return None


def read_manifest(root: Path) -> Manifest:
    """The checked manifest of the store at `root`; FileNotFoundError if there is none."""
    return parse_manifest(read_manifest_bytes(root), str(root / MANIFEST))
