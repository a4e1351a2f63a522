"""The .npy files of a store: headers parsed from untrusted bytes, checked, created and mapped."""

from __future__ import annotations

import io
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from ._files import create_file, naming, open_file, sync, write_all
from ._format import StoreChangedError, StoreFormatError

_MAX_HEADER = 10000  # NumPy's own limit for headers it reads without allow_pickle
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def parse_header(head: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) from the first bytes of an .npy file (at least
    the whole header); anything that is not a valid version 1.0 / 2.0 header is a StoreFormatError.

    NumPy reads the header dict with ast.literal_eval, which is not thread-safe on CPython 3.11
    (cpython#106905: a thread switch inside it, e.g. a finalizer run by the garbage collector, can
    raise "SystemError: AST constructor recursion depth mismatch" on a good header). Parses are
    serialized by a lock; a SystemError (from ast used by other code at the same time) is retried
    once, then raised as the interpreter error it is. A MemoryError is the file's fault (a hostile
    header of at most 10 kB can exhaust the parser, e.g. 9000 '-' then '1'): a StoreFormatError.
    """
    for attempt in (1, 2):
        try:
            return _parse(head, where)
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_PARSING = threading.RLock()  # reentrant: a finalizer run inside a parse may open a store itself


def _new_lock_after_fork() -> None:
    """A child forked while another thread held the lock would wait for it forever: it gets a fresh one."""
    global _PARSING
    _PARSING = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def _parse(head: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    f = io.BytesIO(head)
    with _PARSING:
        try:
            version = np.lib.format.read_magic(f)
            read = _HEADER_READERS.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read(f, max_header_size=_MAX_HEADER)
        except SystemError:
            raise
        # The input is at most ~10 kB in memory, so any other exception means a malformed header (NumPy's
        # parser raises ValueError, but also SyntaxError, TypeError, RecursionError or MemoryError from
        # ast on hostile text).
        except Exception as e:  # noqa: BLE001
            raise StoreFormatError(f"{where}: corrupt .npy header ({type(e).__name__}: {str(e)[:200]})") from None
    return dtype, tuple(shape), fortran, f.tell()


def read_header(fd: int, path: Path) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """parse_header of the .npy file open at `fd` (OS errors name the file)."""
    with naming(path, "reading"):
        head = os.pread(fd, _MAX_HEADER + 16, 0)
    return parse_header(head, str(path))


def check_npy(fd: int, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Byte offset of the data in the .npy file open at `fd`, after checking its header and exact
    size against the expected dtype and C-order shape (StoreFormatError otherwise)."""
    found_dtype, found_shape, fortran, offset = read_header(fd, path)
    if found_dtype != dtype:
        raise StoreFormatError(f"{path}: dtype {found_dtype} on disk, but the manifest implies {dtype}")
    if found_shape != shape:
        raise StoreFormatError(f"{path}: shape {found_shape} on disk, but the manifest implies {shape}")
    if fortran:
        raise StoreFormatError(f"{path}: stored in Fortran order; the format requires C order")
    expected = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    with naming(path, "reading"):
        size = os.fstat(fd).st_size
    if size < expected:
        raise StoreFormatError(
            f"{path}: truncated, {size} bytes on disk but {expected} expected for shape {shape} {dtype}"
        )
    if size > expected:
        raise StoreFormatError(
            f"{path}: {size - expected} unexpected bytes after the data ({size} bytes on disk, {expected} expected)"
        )
    return offset


def _header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def npy_size(dtype: np.dtype, shape: tuple[int, int]) -> int:
    """The bytes of a .npy file of `shape` and `dtype` (header and data)."""
    return len(_header_bytes(dtype, shape)) + shape[0] * shape[1] * dtype.itemsize


def create_npy(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """A new .npy file of the given shape whose data is all zero bytes (sparse where the OS allows);
    its size (npy_size) must fit a signed 64-bit file offset (create checks it first)."""
    header = _header_bytes(dtype, shape)
    fd = create_file(path)
    try:
        write_all(fd, header, 0, path)
        with naming(path, "setting its size"):
            os.ftruncate(fd, npy_size(dtype, shape))
        sync(fd, path)
    finally:
        os.close(fd)


def write_npy(path: Path, array: np.ndarray) -> None:
    """A new .npy file holding `array` (no object dtype), durably; a full disk names the file."""
    array = np.ascontiguousarray(array)
    header = _header_bytes(array.dtype, array.shape)
    fd = create_file(path)
    try:
        write_all(fd, header, 0, path)
        write_all(fd, array.reshape(-1).view(np.uint8), len(header), path)
        sync(fd, path)
    finally:
        os.close(fd)


def map_array(fd: int, dtype: np.dtype, offset: int, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """A read-only array of `shape` mapped from byte `offset` of the file `path` open at `fd`, unmapped
    when the array is dropped. The map keeps its own duplicate of the descriptor (Python's mmap), so
    `fd` may be closed after; an OS error (too many open files for that duplicate) names the file.
    (mmap + frombuffer: np.memmap costs ~2.5x more per map, which counts when a chunk maps hundreds
    of files.)"""
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes == 0:
        empty = np.empty(shape, dtype)
        empty.flags.writeable = False
        return empty
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with naming(path, "mapping"):
        mapped = mmap.mmap(fd, offset - start + nbytes, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(mapped, dtype, nbytes // dtype.itemsize, offset - start).reshape(shape)


def read_array(fd: int, dtype: np.dtype, offset: int, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """A read-only array of `shape` read (copied) from byte `offset` of the file open at `fd`; it
    holds no descriptor. StoreChangedError if the file ends before the data does."""
    out = np.empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    with naming(path, "reading"), io.FileIO(fd, "rb", closefd=False) as f:
        f.seek(offset)
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise StoreChangedError(f"{path} became shorter while it was read (truncated by another process)")
            done += got
    out.flags.writeable = False
    return out


def read_ids(path: Path, n_rows: int) -> np.ndarray:
    """The ids file of a store, memory-mapped (never through a link): n_rows integers or strings that
    UTF-8 can encode; StoreFormatError if it is anything else (naming the first id it cannot encode), or
    missing. See open_ids for the cost."""
    return open_ids(path, n_rows)[0]


def open_ids(path: Path, n_rows: int) -> tuple[np.ndarray, int, os.stat_result]:
    """read_ids, with the byte offset of the ids in the file and the file's fstat when it was mapped.

    The check reads the whole file, n_rows x the longest id x 4 bytes (NumPy's UTF-32), on its code
    points: ~3 ms for a million ASCII ids of 16 characters, ~10-20 ms with an emoji in each (NumPy reads
    them in ~15 ms, ids.tolist() takes ~150-270 ms), but ~50 ms for a million rows of which one id has
    200 characters (an 800 MB file), and more where the file is not in the page cache (read from disk)."""
    try:
        fd = open_file(path)
    except FileNotFoundError:
        raise StoreFormatError(f"{path}: ids file is missing (the manifest says the store has ids)") from None
    try:
        dtype, shape, _, _ = read_header(fd, path)
        if shape != (n_rows,) or dtype.kind not in "iuU":
            raise StoreFormatError(f"{path}: expected {n_rows} integer or string ids, got shape {shape} dtype {dtype}")
        if dtype.itemsize == 0:  # NumPy never writes one, and maps it as '<U1' (reading beyond the file)
            raise StoreFormatError(f"{path}: string ids of width 0 (dtype {dtype.str}); expected at least 1 character")
        offset = check_npy(fd, path, dtype, shape)
        ids = map_array(fd, dtype, offset, shape, path)
        with naming(path, "reading"):
            st = os.fstat(fd)
    finally:
        os.close(fd)
    if (bad := unencodable_id(ids)) is not None:
        raise StoreFormatError(f"{path}: {bad}: re-create the store with valid text ids")
    return ids, offset, st


_CHECKED_CODES = 1 << 20  # code points checked at a time: a 4 MiB buffer, whatever the ids' width


def unencodable_id(ids: np.ndarray, first_row: int = 0) -> str | None:
    """None, unless `ids` (1-D) are strings of which one holds a code point UTF-8 cannot encode: then
    "ids[ROW] = 'x\\ud800y' holds a lone surrogate (U+D800), which UTF-8 cannot encode", naming the first
    (ROW counted from `first_row`: the row of ids[0] in the store, for the ids of a slice).
    Such an id could be stored, but not written out (tracin score / self-influence failed on it after
    part of their CSV). A Python string can hold a lone surrogate (U+D800..U+DFFF); only a file can hold
    a code point beyond U+10FFFF (NumPy turns it into a string that encodes to invalid UTF-8). Checked on
    NumPy's UTF-32 code points, a piece of at most _CHECKED_CODES at a time (whole rows, or part of one
    row for ids wider than that: a crafted header can make one id hundreds of MB), without a Python
    string per id: a maximum below U+D800 (ASCII, most scripts) clears a piece in one pass, else the
    minimum of code - 0xD800 (unsigned: below U+D800 wraps around) is at least 0x800 when the piece holds
    no surrogate. Pieces go in row order, a row's from its start, so the first bad piece holds the first
    bad row and that row's first bad code point."""
    if ids.dtype.kind != "U" or ids.dtype.itemsize == 0 or ids.size == 0:
        return None
    width = ids.dtype.itemsize // 4
    ids = np.ascontiguousarray(ids)
    codes = ids.view(np.dtype(np.uint32).newbyteorder(ids.dtype.byteorder)).reshape(ids.shape[0], width)
    rows = max(1, _CHECKED_CODES // width)  # > 1 only when a piece holds whole rows
    cols = min(width, _CHECKED_CODES)
    shifted = np.empty((min(rows, codes.shape[0]), cols), np.uint32)
    for start in range(0, codes.shape[0], rows):
        for col in range(0, width, cols):
            piece = codes[start : start + rows, col : col + cols]
            top = piece.max()
            if top < 0xD800:
                continue
            if top <= 0x10FFFF:
                out = shifted[: piece.shape[0], : piece.shape[1]]
                np.subtract(piece, np.uint32(0xD800), out=out)
                if out.min() >= 0x800:
                    continue
            bad = ((piece - np.uint32(0xD800)) < 0x800) | (piece > 0x10FFFF)
            r = int(bad.any(axis=1).argmax())
            code = int(piece[r][bad[r]][0])
            what = (
                f"a lone surrogate (U+{code:04X})"
                if code <= 0xDFFF
                else f"the code point {code:#x}, beyond Unicode's last (U+10FFFF)"
            )
            return f"ids[{first_row + start + r}] = {_shown(codes[start + r])} holds {what}, which UTF-8 cannot encode"
    return None


def _shown(codes: np.ndarray, limit: int = 80) -> str:
    """The id of these UTF-32 code points as its repr ('x\\ud800y'), cut to about `limit` characters: built
    per code point, since one beyond U+10FFFF makes no valid Python string (str() of it is a SystemError)."""
    codes = np.trim_zeros(codes[: limit + 1], "b")  # NumPy drops trailing NULs
    text = "".join(
        "\\'" if c == 0x27 else repr(chr(c))[1:-1] if c <= 0x10FFFF else f"\\U{c:08x}" for c in codes.tolist()
    )
    return f"'{text[:limit]}'" + ("..." if len(text) > limit or len(codes) > limit else "")
