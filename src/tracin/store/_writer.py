"""Creating, resuming and writing a gradient store (GradientStore.create returns the writer)."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..gradients import _weights
from ._convert import to_store_dtype
from ._format import (
    DISK_DTYPES,
    IDS_FILE,
    MANIFEST,
    Manifest,
    StoreFormatError,
    create_npy,
    fsync_dir,
    is_own_file,
    npy_data_offset,
    read_manifest,
    write_json_atomic,
)

if TYPE_CHECKING:
    from ._store import GradientStore


class GradientStoreWriter:
    """Writes rows of a store, durably: each write() flushes and fsyncs the data, then records the
    rows in the manifest atomically, so a killed process resumes where it stopped.

    One writer per store at a time (enforced with a lock on the directory where the OS has flock);
    not thread-safe. Use it as a context manager or call finalize() / close().
    """

    def __init__(self, path: Path, manifest: Manifest, lock_fd: int | None):
        self.path = path
        self._manifest = manifest
        self._lock_fd = lock_fd
        self._fds: list[list[int]] | None = None
        self._offsets: list[list[int]] = []
        if not manifest.complete:
            self._open_files()

    # -- facts ----------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self._manifest.n_rows

    @property
    def dims(self) -> tuple:
        m = self._manifest
        return tuple(d if m.factored else d[0] for d in m.dims)

    @property
    def dtype(self) -> str:
        return self._manifest.dtype

    @property
    def factored(self) -> bool:
        return self._manifest.factored

    @property
    def n_checkpoints(self) -> int:
        return len(self._manifest.dims)

    def rows_done(self, checkpoint: int) -> int:
        """r such that rows [0, r) of `checkpoint` are durably written."""
        return self._manifest.rows_done(self._checkpoint(checkpoint))

    def missing(self, checkpoint: int) -> list[list[int]]:
        """[start, stop) row ranges of `checkpoint` not written yet."""
        return self._manifest.missing(self._checkpoint(checkpoint))

    @property
    def complete(self) -> bool:
        """True when every row of every checkpoint is written (finalize() may still be due)."""
        return all(not self._manifest.missing(c) for c in range(self.n_checkpoints))

    # -- writing --------------------------------------------------------------------------------
    def write(self, checkpoint: int, start: int, block: Any) -> None:
        """Writes rows [start, start + len(block)) of one checkpoint.

        block: (rows, d_c) array (full) or a (left (rows, p_c), right (rows, q_c)) pair (factored);
        NumPy, torch or JAX, float32 / float16 / bfloat16, converted to the store dtype.
        Rewriting rows already written is allowed (the new values replace the old).
        """
        if self._manifest.complete:
            raise ValueError(f"gradient store {self.path} is finalized; it cannot be written again "
                             "(create it with overwrite=True to start over)")
        if self._fds is None:
            raise ValueError(f"the writer of {self.path} is closed")
        c = self._checkpoint(checkpoint)
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        start = int(start)
        arrays = self._blocks(c, block)
        rows = arrays[0].shape[0]
        if start + rows > self.n_rows:
            raise ValueError(f"rows [{start}, {start + rows}) exceed the store's {self.n_rows} rows")
        if rows == 0:
            return
        for fd, offset, arr in zip(self._fds[c], self._offsets[c], arrays):
            _pwrite_all(fd, arr, offset + start * arr.shape[1] * arr.itemsize)
        for fd in self._fds[c]:
            os.fsync(fd)
        self._manifest.mark_written(c, start, start + rows)
        write_json_atomic(self.path / MANIFEST, self._manifest.to_json())

    def finalize(self) -> "GradientStore":
        """Marks the store complete and returns it opened for reading; ValueError if rows are missing."""
        from ._store import GradientStore

        if not self._manifest.complete:
            if self._fds is None:
                raise ValueError(f"the writer of {self.path} is closed; create() it again to finish it")
            missing = {c: self.missing(c) for c in range(self.n_checkpoints) if self.missing(c)}
            if missing:
                detail = "; ".join(f"checkpoint {c}: rows {_ranges_text(r)}" for c, r in missing.items())
                raise ValueError(f"cannot finalize {self.path}: rows not written yet ({detail})")
            self._manifest.complete = True
            write_json_atomic(self.path / MANIFEST, self._manifest.to_json())
            fsync_dir(self.path)
        self.close()
        return GradientStore.open(self.path)

    def close(self) -> None:
        """Closes the files and releases the lock; progress so far stays on disk."""
        for fds in self._fds or []:
            for fd in fds:
                os.close(fd)
        self._fds = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "GradientStoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __repr__(self) -> str:
        done = [self.rows_done(c) for c in range(self.n_checkpoints)]
        return (f"GradientStoreWriter({str(self.path)!r}, n_rows={self.n_rows}, dims={list(self.dims)}, "
                f"dtype={self.dtype!r}, rows_done={done})")

    # -- helpers --------------------------------------------------------------------------------
    def _open_files(self) -> None:
        m = self._manifest
        self._fds, self._offsets = [], []
        for c, names in enumerate(m.files):
            shapes = [(m.n_rows, d) for d in m.dims[c]]
            self._offsets.append([npy_data_offset(self.path / n, DISK_DTYPES[m.dtype], s)
                                  for n, s in zip(names, shapes)])
            self._fds.append([os.open(self.path / n, os.O_RDWR) for n in names])

    def _checkpoint(self, checkpoint: int) -> int:
        if (isinstance(checkpoint, bool) or not isinstance(checkpoint, numbers.Integral)
                or not 0 <= checkpoint < self.n_checkpoints):
            raise ValueError(f"checkpoint must be an integer in [0, {self.n_checkpoints}), "
                             f"got {checkpoint!r}")
        return int(checkpoint)

    def _blocks(self, c: int, block: Any) -> list[np.ndarray]:
        m = self._manifest
        if m.factored:
            if not isinstance(block, (tuple, list)) or len(block) != 2:
                raise TypeError("block must be a (left, right) pair of arrays for a factored store, "
                                f"got {type(block).__name__}")
            arrays = [to_store_dtype(b, m.dtype, f"block[{i}]") for i, b in enumerate(block)]
            if arrays[0].shape[0] != arrays[1].shape[0]:
                raise ValueError(f"left has {arrays[0].shape[0]} rows but right has {arrays[1].shape[0]}")
        else:
            arrays = [to_store_dtype(block, m.dtype, "block")]
        for i, (arr, d) in enumerate(zip(arrays, m.dims[c])):
            if arr.shape[1] != d:
                what = ("left", "right")[i] if m.factored else "block"
                raise ValueError(f"{what} has {arr.shape[1]} columns but checkpoint {c} has {d}")
        return arrays


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    data = memoryview(arr.reshape(-1).view(np.uint8))
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _ranges_text(ranges: list[list[int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)


# -- create / resume ---------------------------------------------------------------------------------

def create(path: str | os.PathLike, n_rows: int, dims: Sequence, weights: Sequence[float] | None = None,
           dtype: str = "float32", *, factored: bool = False, metadata: dict | None = None,
           ids: Sequence | np.ndarray | None = None, overwrite: bool = False) -> GradientStoreWriter:
    """See GradientStore.create."""
    wanted = _wanted_manifest(n_rows, dims, weights, dtype, factored, metadata)
    id_array = _check_ids(ids, wanted.n_rows)
    wanted.has_ids = id_array is not None
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(root)
    try:
        if (root / MANIFEST).exists() and not overwrite:
            return GradientStoreWriter(root, _resumable(root, wanted, id_array), lock_fd)
        _clear(root)
        for c, names in enumerate(wanted.files):
            for name, d in zip(names, wanted.dims[c]):
                create_npy(root / name, DISK_DTYPES[wanted.dtype], (wanted.n_rows, d))
        if id_array is not None:
            with open(root / IDS_FILE, "wb") as f:
                np.save(f, id_array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(root)
        write_json_atomic(root / MANIFEST, wanted.to_json())  # last: the store exists from here on
        fsync_dir(root)
        return GradientStoreWriter(root, wanted, lock_fd)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise


def _wanted_manifest(n_rows: Any, dims: Any, weights: Any, dtype: Any, factored: Any,
                     metadata: Any) -> Manifest:
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive integer, got {n_rows!r}")
    if not isinstance(factored, bool):
        raise TypeError(f"factored must be True or False, got {factored!r}")
    if dtype not in DISK_DTYPES:
        raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    per = "(p_c, q_c) pair" if factored else "positive integer d_c"
    if not isinstance(dims, Sequence) or isinstance(dims, str) or not dims:
        raise ValueError(f"dims must be a non-empty list with one {per} per checkpoint, got {dims!r}")
    parsed = []
    for c, d in enumerate(dims):
        entry = tuple(d) if factored and isinstance(d, Sequence) else (d,)
        if len(entry) != (2 if factored else 1) or not all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 for x in entry):
            raise ValueError(f"dims[{c}] must be a {per}, got {d!r}")
        parsed.append(tuple(int(x) for x in entry))
    w = _weights(weights, len(parsed))
    return Manifest(n_rows=int(n_rows), dtype=dtype, factored=factored, dims=parsed,
                    weights=[float(x) for x in w], weights_given=weights is not None,
                    metadata=_json_metadata(metadata), has_ids=False, written=[[] for _ in parsed])


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

    return json.loads(json.dumps(metadata, default=plain, allow_nan=False))


def _check_ids(ids: Any, n_rows: int) -> np.ndarray | None:
    if ids is None:
        return None
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(f"ids must be a 1-D sequence of {n_rows} entries (one per row), got shape {arr.shape}")
    if arr.dtype.kind not in "iuU":
        raise TypeError(f"ids must be integers or strings, got dtype {arr.dtype}")
    return arr


def _lock(root: Path) -> int | None:
    """An exclusive flock on the store directory, held by the writer (None where there is no flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"gradient store {root} is being written by another writer (in this or "
                           "another process); close that writer first") from None
    return fd


def _resumable(root: Path, wanted: Manifest, ids: np.ndarray | None) -> Manifest:
    """The manifest of the store already at `root`, if it was created with the same spec."""
    try:
        existing = read_manifest(root)
    except StoreFormatError as e:
        raise StoreFormatError(f"{e}; pass overwrite=True to replace it") from None
    differs = []
    for name, ours, theirs in (
        ("n_rows", wanted.n_rows, existing.n_rows),
        ("mode", "factored" if wanted.factored else "full", "factored" if existing.factored else "full"),
        ("dtype", wanted.dtype, existing.dtype),
        ("dims", wanted.dims, existing.dims),
        ("weights", wanted.weights if wanted.weights_given else None,
         existing.weights if existing.weights_given else None),
        ("metadata", wanted.metadata, existing.metadata),
    ):
        if ours != theirs:
            differs.append(f"{name} {_show(theirs)} there vs {_show(ours)} here")
    if ids is not None or existing.has_ids:
        stored = np.load(root / IDS_FILE, allow_pickle=False) if existing.has_ids else None
        if stored is None or ids is None or not np.array_equal(stored, ids):
            differs.append("ids " + ("absent" if stored is None else "given") + " there vs "
                           + ("absent" if ids is None else "given" if stored is None else "different")
                           + " here")
    if differs:
        raise ValueError(f"{root} already holds a gradient store with a different spec ("
                         + "; ".join(differs) + "); pass overwrite=True to replace it or use another path")
    for c, names in enumerate(existing.files):  # the files must still be intact to resume into
        for name, d in zip(names, existing.dims[c]):
            try:
                npy_data_offset(root / name, DISK_DTYPES[existing.dtype], (existing.n_rows, d))
            except StoreFormatError as e:
                raise StoreFormatError(f"{e}; pass overwrite=True to replace the store") from None
    return existing


def _show(x: Any) -> str:
    if isinstance(x, list) and x and isinstance(x[0], tuple):
        x = [d[0] if len(d) == 1 else list(d) for d in x]
    return repr(x)


def _clear(root: Path) -> None:
    """Removes the files of an old store (overwrite) or of an interrupted create; refuses to touch
    a directory holding anything else."""
    names = [p.name for p in root.iterdir()]
    foreign = [n for n in names if not is_own_file(n)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(f"{root} is not empty and not a gradient store (holds {shown}); "
                         "choose an empty or new directory")
    # The manifest goes first: from then on the leftovers read as an interrupted create.
    for n in sorted(names, key=lambda n: n != MANIFEST):
        (root / n).unlink()
    fsync_dir(root)
