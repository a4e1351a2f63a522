"""Writing rows into a gradient store (GradientStore.create returns the writer)."""

from __future__ import annotations

import dataclasses
import numbers
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..gradients import GradientSet
from ._convert import WIDER, BeyondRangeError, LowPrecisionRows, NonFiniteError, beyond_range_text, to_store_dtype
from ._files import fsync_dir, open_file, sync, write_all, write_json_atomic
from ._format import (
    DISK_DTYPES,
    MANIFEST,
    Manifest,
    OverCapError,
    Ranges,
    StoreChangedError,
    StoreFormatError,
    gaps,
    insert_range,
)
from ._locks import DirectoryLock
from ._npy import check_npy


class DataFiles:
    """The data files of a store being written: per checkpoint the paths, data offsets and identities
    (device, inode, size) of its one (full) or two (factored) files, all checked when the writer
    opens. A write opens its checkpoint's files only while it writes them (open()), so a store of
    any number of checkpoints needs at most two descriptors. close() is idempotent."""

    def __init__(self, root: Path, manifest: Manifest):
        """Checks every data file (there, no links, right header and size), one open file at a time; a
        damaged one is a StoreFormatError naming it."""
        self.paths = [[root / n for n in names] for names in manifest.files]
        self.offsets: list[list[int]] = []
        self._identities: list[list[tuple[int, int, int]]] = []
        self.closed = False
        for c, paths in enumerate(self.paths):
            offsets, identities = [], []
            for path, d in zip(paths, manifest.dims[c], strict=True):
                try:
                    fd = open_file(path, writable=True)
                except FileNotFoundError:  # as the reader says it; resuming adds how to start over
                    raise StoreFormatError(f"{path}: data file is missing") from None
                try:
                    offsets.append(check_npy(fd, path, DISK_DTYPES[manifest.dtype], (manifest.n_rows, d)))
                    identities.append(_identity(os.fstat(fd)))
                finally:
                    os.close(fd)
            self.offsets.append(offsets)
            self._identities.append(identities)

    @contextmanager
    def open(self, c: int) -> Iterator[list[int]]:
        """Write descriptors of checkpoint c's files, closed on leaving; StoreChangedError if one is
        not the file checked when the writer opened (removed, replaced or resized since)."""
        fds: list[int] = []
        try:
            for path, identity in zip(self.paths[c], self._identities[c], strict=True):
                try:
                    fds.append(open_file(path, writable=True))
                except FileNotFoundError:
                    raise StoreChangedError(f"{path} was removed while the gradient store was being written") from None
                if _identity(os.fstat(fds[-1])) != identity:
                    raise StoreChangedError(
                        f"{path} was replaced or resized by another process while the gradient store was being "
                        "written; open it for writing again (GradientStore.create, same arguments) to resume"
                    )
            yield fds
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self.closed = True


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_size


# The writers open in this process: a forked child gives each a fresh record lock, as another thread of
# the parent may have held it across the fork (the child's copy would stay locked: rows_done(), missing()
# or repr() of an inherited writer would hang).
_WRITERS: weakref.WeakSet[GradientStoreWriter] = weakref.WeakSet()


def _fresh_record_locks() -> None:
    for w in list(_WRITERS):
        w._recording = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_record_locks)


class GradientStoreWriter:
    """Writes rows of a store, durably: each write() flushes and fsyncs the data, then records the
    rows in the manifest atomically, so a killed process resumes where it stopped.

    One writer of the whole store at a time, and none beside range writers (GradientStoreRangeWriter),
    enforced with a lock on the directory where the OS has flock. One writer may be shared by threads
    (blocks written from a thread pool): their write() calls write and sync the data side by side, and
    record the rows one at a time (a lock of the writer's around its record of the rows written, so
    each replace of the progress file holds every row recorded before it). recording_once() defers the
    records of the calling thread's writes only. finalize() marks the store finished (scoring refuses
    an unfinished one) and closes the writer; close(), or leaving a `with` block, only closes it, even
    when every row is written (writer.complete): call finalize() inside the block.

    Rows written out of order leave gaps: each written stretch between them is a [start, stop) range
    of its own in the manifest, and every record rewrites (and fsyncs) the whole manifest, so a write
    costs more as the gaps grow (its range is added by bisection; the rewrite is about 3 ms at 12,000
    gaps, 50 ms at 100,000, besides the fsyncs). Write each checkpoint's rows in order where you can
    (filled gaps merge away); for rows that come shuffled, write many blocks inside one
    recording_once() (one rewrite for them all); range writers (rows=) in parallel each rewrite only
    their own range's progress file.

    A writer belongs to the process that opened it: in a child forked while it was open (a DataLoader
    worker, say), which does not hold the store's lock, write() and finalize() raise RuntimeError and
    close() only marks the child's copy closed (no file is touched, the parent's lock stays).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        lock: DirectoryLock,
        files: DataFiles | None,
        open_store: Callable[[Path], GradientSet],
    ):
        """Takes ownership of `lock` and `files` (None for a finished store); `open_store(path)` is
        what finalize() returns (GradientStore.open)."""
        self.path = path
        self._pid = os.getpid()  # the process owning `lock`; a forked child's copy of the writer refuses to write
        self._manifest = manifest
        self._lock = lock
        self._files = files
        self._open_store = open_store
        # rows written, to record, of each thread inside recording_once (by threading.get_ident())
        self._pending: dict[int, list[tuple[int, int, int]]] = {}
        self._recording = threading.RLock()  # around the record of rows (the manifest and its file)
        _WRITERS.add(self)
        # float16 rows left below its normal range: one warning per writer (to_store_dtype's low=)
        self._low = LowPrecisionRows(
            f"gradient store {path}",
            'use dtype="bfloat16" (nearly float32\'s range, up to 3.39e38, in 16 bits) or dtype="float32" for such '
            "gradients, in a new store "
            "(a store keeps the dtype it was created with); this writer warns once and does not check later rows",
        )
        # the words of the warning for the store's checkpoint c and its blocks (whole, left, right factors)
        self._checkpoint_text: Callable[[int], str] = lambda c: f"checkpoint {c}"
        self._names = ("block", "block[0] (the left factor)", "block[1] (the right factor)")

    def word_low_precision(
        self, what: str, advice: str, checkpoint_text: Callable[[int], str], names: tuple[str, str, str]
    ) -> None:
        """The words of this writer's float16 low-precision warning (LowPrecisionRows), for an owner whose
        user never sees the writer (export_gradients(store=...)): what (whose rows, e.g. "dtype='float16'"),
        advice (what to use instead, and how often it warns), checkpoint_text(c) (the store's checkpoint c,
        e.g. 'checkpoint 1 (factor pair 1)') and names (of a block, its left and its right factors). Call it
        before the first write. (The refusals of NaN / Inf and of values beyond the dtype's range name blocks
        and checkpoints the same way; the owner rewords them anyway.)"""
        self._low = LowPrecisionRows(what, advice)
        self._checkpoint_text, self._names = checkpoint_text, names

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

    @property
    def rows(self) -> tuple[int, int]:
        """[start, stop) of the rows this writer may write: all of them (a range writer: its range)."""
        return 0, self.n_rows

    def rows_done(self, checkpoint: int) -> int:
        """r such that rows [start, r) of `checkpoint` are durably written (start = self.rows[0])."""
        start = self.rows[0]
        with self._recording:
            first = self._written(self._checkpoint(checkpoint))[:1]
        return first[0][1] if first and first[0][0] <= start < first[0][1] else start

    def missing(self, checkpoint: int) -> list[list[int]]:
        """[start, stop) row ranges of `checkpoint` within self.rows not written yet."""
        c = self._checkpoint(checkpoint)
        with self._recording:
            return gaps(self._written(c), *self.rows)

    @property
    def complete(self) -> bool:
        """True when every row (of self.rows) of every checkpoint is written (finalize() may still be due)."""
        return all(not self.missing(c) for c in range(self.n_checkpoints))

    # -- writing --------------------------------------------------------------------------------
    def write(self, checkpoint: int, start: int, block: Any) -> None:
        """Writes rows [start, start + len(block)) of one checkpoint.

        block: (rows, d_c) array (full) or a (left (rows, p_c), right (rows, q_c)) pair (factored);
        NumPy, torch or JAX, float32 / float16 / bfloat16, converted to the store dtype. NaN or Inf
        anywhere in it is a NonFiniteError (a ValueError) naming the store, the checkpoint (and factor)
        and the first such rows, raised before anything of the write reaches the disk; so are finite
        values the store dtype cannot hold (BeyondRangeError: |x| >= 65520 in float16). In a float16
        store, rows whose values all lie below float16's normal range (|x| < 2**-14 ~ 6.1e-5: kept
        with fewer bits, or as 0) are a RuntimeWarning, once per writer (bfloat16 keeps
        float32's small values and nearly its range: it refuses |x| >= 3.3961775e38).
        Rewriting rows already written is allowed (the new values replace the old). An OSError
        (e.g. a full disk) names the file; the rows are then not recorded on disk (a later write of this
        writer records them if their data was synced), and a resume redoes them. RuntimeError in a
        child forked while the writer was open (see the class).
        """
        self._check_process()
        if self._manifest.complete:
            raise ValueError(
                f"gradient store {self.path} is finalized; it cannot be written again "
                "(create it with overwrite=True to start over)"
            )
        files = self._files
        if files is None or files.closed:
            raise ValueError(f"the writer of {self.path} is closed")
        c = self._checkpoint(checkpoint)
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        start = int(start)
        arrays = self._blocks(c, block, start)
        rows = arrays[0].shape[0]
        if start > self.n_rows:
            raise ValueError(f"start {start} is past the end of the store's {self.n_rows} rows")
        if start + rows > self.n_rows:
            raise ValueError(f"rows [{start}, {start + rows}) exceed the store's {self.n_rows} rows")
        if not self.rows[0] <= start <= start + rows <= self.rows[1]:
            raise ValueError(
                f"rows [{start}, {start + rows}) are outside this writer's rows [{self.rows[0]}, {self.rows[1]})"
            )
        if rows == 0:
            return
        with files.open(c) as fds:
            for fd, path, offset, arr in zip(fds, files.paths[c], files.offsets[c], arrays, strict=True):
                write_all(fd, arr.reshape(-1).view(np.uint8), offset + start * arr.shape[1] * arr.itemsize, path)
            for fd, path in zip(fds, files.paths[c], strict=True):
                sync(fd, path)
        pending = self._pending.get(threading.get_ident())
        if pending is None:
            self._commit([(c, start, start + rows)])
        else:
            pending.append((c, start, start + rows))

    @contextmanager
    def recording_once(self) -> Iterator[None]:
        """Within the block, write() syncs each block's data as always but records the rows only
        once, on leaving (one atomic replace of the progress file for, say, every checkpoint or layer
        of an export batch, instead of one per block). On an error the rows written so far are still
        recorded (if that fails too, the block's error is the one raised; a resume redoes them).
        finalize() inside the block records the rows first; a writer closed inside it records
        nothing on leaving (its lock is released: another writer may own the store by then), so
        a resume redoes those rows; so does a child forked inside the block (its parent records them)."""
        me = threading.get_ident()
        if me in self._pending:  # nested: the outer block records
            yield
            return
        self._pending[me] = []
        failed = True
        try:
            yield
            failed = False
        finally:
            pending = self._pending.pop(me)
            if pending and not self._closed and not self._inherited:
                try:
                    self._commit(pending)
                except Exception:
                    if not failed:
                        raise

    def finalize(self) -> GradientSet:
        """Marks the store complete and returns it opened for reading; ValueError if rows are missing,
        RuntimeError in a child forked while the writer was open (see the class)."""
        self._check_process()
        with self._recording:
            self._finish()
        self.close()
        return self._open_store(self.path)

    def _finish(self) -> None:
        """finalize()'s check and marking of the store complete (under the record lock)."""
        if not self._manifest.complete:
            if self._closed:
                raise ValueError(f"the writer of {self.path} is closed; create() it again to finish it")
            pending = self._pending.get(threading.get_ident())
            if pending:  # inside recording_once: the rows written so far count
                self._commit(pending)
                pending.clear()
            missing = {c: self.missing(c) for c in range(self.n_checkpoints) if self.missing(c)}
            if missing:
                detail = "; ".join(f"checkpoint {c}: rows {_ranges_text(r)}" for c, r in missing.items())
                raise ValueError(f"cannot finalize {self.path}: rows not written yet ({detail})")
            # marked complete in memory only once on disk: a failed write (disk full) can be retried
            write_json_atomic(self.path / MANIFEST, dataclasses.replace(self._manifest, complete=True).to_json())
            fsync_dir(self.path)
            self._manifest.complete = True

    def close(self) -> None:
        """Closes the files and releases the lock; progress so far stays on disk. In a child forked
        while the writer was open it writes nothing: the release closes only the child's copy of the
        lock's descriptor, if the fork left one (it never unlocks), and the parent's lock stays. The lock
        is released even where closing the files fails."""
        try:
            if self._files is not None:
                self._files.close()
        finally:
            self._lock.release()

    def __enter__(self) -> GradientStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if sys.is_finalizing():  # module globals (os) may be gone; exiting closes the files and frees the lock
            return
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __repr__(self) -> str:
        done = [self.rows_done(c) for c in range(self.n_checkpoints)]
        return (
            f"GradientStoreWriter({str(self.path)!r}, n_rows={self.n_rows}, dims={list(self.dims)}, "
            f"dtype={self.dtype!r}, rows_done={done})"
        )

    # -- helpers --------------------------------------------------------------------------------
    @property
    def _closed(self) -> bool:
        return self._files is None or self._files.closed

    @property
    def _inherited(self) -> bool:
        """Whether this is a forked child's copy of a writer its parent opened (holding no lock)."""
        return os.getpid() != self._pid

    def _check_process(self) -> None:
        """RuntimeError if this process did not open the writer (a forked child's copy of it)."""
        if self._inherited:
            raise RuntimeError(
                f"this writer of gradient store {self.path} was opened by process {self._pid} before a fork: "
                f"this process ({os.getpid()}) does not hold the store's lock and may not write through it; "
                "open a writer in the child (GradientStore.create with the same arguments, once the parent's "
                "writer is closed)"
            )

    def _written(self, c: int) -> Ranges:
        """Sorted, disjoint row ranges of checkpoint c known to be written."""
        return self._manifest.written[c]

    def _commit(self, written: list[tuple[int, int, int]]) -> None:
        """_record under the record lock: threads sharing the writer record their rows one at a time;
        RuntimeError in a forked child (it holds no lock)."""
        self._check_process()
        with self._recording:
            self._record(written)

    def _record(self, written: list[tuple[int, int, int]]) -> None:
        """Records rows [start, stop) of checkpoint c, for each (c, start, stop), as written, durably
        (their data is synced), with one replace of manifest.json. They are marked in memory first, so an
        interrupt after the replace loses no recorded rows; a failed replace leaves them for the next
        record (their data is on disk), and a record past the cap (OverCapError) is undone."""
        undo = add_written(self._manifest.written, written)
        try:
            write_json_atomic(self.path / MANIFEST, self._manifest.to_json())
        except OverCapError as e:
            refusal = over_cap(e, self._manifest.written, written)
            undo()
            raise refusal from None

    def _checkpoint(self, checkpoint: int) -> int:
        if (
            isinstance(checkpoint, bool)
            or not isinstance(checkpoint, numbers.Integral)
            or not 0 <= checkpoint < self.n_checkpoints
        ):
            raise ValueError(f"checkpoint must be an integer in [0, {self.n_checkpoints}), got {checkpoint!r}")
        return int(checkpoint)

    def _converted(self, x: Any, name: str, start: int, c: int) -> np.ndarray:
        """x in the store dtype; NaN / Inf (NonFiniteError) and values beyond its range (BeyondRangeError)
        refused, naming the checkpoint and the first such rows of the store."""
        where = f" of {self._checkpoint_text(c)}"
        try:
            return to_store_dtype(x, self._manifest.dtype, name, start, where, refuse_nonfinite=True, low=self._low)
        except NonFiniteError as err:
            raise _refused_rows(err, self.path) from None
        except BeyondRangeError as err:
            raise _beyond_range(err, self.path, name, start, where) from None

    def _blocks(self, c: int, block: Any, start: int) -> list[np.ndarray]:
        m = self._manifest
        if m.factored:
            if not isinstance(block, (tuple, list)) or len(block) != 2:
                raise TypeError(
                    f"block must be a (left, right) pair of arrays for a factored store, got {type(block).__name__}"
                )
            arrays = [self._converted(b, self._names[1 + i], start, c) for i, b in enumerate(block)]
            if arrays[0].shape[0] != arrays[1].shape[0]:
                raise ValueError(f"left has {arrays[0].shape[0]} rows but right has {arrays[1].shape[0]}")
        else:
            arrays = [self._converted(block, self._names[0], start, c)]
        for i, (arr, d) in enumerate(zip(arrays, m.dims[c], strict=True)):
            if arr.shape[1] != d:
                what = ("left", "right")[i] if m.factored else "block"
                raise ValueError(f"{what} has {arr.shape[1]} columns but checkpoint {c} has {d}")
        return arrays


def _refused_rows(err: NonFiniteError, path: Path) -> NonFiniteError:
    """`err` in the writer's words: the store, and that nothing of the write was stored."""
    return NonFiniteError(
        f"gradient store {path}: {err}; nothing of this write was stored (scoring refuses a store holding NaN or "
        "Inf anywhere): fix or leave out those examples and write the rows again",
        err.rows,
        err.count,
        err.name,
        err.where,
    )


def _beyond_range(err: BeyondRangeError, path: Path, name: str, start: int, where: str) -> BeyondRangeError:
    """`err` (a block written at row `start`) in the writer's words, as _refused_rows: the store, that
    nothing of the write was stored, and that a store keeps its dtype (the wider ones need a new store)."""
    wider = " or ".join(f'dtype="{d}"' for d in WIDER[err.dtype])
    return BeyondRangeError(
        f"gradient store {path}: {beyond_range_text(name, err.source, err.dtype, start + err.row, where)}; nothing "
        f"of this write was stored, and a store keeps the dtype it was created with ({err.dtype}): to store such "
        f"values, create a new store with {wider} (at another path, or with overwrite=True)",
        err.row,
        err.source,
        err.dtype,
        err.limit,
    )


def add_written(ranges: list[Ranges], written: list[tuple[int, int, int]]) -> Callable[[], None]:
    """Adds rows [start, stop) of checkpoint c to ranges[c] in place, for each (c, start, stop) of
    `written` (insert_range: two bisections and a splice each, however many ranges a checkpoint has);
    returns the function that undoes all of it."""
    undos = [insert_range(ranges[c], start, stop) for c, start, stop in written]

    def undo() -> None:
        for one in reversed(undos):
            one()

    return undo


def over_cap(err: OverCapError, ranges: list[Ranges], written: list[tuple[int, int, int]]) -> ValueError:
    """The writer's words for a record refused by OverCapError: the ranges it would hold, that the
    rows are written but not recorded, and how rows written out of order leave that many."""
    rows = "; ".join(f"checkpoint {c}: rows [{a}, {b})" for c, a, b in written[:3]) + ("; ..." if written[3:] else "")
    return ValueError(
        f"{err} ({sum(map(len, ranges))} disjoint written row ranges over all checkpoints): the rows just "
        f"written ({rows}) are on disk but not recorded. Rows written out of order leave gaps, each written "
        "stretch a range of its own: write the rows between them (adjacent ranges merge into one), or write "
        "rows in order"
    )


def _ranges_text(ranges: list[list[int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)
