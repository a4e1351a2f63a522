"""Creating a gradient store, reopening an unfinished one with the same spec to resume it, or opening a writer of
one row range of it (rows=)."""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._caller import user_stacklevel
from .._validate import flag, positive_int
from ..gradients import GradientSet, _weights
from ._files import (
    create_file,
    fsync_dir,
    read_manifest,
    refusal,
    remove_if_present,
    store_root,
    write_json_atomic,
)
from ._format import (
    CREATING,
    DISK_DTYPES,
    IDS_FILE,
    MANIFEST,
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    Manifest,
    StoreFormatError,
    is_own_file,
    json_shape,
    metadata_problem,
    new_store_id,
    range_file,
    short,
    unique_keys,
)
from ._locks import DirectoryLock, RangeLock
from ._npy import create_npy, npy_size, read_ids, unencodable_id, write_npy
from ._range_writer import GradientStoreRangeWriter, initial_progress
from ._ranges import merge_progress, read_progress
from ._writer import DataFiles, GradientStoreWriter

_REPLACE = "pass overwrite=True to replace it"


def create(
    path: str | os.PathLike,
    n_rows: int,
    dims: Sequence,
    weights: Sequence[float] | None,
    dtype: str,
    *,
    factored: bool,
    metadata: dict | None,
    ids: Sequence | np.ndarray | None,
    overwrite: bool,
    rows: Any,
    open_store: Callable[[Path], GradientSet],
    advice: str | None = None,
) -> GradientStoreWriter:
    """See GradientStore.create; `open_store` is what the writer's finalize() returns. `advice`: how
    to get past a store or files that cannot be resumed, ending those errors (default: pass
    overwrite=True; an export, which has no overwrite, says what its user can do instead)."""
    wanted = _wanted_manifest(n_rows, dims, weights, dtype, factored, metadata)
    id_array = _check_ids(ids, wanted.n_rows)
    wanted.has_ids = id_array is not None
    overwrite = flag(overwrite, "overwrite")
    root = store_root(path)  # absolute: the manifest is rewritten on every write, a later chdir must not matter
    if rows is not None:
        return _range_writer(root, wanted, id_array, _check_rows(rows, wanted.n_rows), overwrite, open_store, advice)
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(root)
    try:
        if os.path.lexists(root / MANIFEST) and not overwrite:
            manifest = _resumable(root, wanted, id_array, advice or _REPLACE)
            if not manifest.complete:  # each write() replaces the manifest through its temporary
                _check_temporary(root / (MANIFEST + ".tmp"), "the store")
            _drop_marker(root)
            merge_progress(root, manifest)
            files = None if manifest.complete else _resumable_files(root, manifest, advice or _REPLACE)
        else:
            _build(root, wanted, id_array, overwrite, advice)
            manifest = wanted
            files = DataFiles(root, manifest)
        if files is not None:  # inside: a warning made an error (-W error) must not keep the store locked
            _warn_short_of_space(root, manifest)
            lock.record()  # names this writer in the refusals of others
    except BaseException:
        lock.release()
        raise
    return GradientStoreWriter(root, manifest, lock, files, open_store)


def _range_writer(
    root: Path,
    wanted: Manifest,
    ids: np.ndarray | None,
    rows: tuple[int, int],
    overwrite: bool,
    open_store: Callable[[Path], GradientSet],
    advice: str | None,
) -> GradientStoreRangeWriter:
    """A writer of rows [start, stop) of the store at `root`, which must exist with the spec `wanted`."""
    if overwrite:
        raise ValueError(
            "overwrite=True cannot be combined with rows=: range writers write into a store that "
            "exists; create (or replace) it first without rows="
        )
    start, stop = rows
    if not os.path.lexists(root / MANIFEST):
        raise FileNotFoundError(
            f"no gradient store at {root} to write rows [{start}, {stop}) into: create it "
            "first with GradientStore.create(path, ...) without rows=, then open range writers"
        )
    lock = DirectoryLock(root, shared=True)
    claim = None
    try:
        advice = advice or "create the store again without rows= (overwrite=True) before opening range writers"
        manifest = _resumable(root, wanted, ids, advice)
        found = None
        files = None
        if not manifest.complete:
            temporary, what = root / (range_file(start, stop, "json") + ".tmp"), f"rows [{start}, {stop})"
            try:
                claim = RangeLock(root, start, stop)
            except OSError:  # a lock file the read-only folder cannot take: the refusal names the folder
                if not os.access(root, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
                    _check_temporary(temporary, what)
                raise
            _check_temporary(temporary, what)  # holding the claim: a live writer of these rows may be using it
            found = read_progress(root, manifest, start, stop)
            files = _resumable_files(root, manifest, advice)
    except BaseException:
        if claim is not None:
            claim.release()
        lock.release()
        raise
    return GradientStoreRangeWriter(
        root, manifest, lock, claim, files, initial_progress(manifest, found, start, stop), open_store
    )


def _check_rows(rows: Any, n_rows: int) -> tuple[int, int]:
    """rows as (start, stop) with 0 <= start < stop <= n_rows."""
    if (
        isinstance(rows, (tuple, list))
        and len(rows) == 2
        and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in rows)
        and 0 <= rows[0] < rows[1] <= n_rows
    ):
        return int(rows[0]), int(rows[1])
    raise ValueError(
        f"rows must be a (start, stop) pair of integers with 0 <= start < stop <= n_rows ({n_rows}), got {rows!r}"
    )


def _build(root: Path, wanted: Manifest, ids: np.ndarray | None, overwrite: bool, advice: str | None) -> None:
    """Replaces what `root` holds by a new store. Order: the creation marker, then the old files go
    (the manifest first), then the data files and ids come, then the manifest (from then on the store
    exists), then the marker goes; a create killed on the way leaves files the next one replaces."""
    names = _clearable(root, overwrite, advice)
    if CREATING not in names:
        os.close(create_file(root / CREATING))
        fsync_dir(root)
    for n in sorted(names, key=lambda n: n != MANIFEST):
        if n != CREATING:
            remove_if_present(root / n)
    fsync_dir(root)
    try:
        for c, files in enumerate(wanted.files):
            for name, d in zip(files, wanted.dims[c], strict=True):
                try:
                    create_npy(root / name, DISK_DTYPES[wanted.dtype], (wanted.n_rows, d))
                except OSError as e:
                    if e.errno != errno.EFBIG:
                        raise
                    raise type(e)(e.errno, _too_big(e, wanted, d), e.filename) from e
        if ids is not None:
            write_npy(root / IDS_FILE, ids)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise type(e)(e.errno, _disk_full(e, root, wanted, ids), e.filename) from e
    wanted.store_id = new_store_id()
    fsync_dir(root)
    write_json_atomic(root / MANIFEST, wanted.to_json())
    fsync_dir(root)
    os.unlink(root / CREATING)
    fsync_dir(root)


# what the OS says when the disk (or the user's quota) has no room left
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _too_big(e: OSError, wanted: Manifest, d: int) -> str:
    """The text of EFBIG met making a data file of n_rows x d values: the size asked, and what to do."""
    size = npy_size(DISK_DTYPES[wanted.dtype], (wanted.n_rows, d))
    limit = _file_size_limit()
    cause = (
        f"this process's file size limit (RLIMIT_FSIZE, ulimit -f) is {limit} bytes: raise it (ulimit -f unlimited), "
        "split the rows between stores or project the gradients (a smaller dim)"
        if limit is not None and limit < size
        else "the file system refuses files that large: split the rows between stores, project the "
        "gradients (a smaller dim) or use another file system"
    )
    return (
        f"{e.strerror or 'error'} (a data file of {size} bytes: n_rows={wanted.n_rows} x {d} {wanted.dtype} "
        f"values); {cause}. The folder holds an interrupted create, which the next create replaces"
    )


def _file_size_limit() -> int | None:
    """The process's soft RLIMIT_FSIZE in bytes (None: unlimited, or not known on this platform)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _disk_full(e: OSError, root: Path, wanted: Manifest, ids: np.ndarray | None) -> str:
    """The text of ENOSPC / EDQUOT met making the store's files in `root`: the disk is full, how many
    bytes the store's files take once written and how many the file system has free, and what to do."""
    need = sum(npy_size(DISK_DTYPES[wanted.dtype], (wanted.n_rows, d)) for dims in wanted.dims for d in dims)
    if ids is not None:
        need += ids.nbytes + 128  # the ids' values and (about) their .npy header
    reason = e.strerror or "error"
    if e.errno != errno.ENOSPC:  # EDQUOT: the file system's free bytes say nothing of the user's quota
        return (
            f"the disk quota is exceeded ({reason}); the store's files take about {need} bytes once every row is "
            "written: free space within the quota (or have it raised), then create again. The folder holds an "
            "interrupted create, which the next create replaces"
        )
    if "the disk is full" not in reason:
        reason = f"the disk is full ({reason})"
    try:
        fs = os.statvfs(root)
        held = _bytes_held(root)  # the next create removes them first
        room = f"; {fs.f_bavail * fs.f_frsize} bytes are free now" + (
            f" (and the {held} bytes this interrupted create's files hold, which the next create removes first)"
            if held
            else ""
        )
        whole = fs.f_blocks * fs.f_frsize
    except (OSError, AttributeError):  # no statvfs (Windows) or it failed: the need alone
        room, whole = "", 0
    text = (
        f"{reason}; the store's files take about {need} bytes once every row is written{room}: free space on "
        "that disk (or quota), then create again"
    )
    if whole and need > whole:
        text += (
            f" (the file system holds {whole} bytes in all, less than the store needs: split the rows between "
            "stores, project the gradients (a smaller dim) or use another file system)"
        )
    return text + ". The folder holds an interrupted create, which the next create replaces"


def _bytes_held(root: Path) -> int:
    """The bytes the files in `root` take on disk (st_blocks; 0 where the OS does not say)."""
    held = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        try:
            held += os.lstat(root / name).st_blocks * 512
        except (OSError, AttributeError):
            pass
    return held


def _bytes_to_write(manifest: Manifest) -> int:
    """The bytes of the rows of `manifest` not recorded as written yet (data files are made sparse:
    these are the bytes the disk still has to find room for)."""
    itemsize = DISK_DTYPES[manifest.dtype].itemsize
    need = 0
    for dims, written in zip(manifest.dims, manifest.written, strict=True):
        missing = manifest.n_rows - sum(stop - start for start, stop in written)
        need += missing * sum(dims) * itemsize
    return need


def _warn_short_of_space(root: Path, manifest: Manifest) -> None:
    """A UserWarning when the file system holding `root` has fewer bytes free (statvfs) than the rows
    still to be written take: a warning, not an error, as space may be freed meanwhile and some file
    systems report their free space oddly. Nothing where there is no statvfs (Windows), it fails, or it
    reports a file system of no blocks at all (FUSE and network ones that keep no count)."""
    statvfs = getattr(os, "statvfs", None)
    if statvfs is None:
        return
    need = _bytes_to_write(manifest)
    try:
        fs = statvfs(root)
    except OSError:
        return
    free = fs.f_bavail * fs.f_frsize
    if need <= free or fs.f_blocks == 0:  # a file system of no size (some FUSE, network ones): no free count
        return
    warnings.warn(
        f"gradient store {root}: its rows still to be written take {need} bytes, but its file system has "
        f"{free} bytes free (the data files are made sparse, so writes fail once the disk is full); free space "
        "on that disk, or use another one. A write that fails for lack of space keeps the rows recorded before "
        "it: rerunning the same call (the export, or GradientStore.create with the same arguments, without "
        "overwrite=True, which starts over) resumes where it stopped",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _check_temporary(path: Path, what: str) -> None:
    """Checks, before any rows are computed, that the temporary at `path`, through which each write()
    replaces the manifest or a range's progress file, can be made: a directory there is a
    StoreFormatError (_refuse_directory); a folder that is read-only (permissions, a read-only mount)
    an OSError (PermissionError for permissions) naming it, instead of one at the first write, after
    that write's rows were computed. The probe file is made and removed at once."""
    _refuse_directory(path)
    try:
        remove_if_present(path)  # a killed writer's leftover
        os.close(create_file(path))
        os.unlink(path)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise type(e)(
            e.errno,
            f"gradient store {path.parent}: its folder is not writable ({e.strerror}), and writing {what} replaces "
            f"{path.name.removesuffix('.tmp')} by rename: make the folder writable to resume, or open the store "
            "with GradientStore.open(path, allow_partial=True) to read the rows written so far",
            str(path.parent),
        ) from e


def _refuse_directory(path: Path) -> None:
    """A StoreFormatError naming `path` if a directory is there: the temporary of a file the writer
    replaces by rename (remove_if_present refuses it, but only at the first write, its rows written)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise StoreFormatError(f"{refusal(path, mode)}; remove it")


def _drop_marker(root: Path) -> None:
    """Removes (durably) the creation marker that a create killed after writing the manifest left
    behind; the store exists, and a marker there would later let a create without overwrite=True
    replace its files if the manifest went missing. Call it holding the exclusive directory lock."""
    if os.path.lexists(root / CREATING):
        remove_if_present(root / CREATING)
        fsync_dir(root)


def _wanted_manifest(n_rows: Any, dims: Any, weights: Any, dtype: Any, factored: Any, metadata: Any) -> Manifest:
    n_rows = positive_int(n_rows, "n_rows")
    factored = flag(factored, "factored")
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        try:  # np.float16, arr.dtype, ml_dtypes.bfloat16 as their names; abstract np.floating has none
            dtype = np.dtype(dtype).name
        except TypeError:
            pass
    if dtype not in DISK_DTYPES:
        raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    per = "(p_c, q_c) pair" if factored else "positive integer d_c"
    if isinstance(dims, np.ndarray):  # one entry per checkpoint, as a list
        dims = dims.tolist()
    if not isinstance(dims, Sequence) or isinstance(dims, str) or not dims:
        raise ValueError(f"dims must be a non-empty list with one {per} per checkpoint, got {dims!r}")
    parsed = []
    for c, d in enumerate(dims):
        entry = tuple(d) if factored and isinstance(d, Sequence) else (d,)
        if len(entry) != (2 if factored else 1) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 for x in entry
        ):
            raise ValueError(f"dims[{c}] must be a {per}, got {d!r}")
        parsed.append(tuple(int(x) for x in entry))
    _check_file_sizes(int(n_rows), parsed, DISK_DTYPES[dtype])
    w = _weights(weights, len(parsed))
    return Manifest(
        n_rows=int(n_rows),
        dtype=dtype,
        factored=factored,
        dims=parsed,
        weights=[float(x) for x in w],
        weights_given=weights is not None,
        metadata=_json_metadata(metadata),
        has_ids=False,
        written=[[] for _ in parsed],
    )


# the largest file offset (off_t): no file of the store may be larger
MAX_FILE_BYTES = 2**63 - 1


def _check_file_sizes(n_rows: int, dims: list[tuple[int, ...]], dtype: np.dtype) -> None:
    """ValueError naming n_rows and dims when a data file (n_rows x d, header included) would be
    larger than a file can be (2**63 - 1 bytes), before any file is made."""
    for c, entry in enumerate(dims):
        for d in entry:
            size = npy_size(dtype, (n_rows, d))
            if size > MAX_FILE_BYTES:
                shown = entry if len(entry) > 1 else d
                raise ValueError(
                    f"n_rows={n_rows} with dims[{c}]={shown!r} makes a {dtype.name} data file of {n_rows} x {d} "
                    f"values, {size} bytes: beyond the {MAX_FILE_BYTES} bytes a file can hold; split the rows "
                    "between stores or project the gradients to fewer columns"
                )


def _json_metadata(metadata: Any) -> dict:
    """metadata as it reads back from JSON (NumPy scalars and arrays become numbers and lists)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")

    def plain(x: Any) -> Any:
        if isinstance(x, (np.generic, np.ndarray)):
            return x.tolist()
        raise TypeError(f"metadata must be JSON-serialisable; {type(x).__name__} is not")

    deepest = MAX_JSON_DEPTH - 1  # the manifest object holds it
    try:
        text = json.dumps(metadata, default=plain, allow_nan=False)
    except RecursionError:
        raise ValueError(f"metadata nests too deeply: a store's manifest allows {deepest} levels") from None
    except (ValueError, TypeError) as e:  # a NaN, a tuple or NumPy key: json's words name neither
        where = None if "Circular reference" in str(e) else _not_json(metadata)
        raise type(e)(f"metadata: {where}" if where is not None else f"metadata: {e}") from None
    depth, containers = json_shape(text)
    if depth > deepest:
        raise ValueError(f"metadata nests {depth} levels deep, but a store's manifest allows {deepest}")
    if containers > MAX_JSON_CONTAINERS // 2:  # the other half: the checkpoints and their written ranges
        raise ValueError(
            f"metadata holds {containers} JSON arrays and objects, but a store's manifest allows "
            f"{MAX_JSON_CONTAINERS // 2} there (of {MAX_JSON_CONTAINERS} in all): keep bulky data beside the store"
        )
    try:
        plain_metadata = json.loads(text, object_pairs_hook=unique_keys)
    except ValueError as e:  # {1: ..., "1": ...}: keys become strings in JSON
        raise ValueError(f"metadata: {e} once its keys are JSON strings") from None
    problem = metadata_problem(plain_metadata)
    if problem is not None:
        raise ValueError(problem)
    return plain_metadata


def _not_json(x: Any, path: str = "") -> str | None:
    """What in `x` (metadata; `path`: where in it, as subscripts) json.dumps(default=plain,
    allow_nan=False) refuses, and where; None if nothing is found. Keys must be str, int, float, bool
    or None (NumPy scalars are not), numbers finite, values JSON types or NumPy scalars / arrays."""
    at = f"at {path}" if path else "at the top level"
    if isinstance(x, dict):
        for k, v in x.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                kind = (
                    type(k).__name__ if type(k).__module__ == "builtins" else f"{type(k).__module__}.{type(k).__name__}"
                )
                return f"key {k!r} {at} is of type {kind}; JSON keys must be str, int, float, bool or None"
            if isinstance(k, float) and not math.isfinite(k):
                return f"key {k!r} {at} is not a finite number; JSON holds finite numbers only"
            found = _not_json(v, f"{path}[{k!r}]")
            if found is not None:
                return found
        return None
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            found = _not_json(v, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(x, (str, bool, int)) or x is None:
        return None
    if isinstance(x, float) or (isinstance(x, (np.generic, np.ndarray)) and x.dtype.kind == "f"):
        if not np.all(np.isfinite(np.asarray(x))):
            return f"the value {at} is {x!r:.80}; JSON holds finite numbers only (store NaN / Inf as a string)"
        return None
    if isinstance(x, (np.generic, np.ndarray)):  # as plain() writes it
        return _not_json(x.tolist(), path)
    return f"the value {at} is of type {type(x).__name__} ({x!r:.60}), not JSON-serialisable"


def _check_ids(ids: Any, n_rows: int) -> np.ndarray | None:
    if ids is None:
        return None
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(f"ids must be a 1-D sequence of {n_rows} entries (one per row), got shape {arr.shape}")
    if not hasattr(ids, "dtype"):  # Python objects: NumPy would make a mix of them strings, or ints floats
        arr = _id_values(ids, arr)
    if arr.dtype.kind not in "iuU":
        raise TypeError(f"ids must be all integers or all strings, got dtype {arr.dtype}")
    if arr.dtype.kind == "U" and not isinstance(ids, np.ndarray):  # an array's strings have lost theirs
        for row, x in enumerate(ids):
            if isinstance(x, str) and x.endswith("\x00"):
                raise ValueError(  # x[:]: a plain str, as np.str_'s repr drops trailing NULs
                    f"ids[{row}] = {short(x[:])} ends with a NUL character, which NumPy's fixed-width strings "
                    "(ids.npy) drop (two ids could become one); give ids without trailing NULs"
                )
    if (bad := unencodable_id(arr)) is not None:
        raise ValueError(f"{bad}: give ids as valid text")
    return arr


def _id_values(ids: Sequence, arr: np.ndarray) -> np.ndarray:
    """`arr` (np.asarray(ids), 1-D) checked against the elements of `ids`: all int (int64, or uint64
    when none is negative) or all str, else a TypeError / ValueError naming the first that is not."""
    accepted = "ids must be all integers (int64, or uint64 if none is negative) or all strings"
    kinds = {_id_kind(t) for t in set(map(type, ids))}  # the types first: a loop over rows is slow
    if len(kinds) != 1 or None in kinds:
        first = None
        for row, x in enumerate(ids):
            zero_d = getattr(x, "ndim", None) == 0 and hasattr(x, "item")  # a 0-d array or tensor
            kind = _id_kind(type(x.item() if zero_d else x))
            if kind is None:
                raise TypeError(f"{accepted}: ids[{row}] = {short(x)} is of type {type(x).__name__}")
            if first is None:
                first = (kind, short(x))
            elif kind != first[0]:
                raise TypeError(
                    f"{accepted}, not a mix: ids[0] = {first[1]} is {first[0]} but ids[{row}] = {short(x)} is {kind}"
                )
        kinds = {first[0]} if first is not None else set()
    if kinds != {"an int"} or arr.dtype.kind in "iu":
        return arr
    values = [int(x) for x in ids]  # some beyond int64, or np.uint64 beside np.int64: NumPy gave float64 or object
    big = next((row for row, v in enumerate(values) if not -(2**63) <= v < 2**63), None)
    if big is None:  # e.g. [np.uint64(1), np.int64(-1)]
        return np.array(values, dtype=np.int64)
    if min(values) >= 0:
        big = next((row for row, v in enumerate(values) if v >= 2**64), None)
        if big is None:
            return np.array(values, dtype=np.uint64)
        raise ValueError(f"{accepted}: ids[{big}] = {short(values[big])} does not fit in uint64 (at most 2**64 - 1)")
    negative = next(row for row, v in enumerate(values) if v < 0)
    raise ValueError(
        f"{accepted}: ids[{big}] = {short(values[big])} does not fit in int64"
        + (f", and ids[{negative}] = {values[negative]} rules out uint64" if values[big] >= 0 else "")
    )


def _id_kind(t: type) -> str | None:
    """ "a str" or "an int" (not a bool) for an id of type `t`, else None."""
    if issubclass(t, str):
        return "a str"
    if issubclass(t, numbers.Integral) and not issubclass(t, (bool, np.bool_)):
        return "an int"
    return None


def _resumable(root: Path, wanted: Manifest, ids: np.ndarray | None, advice: str) -> Manifest:
    """The manifest of the store already at `root`, if it was created with the same spec (else an
    error ending with `advice`)."""
    try:
        existing = read_manifest(root)
    except StoreFormatError as e:
        raise StoreFormatError(f"{e}; {advice}") from None
    differs = []
    for name, ours, theirs in (
        ("n_rows", wanted.n_rows, existing.n_rows),
        ("mode", "factored" if wanted.factored else "full", "factored" if existing.factored else "full"),
        ("dtype", wanted.dtype, existing.dtype),
        ("dims", wanted.dims, existing.dims),
        (
            "weights",
            wanted.weights if wanted.weights_given else None,
            existing.weights if existing.weights_given else None,
        ),
        ("metadata", wanted.metadata, existing.metadata),
    ):
        if ours != theirs:
            differs.append(f"{name} {_show(theirs)} there vs {_show(ours)} here")
    if ids is not None or existing.has_ids:
        try:
            stored = read_ids(root / IDS_FILE, existing.n_rows) if existing.has_ids else None
        except StoreFormatError as e:
            raise StoreFormatError(f"{e}; {advice}") from None
        if stored is None or ids is None or not np.array_equal(stored, ids):
            differs.append(
                "ids "
                + ("absent" if stored is None else "given")
                + " there vs "
                + ("absent" if ids is None else "given" if stored is None else "different")
                + " here"
            )
    if differs:
        raise ValueError(
            f"{root} already holds a gradient store with a different spec ("
            + "; ".join(differs)
            + f"); {advice}"
            + (" or use another path" if advice == _REPLACE else "")
        )
    return existing


def _show(x: Any) -> str:
    if isinstance(x, list) and x and isinstance(x[0], tuple):
        x = [d[0] if len(d) == 1 else list(d) for d in x]
    text = repr(x)
    return text if len(text) <= 200 else text[:200] + "..."


def _resumable_files(root: Path, manifest: Manifest, advice: str) -> DataFiles:
    """The data files of an unfinished store, opened to resume writing; a damaged one (not an OS
    error, which is reported as it is) ends with `advice` (how to start over)."""
    try:
        return DataFiles(root, manifest)
    except StoreFormatError as e:
        raise StoreFormatError(f"{e}; {advice}") from None


def _clearable(root: Path, overwrite: bool, advice: str | None) -> list[str]:
    """Names in `root`, after checking that a new store may replace them: only files a store
    writes (others are refused even with overwrite=True), and without a manifest only the leftovers
    of an interrupted create (marked by CREATING) unless overwrite=True (they could be a user's own
    checkpoint_000.npy), and none a directory (a store never removes one). Every refusal comes here,
    before the marker is made and anything removed: a refused overwrite leaves the old store whole."""
    with os.scandir(root) as entries:
        listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]  # d_type: no stat per file
    names = [n for n, _ in listed]
    foreign = [n for n in names if not is_own_file(n)]
    if foreign and MANIFEST in names:
        raise ValueError(
            f"{root} holds a gradient store, and also {_listing(foreign)}, which a store never writes: "
            "remove those to replace the store, or choose an empty or new directory"
        )
    if foreign:
        raise ValueError(
            f"{root} is not empty and not a gradient store (holds {_listing(foreign)}); "
            "choose an empty or new directory"
        )
    if names and not overwrite and CREATING not in names:
        raise ValueError(
            f"{root} holds {_listing(names)} but no {MANIFEST}, so it is not a store tracin wrote: "
            + (advice or "pass overwrite=True to replace these files, or choose an empty or new directory")
        )
    for n in (n for n, is_dir in listed if is_dir):  # remove_if_present would refuse one halfway, the old manifest gone
        _refuse_directory(root / n)
    return names


def _listing(names: list[str]) -> str:
    return ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
