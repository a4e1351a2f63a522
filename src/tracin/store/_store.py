"""GradientStore: a gradient set on disk, read in memory-mapped (or, for many files, read) row chunks."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _tunables
from .._arrays import DTYPE_CODES
from .._validate import flag, positive_int
from ..gradients import GradientSet, KernelSide
from ._create import create
from ._files import open_file, read_manifest_bytes, store_root
from ._format import (
    DISK_DTYPES,
    FORMAT_VERSION,
    IDS_FILE,
    MANIFEST,
    Manifest,
    StoreChangedError,
    StoreFormatError,
    merge_ranges,
    parse_manifest,
    printable,
)
from ._locks import range_files
from ._npy import check_npy, map_array, open_ids, read_array, read_ids, unencodable_id
from ._ranges import read_progress
from ._writer import GradientStoreWriter

try:
    import resource
except ImportError:  # no RLIMIT_NOFILE on this OS
    resource = None  # type: ignore[assignment]

DEFAULT_CHUNK_BYTES = _tunables.STORE_CHUNK_BYTES


@dataclass(frozen=True)
class _DataFile:
    """A data file of an opened store: where its data starts, and its size and identity then:
    (device, inode, modification time), the time only for a finished store (a writer may still be
    writing an unfinished one)."""

    name: str
    offset: int
    size: int
    identity: tuple[int, int, int | None]

    @staticmethod
    def identify(st: os.stat_result, finished: bool) -> tuple[int, int, int | None]:
        return st.st_dev, st.st_ino, st.st_mtime_ns if finished else None

    @classmethod
    def inspect(cls, root: Path, name: str, dtype: np.dtype, shape: tuple[int, int], finished: bool) -> _DataFile:
        """Checks the file (a regular file, header and size as the manifest implies) and records it."""
        path = root / name
        try:
            fd = open_file(path)
        except FileNotFoundError:
            raise StoreFormatError(f"{path}: data file is missing") from None
        try:
            offset = check_npy(fd, path, dtype, shape)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return cls(name, offset, st.st_size, cls.identify(st, finished))

    def open_unchanged(self, root: Path) -> int:
        """Read descriptor of the file, after checking that it is the same file of the same size as at
        opening (StoreChangedError otherwise: mapping a file that became shorter would kill the
        process with SIGBUS when the kernel reads past its end)."""
        path = root / self.name
        try:
            fd = open_file(path)
        except FileNotFoundError:
            raise StoreChangedError(f"{path} was removed after the gradient store was opened; open it again") from None
        try:
            st = os.fstat(fd)
            if st.st_size != self.size:
                raise StoreChangedError(
                    f"{path} is {st.st_size} bytes now but was {self.size} when the gradient store was "
                    "opened (truncated or extended by another process); refusing to map it, since reading past "
                    "the end of a mapped file kills the process (SIGBUS)"
                )
            if self.identify(st, self.identity[2] is not None) != self.identity:
                raise StoreChangedError(
                    f"{path} was replaced or modified after the gradient store was opened; open it again"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd


@dataclass(frozen=True)
class _IdsFile(_DataFile):
    """The ids file of an opened store, checked whole at opening (read_ids), with the dtype of its ids.
    Its modification time counts for an unfinished store too: ids.npy is written once, at create."""

    dtype: np.dtype

    @classmethod
    def inspect_ids(cls, root: Path, n_rows: int) -> _IdsFile:
        ids, offset, st = open_ids(root / IDS_FILE, n_rows)
        return cls(IDS_FILE, offset, st.st_size, cls.identify(st, True), ids.dtype)


class GradientStore(GradientSet):
    """Per-example gradients on disk (docs/format.md), usable wherever Gradients are.

    Never loaded whole: the scoring functions ask for rows in chunks of about `chunk_bytes`
    (row_chunks()), each memory-mapped for one kernel call and unmapped after, so peak memory
    stays bounded for stores larger than RAM. A store of more data files than an eighth of the
    limit on open files is read into memory per chunk instead (each map holds a descriptor, and
    scoring holds up to 5 chunks at once): its peak memory is then a few chunks, about 3x
    chunk_bytes for self_influence and up to 5x for a store scored against itself. A
    store can be a view of a contiguous row range of the files (shard(), slicing); row indices are
    then relative to the view.

    Before each chunk it checks that the store is still the one it opened (the manifest's store id,
    each file's device and inode) and that no file changed size, so a store re-created or truncated
    between chunks is an error (StoreChangedError), not stale or zero scores. A file truncated while
    a chunk of it is mapped (during a kernel call) can still kill the process with SIGBUS (see
    docs/format.md): do not truncate or rewrite the files of a store that is being read.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        files: list[_DataFile],
        start: int,
        stop: int,
        allow_partial: bool,
        chunk_bytes: int,
        seen: bytes,
        ids_file: _IdsFile | None,
        from_row_0: list[int],
        past_usable: list[int],
    ):
        """`seen`: the bytes of a manifest.json found to hold this store's id (at first, `manifest`'s);
        `ids_file`: the ids file as checked at opening (None for a store without ids); per checkpoint at
        opening, `from_row_0`: the rows written from row 0 on, and `past_usable`: the rows range writers'
        progress files recorded past the usable prefix (see info())."""
        self.path = path
        self._manifest = manifest
        self._seen = seen
        self._files = files  # in kernel block order
        self._ids_file = ids_file
        self._start, self._stop = start, stop
        self._allow_partial = allow_partial
        self._chunk_bytes = chunk_bytes
        self._from_row_0 = from_row_0
        self._past_usable = past_usable
        self.factored = manifest.factored
        self.weights = np.asarray(manifest.weights, dtype=np.float64)
        self.weights_given = manifest.weights_given
        self.metadata = manifest.metadata

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        n_rows: int,
        dims: Sequence,
        weights: Sequence[float] | None = None,
        dtype: str = "float32",
        *,
        factored: bool = False,
        metadata: dict | None = None,
        ids: Sequence | np.ndarray | None = None,
        overwrite: bool = False,
        rows: tuple[int, int] | None = None,
    ) -> GradientStoreWriter:
        """A writer for a new store at `path` (a directory, created if needed), or for the store
        already there if it has the same spec, to resume writing it.

        n_rows: rows (examples); dims: per checkpoint d_c (full) or (p_c, q_c) (factored=True); weights: per checkpoint
        learning rate (default 1 each); dtype: "float32", "float16" or "bfloat16" (float16 keeps its precision
        only for |x| >= 2**-14 ~ 6.1e-5: rows whose values are all smaller keep fewer bits or become zero, a
        RuntimeWarning once per writer; bfloat16 has nearly float32's range); metadata: JSON-serialisable
        provenance (layers, projection, ...), nested at most 63 levels, its "preconditioner" (null or {"kind": str,
        ...}) beside a "mode" and "params" (a list of {"name": str, ...}) beside a "framework" as the adapters record
        them, since scoring compares them (a ValueError otherwise: docs/format.md); ids: one per row, all ints (int64,
        or uint64 if none is negative) or all str (a mix, floats or bools are a TypeError naming the first). An
        unfinished store with the same spec is reopened (see writer.rows_done), a finished one gives a writer whose
        .complete is True; a different spec is a ValueError naming what differs, unless overwrite=True, which replaces
        the old store. A folder holding anything but a store's files is refused; one holding files named like a store's
        but no manifest (e.g. your own checkpoint_000.npy) is refused unless overwrite=True. A store that another writer
        holds is a RuntimeError: at once if that writer is in this process, after trying again for 2 s if in another (a
        child forked just before a close may hold it briefly). Only the writer's finalize() finishes the store, so
        that it can be scored: leaving a `with` block, like close(), does not, even with every row written. The data
        files are made sparse: when the file system has fewer bytes free (statvfs) than the rows still to write take,
        a UserWarning says so (once per call; none where there is no statvfs, as on Windows); a write that then
        finds the disk full keeps the rows recorded before it, and this call, repeated (without overwrite=True), resumes
        after them.

        rows=(start, stop): a GradientStoreRangeWriter of rows [start, stop) only, of the store that
        must already be at `path` with this spec: several may write disjoint ranges at once, in
        processes or machines sharing the file system (a distributed export), each resuming its
        range after a crash. Create the store first (this call without rows=, then close()); once
        every range is written, this call without rows= again merges their progress and its
        finalize() finishes the store (a ValueError naming the rows still missing otherwise).
        """
        return create(
            path,
            n_rows,
            dims,
            weights,
            dtype,
            factored=factored,
            metadata=metadata,
            ids=ids,
            overwrite=overwrite,
            rows=rows,
            open_store=cls.open,
        )

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, allow_partial: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> GradientStore:
        """Opens the store at `path` after checking the manifest against the files.

        An unfinished store opens, but scoring it raises unless allow_partial=True, which exposes
        the rows written so far for every checkpoint (a prefix), counting those that range writers
        (GradientStore.create(..., rows=), a distributed export) record in their progress files, read
        only; rows they record past the prefix (after rows not yet written) are a UserWarning, as is a
        malformed progress file (its range is then left out). chunk_bytes: bytes of rows
        (all checkpoints together) mapped per kernel call; a store read into memory instead (many
        files) costs about 3x chunk_bytes in self_influence, up to 5x scored against itself
        (scoring holds up to 5 chunks at once). A malformed manifest or file, or a
        symbolic link in the store, is a StoreFormatError; an OS error (e.g. permission denied)
        is raised as the OSError it is, naming the file. The ids file, if any, is read whole once,
        to check that UTF-8 can encode every id: its cost grows with rows x the longest id (read_ids);
        `.ids` of the store or a view then checks only its own rows.
        """
        allow_partial = flag(allow_partial, "allow_partial")
        chunk_bytes = positive_int(chunk_bytes, "chunk_bytes")
        root = store_root(path)  # absolute: the files are opened again per call, a later chdir must not matter
        seen = read_manifest_bytes(root)
        m = parse_manifest(seen, str(root / MANIFEST))
        try:
            files = [
                _DataFile.inspect(root, name, DISK_DTYPES[m.dtype], (m.n_rows, d), m.complete)
                for c, names in enumerate(m.files)
                for name, d in zip(names, m.dims[c], strict=True)
            ]
            ids_file = _IdsFile.inspect_ids(root, m.n_rows) if m.has_ids else None
        except (StoreFormatError, FileNotFoundError) as e:  # a file missing or half-made: re-created meanwhile?
            if (change := _recreated(root, seen, m.store_id)) is not None:
                raise StoreChangedError(
                    f"gradient store {root} was re-created while it was being opened ({change}); open it again"
                ) from e
            raise
        stop, from_row_0, past_usable = m.n_rows, [m.rows_done(c) for c in range(len(m.dims))], [0] * len(m.dims)
        if allow_partial and not m.complete:
            stop, from_row_0, past_usable = _partial_rows(root, m)
            if any(past_usable):
                warnings.warn(
                    rows_past_usable_warning(root, stop, past_usable, _layers_per_checkpoint(m)),
                    UserWarning,
                    stacklevel=2,
                )
        return cls(root, m, files, 0, stop, allow_partial, chunk_bytes, seen, ids_file, from_row_0, past_usable)

    # -- GradientSet ----------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self._stop - self._start

    @property
    def dims(self) -> tuple:
        return tuple(d if self.factored else d[0] for d in self._manifest.dims)

    @property
    def dtype(self) -> str:
        return self._manifest.dtype

    @property
    def complete(self) -> bool:
        """Whether the writer finalized the store (all rows written)."""
        return self._manifest.complete

    @property
    def store_id(self) -> str | None:
        """The random identity the store was created with (docs/format.md; None for stores written
        before ids were recorded): another store at the same path has another id."""
        return self._manifest.store_id

    @property
    def allow_partial(self) -> bool:
        """Whether the store was opened with allow_partial=True."""
        return self._allow_partial

    @property
    def chunk_bytes(self) -> int:
        """Bytes of rows (all checkpoints together) mapped per kernel call."""
        return self._chunk_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one row over all checkpoints (and factors)."""
        return sum(sum(d) for d in self._manifest.dims) * DISK_DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of gradient data in this view."""
        return self.n_rows * self.row_bytes

    def row_chunks(self) -> int:
        return max(1, self._chunk_bytes // self.row_bytes)

    def kernel_side(self, start: int = 0, stop: int | None = None) -> KernelSide:
        """Read-only arrays of rows [start, stop) of this view, for one kernel call: memory-mapped (the
        mapping is released when they are dropped), or read for a store of many files
        (_mappable_files). StoreChangedError if the store was re-created, replaced or resized since
        it was opened."""
        if not (self.complete or self._allow_partial):
            done = [self._manifest.rows_done(c) for c in range(self.n_checkpoints)]
            if all(d == self._manifest.n_rows for d in done):
                raise ValueError(
                    f"gradient store {self.path} is unfinished: every row is written (per checkpoint: {done} of "
                    f"{self._manifest.n_rows}) but the store was never finalized; call "
                    "GradientStore.create(<the same arguments>).finalize(), or rerun the export that wrote it"
                )
            raise ValueError(
                f"gradient store {self.path} is unfinished (rows usable from row 0, per checkpoint: {done} of "
                f"{self._manifest.n_rows}); finish writing it (GradientStore.create with the same "
                "arguments resumes), or open it with allow_partial=True to use the rows written so far"
            )
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside the store's {self.n_rows} rows")
        disk = DISK_DTYPES[self.dtype]
        first, rows = self._start + start, stop - start
        columns = [d for dims in self._manifest.dims for d in dims]
        if rows == 0:
            return KernelSide(
                self.factored,
                [np.empty((0, cols), dtype=disk) for cols in columns],
                [DTYPE_CODES[self.dtype]] * len(columns),
            )
        ahead = min(rows, self._stop - (self._start + stop))  # rows the next chunk will likely read, in this view
        blocks = []
        read = len(self._files) > _mappable_files()
        try:
            for file, cols in zip(self._files, columns, strict=True):  # one open file at a time
                fd = file.open_unchanged(self.path)
                try:
                    at = file.offset + first * cols * disk.itemsize
                    _read_ahead(fd, at, (rows + ahead) * cols * disk.itemsize)
                    if read:
                        blocks.append(read_array(fd, disk, at, (rows, cols), self.path / file.name))
                    else:
                        blocks.append(map_array(fd, disk, at, (rows, cols), self.path / file.name))
                finally:
                    os.close(fd)
        except StoreChangedError:
            self._check_same_store()  # a store re-created at the path is the error to report
            raise
        # After the files are opened, so the files mapped are this store's (a store re-created at the
        # path removes the manifest before its files, and writes its own manifest after them).
        self._check_same_store()
        return KernelSide(self.factored, blocks, [DTYPE_CODES[self.dtype]] * len(blocks))

    def _check_same_store(self) -> None:
        """StoreChangedError unless manifest.json holds this store's id. Bytes seen before (a finished
        store's manifest never changes) are not parsed again: the same bytes hold the same id."""
        try:
            data = read_manifest_bytes(self.path)
        except FileNotFoundError:
            raise StoreChangedError(
                f"gradient store {self.path} was removed after it was opened (no {MANIFEST} now)"
            ) from None
        if data == self._seen:
            return
        now = parse_manifest(data, str(self.path / MANIFEST)).store_id
        if now == self._manifest.store_id:
            self._seen = data
        else:
            raise StoreChangedError(
                f"gradient store {self.path} was re-created after it was opened (store "
                f"id {self._manifest.store_id} then, {now} now); open it again"
            )

    def _check_unchanged(self) -> None:
        """StoreChangedError if the store was re-created, or a file of it removed, resized or replaced,
        since it was opened (each file opened and closed again); else nothing."""
        self._check_same_store()
        for file in self._files:
            os.close(file.open_unchanged(self.path))

    # -- views ----------------------------------------------------------------------------------
    def shard(self, i: int, n: int) -> GradientStore:
        """The i-th of n contiguous, near-equal row ranges (rows [i*N//n, (i+1)*N//n))."""
        for name, v in (("n", n), ("i", i)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"shard needs n >= 1 and 0 <= i < n, got i={i}, n={n}")
        return self[i * self.n_rows // n : (i + 1) * self.n_rows // n]

    def shard_offset(self) -> int:
        """First row of this view in the whole store (e.g. the offsets for merge_top_k)."""
        return self._start

    def __getitem__(self, rows: slice) -> GradientStore:
        """A view of a contiguous range of rows (step 1), e.g. store[1000:2000]."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("gradient stores can be sliced by contiguous row ranges only, e.g. s[10:20]")
        a, b, _ = rows.indices(self.n_rows)
        return type(self)(
            self.path,
            self._manifest,
            self._files,
            self._start + a,
            self._start + max(a, b),
            self._allow_partial,
            self._chunk_bytes,
            self._seen,
            self._ids_file,
            self._from_row_0,
            self._past_usable,
        )

    @property
    def ids(self) -> np.ndarray | None:
        """Example ids of the rows in this view (int or str, memory-mapped, read-only), or None if none were given.

        Opening checked the whole ids file (GradientStore.open); this maps and checks only the view's
        rows, after checking that the file is the one opened (same device, inode, size and modification
        time). StoreChangedError if it is not (naming an id UTF-8 cannot encode, if the file now holds
        one), or if a row of the view now holds such an id (the file changed in place unnoticed)."""
        f = self._ids_file
        if f is None:
            return None
        path = self.path / IDS_FILE
        try:
            fd = f.open_unchanged(self.path)
        except StoreChangedError as changed:
            self._check_same_store()  # a re-created store is the error to report
            try:
                read_ids(path, self._manifest.n_rows)  # what is wrong with the file now (missing, unencodable)
            except StoreFormatError as e:
                raise StoreChangedError(
                    f"{e}; it was valid when the gradient store was opened: open it again"
                ) from None
            except OSError:
                pass
            raise changed from None  # a valid file, but another one
        try:
            ids = map_array(fd, f.dtype, f.offset + self._start * f.dtype.itemsize, (self.n_rows,), path)
        finally:
            os.close(fd)
        if (bad := unencodable_id(ids, self._start)) is not None:
            self._check_same_store()
            raise StoreChangedError(
                f"{path}: {bad}; it was valid when the gradient store was opened (changed in place since, "
                "keeping its size and modification time): open it again"
            )
        self._check_same_store()  # after mapping: the ids mapped are this store's (see kernel_side)
        return ids

    # -- description ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Facts about the whole store (not just this view), as plain Python values."""
        m = self._manifest
        files = [self.path / MANIFEST] + [self.path / n for names in m.files for n in names]
        if m.has_ids:
            files.append(self.path / IDS_FILE)
        try:
            stats = [os.lstat(f) for f in files]
        except FileNotFoundError as e:
            self._check_same_store()  # re-created or removed: that is the error
            raise StoreChangedError(
                f"{e.filename} was removed after the gradient store was opened; open it again"
            ) from None
        return {
            "path": str(self.path),
            "format_version": FORMAT_VERSION,
            "complete": m.complete,
            "rows": m.n_rows,
            "rows_written": [m.rows_done(c) for c in range(len(m.dims))],  # the prefix manifest.json records
            # rows written from row 0 on: rows_written, and opened with allow_partial=True, range writers' rows
            # after it (the rows usable are the fewest of these: the same rows must be there for every checkpoint)
            "rows_from_row_0": list(self._from_row_0),
            # opened with allow_partial=True: rows range writers' progress files record past the usable prefix
            "rows_past_usable": list(self._past_usable),
            "rows_recorded": [sum(b - a for a, b in m.written[c]) for c in range(len(m.dims))],  # anywhere
            "checkpoints": len(m.dims),
            "layers_per_checkpoint": _layers_per_checkpoint(m),
            "mode": "factored" if m.factored else "full",
            "dims": [list(d) if m.factored else d[0] for d in m.dims],
            "weights": list(m.weights),
            "weights_given": m.weights_given,
            "dtype": m.dtype,
            "file_bytes": sum(s.st_size for s in stats),
            "disk_bytes": sum(getattr(s, "st_blocks", s.st_size // 512) * 512 for s in stats),
            "ids": m.has_ids,
            "range_writers": sorted({(a, b) for _, a, b, _ in range_files(self.path)}),
            "metadata": m.metadata,
        }

    def describe(self) -> str:
        """A few human-readable lines: rows, checkpoints, dims, dtype, size on disk, complete or not, and what
        an export recorded of its rows (_export_lines: preconditioner, projection, parameters and their modules).
        Strings from the store (metadata keys; also the path) are shown safe for a terminal: a key with a
        control character (ESC, BEL, newline), line separator, lone surrogate or bidi control (U+202E)
        as its repr, '\\x1b[2J'."""
        i = self.info()
        if i["complete"]:
            state = "yes"
        else:
            layers = i["layers_per_checkpoint"]
            per = "per checkpoint" if layers == 1 else f"per factor pair ({layers} layers per checkpoint)"
            state = f"no (rows recorded {per}: {_first(i['rows_recorded'])})"
        ids = "yes (ids.npy)" if i["ids"] else f"no (rows are named by their index 0..{i['rows'] - 1})"
        lines = [
            f"gradient store  {printable(i['path'])}  (format v{i['format_version']})",
            f"complete        {state}",
            f"rows            {i['rows']}",
            f"checkpoints     {_checkpoints_text(i)}",
            f"mode            {i['mode']}",
            f"dims            {_dims_text(i)}",
            f"dtype           {i['dtype']}",
            f"size on disk    {_human(i['disk_bytes'])} (files {_human(i['file_bytes'])})",
            f"ids             {ids}",
        ]
        if i["range_writers"]:
            spans = _first(i["range_writers"], lambda r: f"[{r[0]}, {r[1]})")
            lines.append(
                f"range writers   {len(i['range_writers'])} with files (rows {spans}); their progress is "
                "merged into the counts above when the store is next opened to write the whole of it"
            )
        lines += _export_lines(i["metadata"], i["mode"])
        if i["metadata"]:
            lines.append(f"metadata        {_first(sorted(i['metadata']), _key_text)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        view = (
            "" if (self._start, self._stop) == (0, self._manifest.n_rows) else f", rows=[{self._start}, {self._stop})"
        )
        return (
            f"GradientStore({str(self.path)!r}, n_rows={self.n_rows}, dims={list(self.dims)}, "
            f"dtype={self.dtype!r}, complete={self.complete}{view})"
        )


def _recreated(root: Path, seen: bytes, store_id: str | None) -> str | None:
    """How the store at `root`, whose manifest was `seen` (holding `store_id`), was re-created or
    removed since (its manifest gone, unreadable as a store's, or holding another id); None if not."""
    try:
        now = read_manifest_bytes(root)
    except FileNotFoundError:
        return f"no {MANIFEST} now"
    except (OSError, ValueError):
        return None  # not a sign of re-creation: the first error stands
    if now == seen:
        return None
    try:
        now_id = parse_manifest(now, str(root / MANIFEST)).store_id
    except StoreFormatError:
        return None
    return None if now_id == store_id else f"store id {store_id} then, {now_id} now"


def rows_past_usable_warning(root: Path, usable: int, past: list[int], layers: int = 1) -> str:
    """The UserWarning GradientStore.open(allow_partial=True) gives for the rows `past` (per slot: checkpoint,
    or factor pair of a factored store of `layers` > 1 layers per checkpoint) that range writers record past
    the `usable` rows of the store at `root`."""
    per, each = (
        ("checkpoint", "checkpoint")
        if layers == 1
        else (f"factor pair ({layers} layers per checkpoint)", "factor pair")
    )
    return (
        f"gradient store {root}: range writers record rows past the {usable} usable from row 0 (per "
        f"{per}: {_first(past)} more), after rows not yet written for every {each}: they "
        "become usable once the rows before them are written (let the export finish, or rerun it to "
        "resume); merging alone does not make them usable"
    )


def _partial_rows(root: Path, m: Manifest) -> tuple[int, list[int], list[int]]:
    """For allow_partial=True on an unfinished store: r such that rows [0, r) are written for every
    checkpoint, by manifest.json or by the range writers' progress files in `root` (read only: the
    writers sync a block's data before their progress file records it), per checkpoint the rows written
    from row 0 on (r is the fewest), and per checkpoint the rows those files record from r on. A progress
    file that is malformed or cannot be read is a UserWarning naming it, and left out."""
    ranged: list[list[list[int]]] = [[] for _ in m.dims]
    for name, start, stop, kind in range_files(root):
        if kind != "json":
            continue
        try:
            progress = read_progress(root, m, start, stop)
        except (StoreFormatError, OSError) as e:
            warnings.warn(
                f"{e}; GradientStore.open(allow_partial=True) leaves out the rows {name} records",
                UserWarning,
                stacklevel=3,
            )
            continue
        if progress is not None:  # None: merged and removed meanwhile (manifest.json, read before, lacks them)
            for c, ranges in enumerate(progress.written):
                ranged[c].extend(ranges)
    from_row_0 = []
    for c, written in enumerate(m.written):
        merged = merge_ranges([*written, *ranged[c]])
        from_row_0.append(merged[0][1] if merged and merged[0][0] == 0 else 0)
    usable = min(from_row_0, default=m.n_rows)
    past = [sum(max(0, b - max(a, usable)) for a, b in merge_ranges(r)) for r in ranged]
    return usable, from_row_0, past


def describe(path: str | os.PathLike) -> str:
    """describe() of the store at `path`, finished or not (what `tracin info PATH` prints)."""
    return GradientStore.open(path).describe()  # describe() reads only the manifest and lists range files


def _layers_per_checkpoint(m: Manifest) -> int:
    """L when a factored store holds L factor pairs (layers) per checkpoint: the torch adapter's
    mode="factored" records one fingerprint per real checkpoint in metadata["fingerprints"]["checkpoints"]
    and stores checkpoint c, layer l at slot c * L + l. 1 otherwise."""
    fingerprints = m.metadata.get("fingerprints")
    digests = fingerprints.get("checkpoints") if isinstance(fingerprints, dict) else None
    if not m.factored or not isinstance(digests, list) or not digests or len(m.dims) % len(digests):
        return 1
    return len(m.dims) // len(digests)


def _checkpoints_text(i: dict[str, Any]) -> str:
    """`5 x 2 layers  (10 factor pairs; weights ...)`, or `10  (weights ...)`: one weight per
    checkpoint where its layers share it, else one per slot."""
    slots, layers, weights = i["checkpoints"], i["layers_per_checkpoint"], i["weights"]
    if layers > 1 and all(len(set(weights[c : c + layers])) == 1 for c in range(0, slots, layers)):
        weights = weights[::layers]
    shown = f"weights {_first(weights, lambda w: f'{w:g}')}{'' if i['weights_given'] else ', the default'}"
    if layers == 1:
        return f"{slots}  ({shown})"
    return f"{slots // layers} x {layers} layers  ({slots} factor pairs; {shown})"


# describe() lists at most this many metadata keys, range writers, checkpoints' weights, dims or counts,
# then says how many more there are (a store from elsewhere may hold 300000 keys, 50000 stale range
# files or 300000 checkpoints: one line of megabytes).
_LISTED = 20


def _first(items: Sequence[Any], show: Callable[[Any], str] = str) -> str:
    """The first _LISTED of `items` as `show` writes them, joined by ', ', then ', ... and N more'."""
    more = len(items) - _LISTED
    return ", ".join(map(show, items[:_LISTED])) + (f", ... and {more} more" if more > 0 else "")


def _key_text(key: str, limit: int = 80) -> str:
    """A metadata key as describe() shows it: as it is, or as its repr where it holds a character that
    could drive a terminal (printable()), cut to `limit` characters and '...' (a key may be megabytes)."""
    head = key[: limit + 1]
    text = head if printable(head) == head else repr(head)
    return text if len(text) <= limit else text[:limit] + "..."


# describe() names at most this many parameters, modules and layers= patterns, then says how many more
_NAMED = 4


def _export_lines(metadata: dict[str, Any], mode: str) -> list[str]:
    """describe()'s lines on what an export recorded (tracin._export.metadata): the preconditioner (kind, and
    whether an optimizer state was used), the projection (kind, dim, seed) and the parameters the rows hold and
    the modules owning them (counts, the first few names; not the factored layers of "checkpoints", which are
    slots). A record absent (an older store, one written from NumPy or by hand) or not of the form the adapters
    write gives no line: nothing is said of it rather than something false. mode: the store's, "full" or
    "factored"."""
    lines = []
    shown = _preconditioner_text(metadata, mode) if "preconditioner" in metadata else None
    if shown is not None:
        lines.append(f"preconditioner  {shown}")
    shown = _projection_text(metadata["projection"]) if "projection" in metadata else None
    if shown is not None:
        lines.append(f"projection      {shown}")
    params = metadata.get("params")
    if (
        isinstance(params, list)
        and params
        and all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in params)
    ):
        names = [p["name"] for p in params]
        lines.append(f"parameters      {len(names)}: {_named(names)}")
        modules = list(dict.fromkeys(_module_of(name, metadata.get("framework")) for name in names))
        chosen = metadata.get("layers")
        by = ""
        if isinstance(chosen, list) and chosen and all(isinstance(x, str) for x in chosen):
            by = f" (selected by the layers= patterns {_named(chosen)})"
        lines.append(f"modules         {len(modules)}: {_named(modules)}{by}")
    return lines


def _module_of(name: str, framework: Any) -> str:
    """The module (torch) or sub-tree (JAX: keys joined by '/') owning parameter `name`: its path less the last
    part, and for a torch parametrization ('0.parametrizations.weight.original0') the parametrized module
    ('0'); a top-level parameter is its own."""
    if framework == "jax":
        return name.rpartition("/")[0] or name
    head, mark, _ = name.partition(".parametrizations.")
    if mark and head:
        return head
    return name.rpartition(".")[0] or name


def _named(names: list[str]) -> str:
    """The first _NAMED of `names` as _key_text shows them, then ', ... and N more'."""
    more = len(names) - _NAMED
    return ", ".join(_key_text(n) for n in names[:_NAMED]) + (f", ... and {more} more" if more > 0 else "")


def _preconditioner_text(metadata: dict[str, Any], mode: str) -> str | None:
    """'none (no optimizer state used)', or "adam (gradients divided by ...; Adam state used: each checkpoint's
    optimizer state, given as a file)", saying where "adam" went through a rank-one factorisation of v (factored
    rows, Kronecker-projected ones); None where the record is not one the adapters write."""
    record = metadata["preconditioner"]
    if record is None:
        return "none (no optimizer state used)"
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return None
    kind = record["kind"]
    if kind not in ("adam", "adam_update"):
        return _key_text(kind)
    what = "gradients divided by Adam's sqrt(v) + eps" if kind == "adam" else "rows are Adam's update steps"
    projection = metadata.get("projection")
    if kind == "adam" and mode == "factored":
        what += " (v through a rank-one factorisation: an approximation)"
    elif kind == "adam" and isinstance(projection, dict) and projection.get("kronecker") is True:
        what += " (v of the weights projected per token through a rank-one factorisation: an approximation)"
    sources = metadata.get("optimizer_state_sources")
    given = ""
    if isinstance(sources, list) and sources and all(x in ("file", "state") for x in sources):
        how = {"file": "as a file", "state": "in memory"}
        given = ", given " + " or ".join(how[w] for w in sorted(set(sources)))
    return f"{kind} ({what}; Adam state used: each checkpoint's optimizer state{given})"


def _projection_text(record: Any) -> str | None:
    """'none (unprojected rows)', or 'rademacher to 5 dims, seed 3' (', per layer', ', Kronecker' where so);
    None where the record is not a tracin.Projection spec."""
    if record is None:
        return "none (unprojected rows)"
    if not isinstance(record, dict) or record.get("type") != "tracin.Projection":
        return None
    kind, dim, seed = record.get("kind"), record.get("dim"), record.get("seed")
    if not isinstance(kind, str) or type(dim) is not int or type(seed) is not int:
        return None
    extra = (", per layer" if record.get("per_layer") is True else "") + (
        ", Kronecker" if record.get("kronecker") is True else ""
    )
    return f"{_key_text(kind)} to {dim} dims, seed {seed}{extra}"


def _dims_text(i: dict[str, Any]) -> str:
    """The dims of every slot, or of one checkpoint's layers when every checkpoint has the same."""
    dims, layers = i["dims"], i["layers_per_checkpoint"]
    if layers > 1 and all(dims[c : c + layers] == dims[:layers] for c in range(0, len(dims), layers)):
        return f"{_first(dims[:layers])} (each checkpoint's layers)"
    return _first(dims)


# Chunks whose maps may be alive at once: the scoring loop holds the previous, current and next
# train chunks and the previous and current test chunks of one store (top_k(s, s)): 5, rounded up
# to 8 to leave a few hundred descriptors (at the usual limit of 1024) to the rest of the process.
_CHUNKS_HELD = 8


def _mappable_files() -> int:
    """How many data files a chunk may memory-map: each map holds a descriptor until it is dropped
    (Python's mmap keeps a duplicate), and the scoring loop holds up to 5 chunks' maps at once, so
    an eighth (_CHUNKS_HELD) of the limit on open files (RLIMIT_NOFILE); a store of more files is
    read into memory per chunk instead."""
    if resource is None:
        return 128
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft // _CHUNKS_HELD if soft != resource.RLIM_INFINITY else 2**20


def _read_ahead(fd: int, offset: int, nbytes: int) -> None:
    """Asks the OS to start reading a byte range into its cache (asynchronously; a hint only), so
    disk reads overlap the kernel's work on the chunk before."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
