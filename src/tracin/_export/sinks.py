"""Where exported rows go: in memory (Gradients / FactoredGradients) or a GradientStore on disk.

Both take, per checkpoint c, blocks of rows at a start row: a (rows, d) array, or a (left, right)
pair when factored; NumPy, torch or JAX, float32 / float16 / bfloat16. Both convert them to the
stored dtype the same way (tracin.store's to_store_dtype), so values beyond the range of float16 /
bfloat16 are the same ValueError at export time, naming dtype=, the checkpoint and the first such row
(beyond_range). A store also refuses NaN / Inf rows, naming them (nonfinite_rows); in memory they are
kept, and scoring names them. float16 rows left below its normal range (values all under 2**-14 ~ 6.1e-5
in magnitude: fewer bits, or 0) are a RuntimeWarning once per export (LowPrecisionRows; a store's writer
is given the export's words: word_low_precision). The writes of one batch go inside `with sink.batch():`
(a store records their progress once). Close a sink on any error (close()).
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np

from ..gradients import FactoredGradients, Gradients
from ..store._convert import (
    OVERFLOWS,
    WIDER,
    BeyondRangeError,
    LowPrecisionRows,
    NonFiniteError,
    rows_text,
    to_store_dtype,
)
from ..store._format import DISK_DTYPES
from .resume import EXPORT_ADVICE, refuse_another_export

# What to export instead when float16 leaves rows with little or no precision (LowPrecisionRows).
LOW_PRECISION_ADVICE = (
    "export such gradients with dtype='bfloat16' (nearly float32's range, up to 3.39e38, in 16 bits) or "
    "dtype='float32'; this export warns once and does not check later rows"
)
Block = Any  # (rows, d) array, or a (left (rows, p), right (rows, q)) pair when factored
Wrap = Callable[[np.ndarray, str], Any]  # (stored array, dtype name) -> the framework's array


class MemorySink:
    """Keeps each checkpoint's rows in memory, in the stored dtype (bfloat16 as uint16 bits until
    `wrap` turns them into the framework's arrays at finish). Preallocated (n_rows, width) arrays
    when the row count is known, else pieces joined in row order at the end."""

    complete = False

    def __init__(
        self,
        n_rows: int | None,
        n_checkpoints: int,
        dtype: str,
        factored: bool,
        weights: list[float],
        wrap: Wrap = lambda a, dtype: a,
        slots: int = 1,
    ):
        self.n_rows, self.dtype, self.factored, self.weights, self._wrap = n_rows, dtype, factored, weights, wrap
        self.slots = slots  # per checkpoint: write's `checkpoint` is checkpoint * slots + slot
        self._full: list[list[np.ndarray] | None] = [None] * n_checkpoints
        self._parts: list[list[tuple[int, list[np.ndarray]]]] = [[] for _ in range(n_checkpoints)]
        self._low = LowPrecisionRows(f"dtype={dtype!r}", LOW_PRECISION_ADVICE)  # warns once per export

    def rows_done(self, checkpoint: int) -> int:
        return 0

    def destination(self, checkpoint: int, start: int, rows: int, width: int) -> np.ndarray | None:
        """Rows [start, start + rows) of a full float32 checkpoint of `width` columns, for computing
        into in place (None when rows are kept another way)."""
        if self.factored or self.n_rows is None or self.dtype != "float32":
            return None
        full = self._allocate(checkpoint, [width])
        return full[0][start : start + rows] if full[0].shape[1] == width else None

    def _allocate(self, checkpoint: int, widths: list[int]) -> list[np.ndarray]:
        if self._full[checkpoint] is None:
            self._full[checkpoint] = [np.empty((self.n_rows, w), DISK_DTYPES[self.dtype]) for w in widths]
        return self._full[checkpoint]

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        try:
            where = f" of {_slot_text(checkpoint, self.slots)}"
            pieces = _convert(block, self.factored, self.dtype, self._low, start, where)
        except BeyondRangeError as err:
            raise beyond_range(err, checkpoint, start, slots=self.slots) from None
        if self.n_rows is None:
            self._parts[checkpoint].append((start, pieces))
            return
        for dest, p in zip(self._allocate(checkpoint, [p.shape[1] for p in pieces]), pieces, strict=True):
            dest[start : start + p.shape[0]] = p

    def batch(self) -> AbstractContextManager[None]:
        """Writes of one batch (nothing to do here; see StoreSink.batch)."""
        return nullcontext()

    def close(self) -> None:
        self._full, self._parts = [], []

    def finish(self, metadata: dict) -> Gradients | FactoredGradients:
        per_ckpt = []
        for c, full in enumerate(self._full):
            if full is None:  # row count unknown up front: join the pieces in row order
                pieces = [p for _, p in sorted(self._parts[c], key=lambda sp: sp[0])]
                if not pieces:
                    raise ValueError("data has no rows")
                full = [np.concatenate([p[k] for p in pieces]) for k in range(len(pieces[0]))]
                self._parts[c] = []
            per_ckpt.append([self._wrap(a, self.dtype) for a in full])
        if self.factored:
            return FactoredGradients(
                [f[0] for f in per_ckpt], [f[1] for f in per_ckpt], self.weights, metadata=metadata
            )
        return Gradients([f[0] for f in per_ckpt], self.weights, metadata=metadata)


def _convert(
    block: Block, factored: bool, dtype: str, low: LowPrecisionRows, start: int, where: str
) -> list[np.ndarray]:
    """The block's arrays in the stored dtype (bfloat16 as uint16 bits); `low` warns once about float16
    rows left below its normal range, naming them from `start` as rows of the gradients `where`."""
    if factored:
        if not isinstance(block, (tuple, list)) or len(block) != 2:
            raise TypeError(f"block must be a (left, right) pair, got {type(block).__name__}")
        names = ("the left factors", "the right factors")
        return [to_store_dtype(b, dtype, names[i], start, where, low=low) for i, b in enumerate(block)]
    return [to_store_dtype(block, dtype, "the gradients", start, where, low=low)]


def _slot_text(slot: int, slots: int) -> str:
    """'checkpoint 2', or 'checkpoint 2 (factor pair 1)' when a checkpoint has several slots."""
    checkpoint, pair = divmod(slot, slots)
    return f"checkpoint {checkpoint}" + (f" (factor pair {pair})" if slots > 1 else "")


def beyond_range(
    err: BeyondRangeError, slot: int, start: int, store: str | os.PathLike | None = None, slots: int = 1
) -> ValueError:
    """The export's words for gradients beyond the range of the exported dtype (to_store_dtype's
    BeyondRangeError on a block of sink slot `slot` written at row `start`; `slots` per checkpoint:
    factored exports have one per layer): dtype=, the checkpoint (and factor pair), the first such row
    of the data and the dtypes that hold it; with a store, that its directory keeps the dtype."""
    checkpoint, pair = divmod(slot, slots)
    where = f"checkpoint {checkpoint}" + (f" (factor pair {pair})" if slots > 1 else "")
    wider = " or ".join(f"dtype={d!r}" for d in WIDER[err.dtype])
    kept = (
        f"; the store begun in {os.fspath(store)} keeps dtype={err.dtype!r} (a resume must use it): {EXPORT_ADVICE}"
        if store is not None
        else ""
    )
    return ValueError(
        f"dtype={err.dtype!r}: row {start + err.row} of {where} holds {err.source} gradient values "
        f"beyond the {err.dtype} range (|x| >= {OVERFLOWS[err.dtype]:.8g} rounds beyond {err.limit:.8g}), the first "
        f"such row; export with {wider}{kept}"
    )


def nonfinite_rows(err: NonFiniteError, slot: int, store: str | os.PathLike, slots: int = 1) -> ValueError:
    """The export's words for the store writer's refusal of NaN / Inf rows (NonFiniteError, rows in the
    data's numbering) of sink slot `slot` (`slots` per checkpoint: factored exports have one per layer)."""
    checkpoint, pair = divmod(slot, slots)
    where = f"checkpoint {checkpoint}" + (f" (factor pair {pair})" if slots > 1 else "")
    return ValueError(
        f"{rows_text(err.rows, err.count)} of {where} {'hold' if err.count > 1 else 'holds'} NaN or Inf gradient "
        "values (a NaN or Inf input, or a loss or model output that is not finite for those examples), and a "
        f"gradient store refuses them, since scoring refuses a store holding any; the store begun in "
        f"{os.fspath(store)} keeps the rows written before them, for this data only: fix or leave out those "
        f"examples, then {EXPORT_ADVICE}"
    )


# the data forms whose row count is known up front, in tracin.torch's words
COUNTABLE = "(inputs, targets) arrays, a Dataset or DataLoader with len(), or a list of batches"


def need_row_count(n_rows: int | None, countable: str | None = None) -> None:
    """ValueError when a store is asked for but the data's row count is unknown up front; countable:
    the data forms that give it, in the adapter's words (default tracin.torch's)."""
    if n_rows is None:
        raise ValueError(
            "store= needs the number of examples up front, and it cannot be known for this data: pass "
            + (countable or COUNTABLE)
        )


class StoreSink:
    """Writes rows into a GradientStore as they come; creating it again with the same spec
    (n_rows, dims, dtype, weights, metadata) resumes it. rows=(start, stop): only those rows, as one
    of several writers of a store that exists (a GradientStoreRangeWriter)."""

    def __init__(
        self,
        path: str | os.PathLike,
        n_rows: int | None,
        dims: list,
        dtype: str,
        factored: bool,
        weights: list[float],
        metadata: dict,
        rows: tuple[int, int] | None = None,
        slots: int = 1,
    ):
        from ..store import GradientStore
        from ..store._create import create

        need_row_count(n_rows)
        refuse_another_export(path, metadata, weights)
        self._writer = create(
            path,
            n_rows,
            dims,
            weights,
            dtype,
            factored=factored,
            metadata=metadata,
            ids=None,
            overwrite=False,
            rows=rows,
            open_store=GradientStore.open,
            advice=EXPORT_ADVICE,
        )
        self._ranged = rows is not None
        self.slots = slots  # per checkpoint: write's `checkpoint` is checkpoint * slots + slot
        # float16 rows left below its normal range: the export's words (dtype=, the checkpoint and factor
        # pair), not the writer's own (its blocks, a new store, "this writer")
        self._writer.word_low_precision(
            f"dtype={dtype!r}",
            "export such gradients with dtype='bfloat16' (nearly float32's range, up to 3.39e38, in 16 bits) or "
            f"dtype='float32', into "
            f"another directory (the store begun in {os.fspath(path)} keeps dtype={dtype!r}); this export warns "
            + (
                "once per range of rows and does not check that range's later rows"
                if self._ranged
                else "once and does not check later rows"
            ),
            lambda slot: _slot_text(slot, slots),
            ("the gradients", "the left factors", "the right factors"),  # as _convert names them
        )

    @property
    def complete(self) -> bool:
        return self._writer.complete

    def rows_done(self, checkpoint: int) -> int:
        return self._writer.rows_done(checkpoint)

    def destination(self, checkpoint: int, start: int, rows: int, width: int) -> None:
        return None

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        try:
            with _resumable_when_full():
                self._writer.write(checkpoint, start, block)
        except BeyondRangeError as err:
            raise beyond_range(err, checkpoint, start, self._writer.path, self.slots) from None
        except NonFiniteError as err:
            raise nonfinite_rows(err, checkpoint, self._writer.path, self.slots) from None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Writes of one batch, of every slot: the store records their rows once, on leaving, after
        each block's data is synced (writer.recording_once), not once per slot."""
        with _resumable_when_full(), self._writer.recording_once():
            yield

    def close(self) -> None:
        """Releases the store (and its lock); the rows written so far stay for a resume."""
        self._writer.close()

    def finish(self) -> Any:
        """The finalized GradientStore (its metadata is the one given at creation); None for a range
        writer, which is closed instead (a writer of the whole store finalizes)."""
        if self._ranged:
            self._writer.close()
            return None
        with _resumable_when_full():
            return self._writer.finalize()


# what the OS says when the disk (or the user's quota) has no room left
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
RESUMES_WHEN_FULL = (
    "the rows recorded so far are kept: free space on that disk (or quota), then rerun the same export call, "
    "which resumes where it stopped"
)


@contextmanager
def _resumable_when_full() -> Iterator[None]:
    """Re-raises an OSError of a full disk or quota met writing the store's rows or their record (the
    writer's, naming the file) saying that the rows recorded so far are kept and how to resume."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL or RESUMES_WHEN_FULL in (e.strerror or ""):  # said once (a write in a batch)
            raise
        raise type(e)(e.errno, f"{e.strerror or 'error'}; {RESUMES_WHEN_FULL}", e.filename) from e


ZERO_STARTS = "all-0 gradients for "  # how ZeroRows' warning starts


# How many columns zero_rows reads of a row before the rest: nearly every row is nonzero there.
_PROBE = 256


def zero_rows(block: Block) -> np.ndarray:
    """(rows,) bool: which rows of a host block (NumPy or CPU torch, (rows, d), or a factored (left, right)
    pair, zero when either factor's row is) are all 0. Reading the whole block back (and a bool array of its
    size) cost a one-checkpoint export a fifth of its time, so the rows are tested in steps, each on the rows
    still all 0 after the last: their first _PROBE columns; then about _PROBE columns spread over the rest of
    the row (a layer's slice can be 0 for many rows: a ReLU unit off); then the rest in full."""

    def of(array: Any) -> np.ndarray:
        n, d = array.shape
        zero = ~np.asarray((array[:, :_PROBE] != 0).any(1))
        rows = np.flatnonzero(zero)
        if rows.size and d > _PROBE:  # a sample of these rows only (gathered: about _PROBE values a row)
            sample = array[rows, _PROBE :: max(1, (d - _PROBE) // _PROBE)]
            rows = rows[~np.asarray((sample != 0).any(1))]
        if rows.size and d > _PROBE:  # many rows: the rest of every row as a view, not a gathered copy
            many = 4 * len(rows) >= n
            left = ~np.asarray(((array[:, _PROBE:] if many else array[rows, _PROBE:]) != 0).any(1))
            rows = rows[left[rows] if many else left]
        zero[:] = False
        zero[rows] = True
        return zero

    if isinstance(block, (tuple, list)):
        return of(block[0]) | of(block[1])
    return of(block)


class ZeroRows:
    """The rows of the data whose stored gradient is all 0 (every slot) at every checkpoint this export
    computed, and one UserWarning about them at its end (`warn`). Such a row scores 0 with every row and
    cosine takes it as 0, silently (a loss of exactly 0: labels all ignored, -100, under a summed loss).
    The candidates are the rows found 0 at checkpoint 0, kept while each later checkpoint finds them 0
    again (memory O(zero rows)); once none is left, later batches are not reduced. Only the rows this run
    computed at every checkpoint count: rows a resumed store holds from an earlier run, or rows of another
    writer's range, are never claimed."""

    _SHOWN = 10

    def __init__(self) -> None:
        self._candidates: np.ndarray | None = None  # sorted, after checkpoint 0; None during it
        self._found: list[np.ndarray] = []  # during a checkpoint: the rows found 0 so far (in row order)
        self._checkpoint = 0
        self._computed = 0  # rows computed at checkpoint 0 (all of them 0 at every checkpoint: said so)

    def begin(self, checkpoint: int) -> None:
        self._checkpoint, self._found = checkpoint, []

    def end(self, checkpoint: int) -> None:
        """Checkpoint done: its rows found 0 are the candidates now (rows it did not compute are dropped)."""
        found = np.concatenate(self._found) if self._found else np.zeros(0, dtype=np.int64)
        self._candidates, self._found = np.sort(found), []  # sorted: wanted / see search it

    def wanted(self, start: int, count: int) -> bool:
        """Whether rows [start, start + count) of the current checkpoint may hold a candidate."""
        if self._candidates is None:
            return True
        lo, hi = np.searchsorted(self._candidates, [start, start + count])
        return bool(hi > lo)

    def see(self, start: int, zero: np.ndarray) -> None:
        """zero: which rows from `start` (of the current checkpoint) are all 0 in every slot."""
        zero = np.asarray(zero)
        if self._candidates is None:
            self._computed += len(zero)
            rows = start + np.flatnonzero(zero)
        else:  # the candidates among these rows only: O(rows), not O(candidates), a batch
            lo, hi = np.searchsorted(self._candidates, [start, start + len(zero)])
            rows = self._candidates[lo:hi]
            rows = rows[zero[rows - start]]
        if rows.size:
            self._found.append(rows)

    def warn(self) -> None:
        """The UserWarning about the rows still candidates (none: nothing), at the user's call."""
        from .._caller import user_stacklevel

        rows = self._candidates
        if rows is None or not rows.size:
            return
        count = len(rows)
        if count > 1 and count == self._computed:  # every row computed: the model's gradient, not the rows'
            warnings.warn(
                f"{ZERO_STARTS}all {count} rows computed (rows {int(rows[0])} to {int(rows[-1])}) of the data: "
                "the gradient is 0 at every checkpoint, so every score is 0 and cosine treats every row as 0; "
                "do the exported parameters get a gradient (layers=: frozen or unused by the loss?), "
                "or is the loss exactly 0 for every row? (e.g. all labels ignored, -100)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return
        listed = ", ".join(str(int(r)) for r in rows[: self._SHOWN])
        more = f" and {count - self._SHOWN} more" if count > self._SHOWN else ""
        which, their = (f"row {listed}", "its") if count == 1 else (f"{count} rows ({listed}{more})", "their")
        warnings.warn(
            f"{ZERO_STARTS}{which} of the data: {their} gradient is 0 at every checkpoint, so every score with "
            f"{'it' if count == 1 else 'them'} is 0 and cosine treats {'it' if count == 1 else 'them'} as 0; "
            f"a loss of exactly 0 for {'it' if count == 1 else 'them'}? (e.g. all labels ignored, -100)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
