"""Writing one row range of an existing store beside other writers (GradientStore.create(..., rows=))."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..gradients import GradientSet
from ._format import Manifest, OverCapError, Ranges, add_range
from ._locks import DirectoryLock, RangeLock
from ._ranges import RangeProgress, write_progress
from ._writer import DataFiles, GradientStoreWriter, add_written, over_cap


class GradientStoreRangeWriter(GradientStoreWriter):
    """Writes rows [start, stop) of a store that exists, as one of several writers on disjoint ranges
    (say Dask tasks of a distributed export, in processes or machines sharing the file system).

    Each write() syncs the data, then records the rows in rows-<start>-<stop>.json (replaced
    atomically), not in manifest.json: range writers never contend for one file. A writer killed at
    any point resumes from its last recorded block when opened again for the same range. It holds a
    shared lock on the directory (no writer of the whole store meanwhile) and an exclusive one on
    its range; a range overlapping another writer's is refused. Range writers do not finalize: once
    every range is written, GradientStore.create(path, <same spec>) without rows= gives the writer
    of the whole store, which merges the ranges' progress, and its finalize() checks that no row is
    missing.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        lock: DirectoryLock,
        claim: RangeLock | None,
        files: DataFiles | None,
        progress: RangeProgress,
        open_store: Callable[[Path], GradientSet],
    ):
        """Takes ownership of `lock`, `claim` and `files` (None for a finished store); `progress`
        holds every row of the range known to be written (the store's and the range file's)."""
        super().__init__(path, manifest, lock, files, open_store)
        self._claim = claim
        self._progress = progress

    @property
    def rows(self) -> tuple[int, int]:
        return self._progress.start, self._progress.stop

    def finalize(self) -> GradientSet:
        """Refused: a range writer closes; the store is finalized by a writer of the whole store (in a
        forked child's copy of the writer: RuntimeError, as GradientStoreWriter.finalize)."""
        self._check_process()
        raise ValueError(
            f"a range writer of {self.path} (rows [{self.rows[0]}, {self.rows[1]})) does not finalize the "
            "store: close() it, and once every range is written call GradientStore.create(path, <the same "
            "spec>) without rows= and finalize() that writer"
        )

    def close(self) -> None:
        try:
            super().close()
        finally:  # a failed close must not keep the rows claimed in this process
            if self._claim is not None:
                self._claim.release()

    def __repr__(self) -> str:
        done = [self.rows_done(c) for c in range(self.n_checkpoints)]
        return (
            f"GradientStoreRangeWriter({str(self.path)!r}, rows={list(self.rows)}, dims={list(self.dims)}, "
            f"dtype={self.dtype!r}, rows_done={done})"
        )

    def _written(self, c: int) -> Ranges:
        return self._progress.written[c]

    def _record(self, written: list[tuple[int, int, int]]) -> None:
        """As GradientStoreWriter._record, into the range's progress file."""
        undo = add_written(self._progress.written, written)
        try:
            write_progress(self.path, self._progress)
        except OverCapError as e:
            refusal = over_cap(e, self._progress.written, written)
            undo()
            raise refusal from None


def initial_progress(manifest: Manifest, found: RangeProgress | None, start: int, stop: int) -> RangeProgress:
    """Rows of [start, stop) written per checkpoint: those manifest.json records (clipped to the range)
    and those of the range's progress file `found` (None if it has none)."""
    written = []
    for c, ranges in enumerate(manifest.written):
        mine: Ranges = [] if found is None else found.written[c]
        for a, b in ranges:
            if a < stop and start < b:
                mine = add_range(mine, max(a, start), min(b, stop))
        written.append(mine)
    return RangeProgress(manifest.store_id, start, stop, written)
