"""LossWatch: one warning per checkpoint about the examples whose loss is NaN or infinite (tracin.torch and
tracin.jax exports, from the per-example losses their gradient passes compute anyway)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Protocol

import numpy as np

from .._caller import user_stacklevel


class _Rows(Protocol):
    """Rows [start, start + count) of the data; a batch's rows past count are padding."""

    start: int
    count: int


STARTS = "loss_fn gives a NaN or infinite loss for "  # how the warning starts (merged across shards by it)
_SIXTEEN_BIT = ("float16", "bfloat16")  # dtypes whose losses overflow to infinity from 65504 or ~3.4e38


class LossWatch:
    """Warns about the examples whose loss is NaN or infinite. Such a loss need not give a NaN row: an
    ignored label read as no loss at all (a per-example mean over tokens whose labels are all -100: 0 / 0;
    an out-of-range label read with take_along_axis) gives a NaN loss and a gradient of exactly 0, a row
    that scoring takes as "no influence". One RuntimeWarning per checkpoint holding such rows (`flush`, at
    the end of its pass), counting them and listing the first _SHOWN; each row is counted once per export
    (rows of the data, the checkpoint `checkpoint`, set by the export as it loads each one).

    grad: the framework's gradient, as the warning names it ("jax.grad"); zeros: the framework's cases
    of a NaN loss with an all-0 gradient, as the warning lists them.
    """

    _SHOWN = 10

    def __init__(self, grad: str, zeros: str) -> None:
        self.grad, self.zeros = grad, zeros
        self.checkpoint = 0
        self._warned = np.zeros(0, dtype=bool)  # by row from _low: warned about (1 byte a row, not a set's ~70)
        self._low = 0  # the row of _warned[0]: the record spans the rows seen (a shard's, far from row 0)
        self._count = 0  # rows found since the last flush
        self._first: list[int] = []  # the first _SHOWN of them
        self._overflowed: str | None = None  # the 16-bit dtype of an infinite loss among them, if any

    def __call__(self, losses: Any, batch: _Rows, dtype: str | None = None) -> None:
        """losses: the batch's per-example losses, (rows,), anything np.asarray reads; dtype: the name of the
        dtype loss_fn gave them in ("float16"), where `losses` is a copy in another (default: theirs)."""
        values = np.asarray(losses)[: batch.count]
        bad = ~np.isfinite(values)
        rows = batch.start + np.flatnonzero(bad)
        if rows.size:
            self._span(int(rows[0]), int(rows[-1]) + 1)
        new = rows[~self._warned[rows - self._low]]
        self._warned[new - self._low] = True
        self._count += len(new)
        self._first.extend(int(row) for row in new[: self._SHOWN - len(self._first)])
        name = dtype or values.dtype.name
        if name in _SIXTEEN_BIT and np.isinf(values[new - batch.start].astype(np.float32)).any():
            self._overflowed = name  # a new infinite 16-bit loss may be an overflow, its gradient finite and right

    def _span(self, low: int, high: int) -> None:
        """The record of rows warned about grown to span rows [low, high), at least twice (amortised) at the
        side it grows; at first just those."""
        size = len(self._warned)
        if not size:
            self._warned, self._low = np.zeros(high - low, dtype=bool), low
            return
        if low >= self._low and high <= self._low + size:
            return
        start = min(low, self._low - size) if low < self._low else self._low
        stop = max(high, self._low + 2 * size) if high > self._low + size else self._low + size
        grown = np.zeros(stop - start, dtype=bool)
        grown[self._low - start : self._low - start + size] = self._warned
        self._warned, self._low = grown, start

    def flushed(self) -> _Flushed:
        """flush() when the pass inside ends, an interrupted one too (its stored rows are not computed again
        on resume). On an error (Ctrl-C, an OSError of the data, the generator closed) the warning cannot
        escape (a warnings filter "error" made it replace the error: review343 M1) and the error is raised,
        the warning's text a note on it (its rows are not told again on resume). An error of the export's
        own loop (computing or storing a batch) reaches the batches generator this wraps as itself: the
        driver throws it in at the yield (_thrown_into), so the note is on it, not on a GeneratorExit.
        (A class, not contextlib's: a frame outside tracin would be taken for the user's line to warn at.)"""
        return _Flushed(self)

    def flush(self) -> None:
        """The warning about the rows found since the last flush (the checkpoint's pass), if any."""
        count, first, overflowed = self._count, self._first, self._overflowed
        self._count, self._first, self._overflowed = 0, [], None
        if not count:
            return
        listed = ", ".join(map(str, first))
        more = f" and {count - len(first)} more" if count > len(first) else ""
        if count == 1:
            rows, its, row, gives, example, scores = f"row {listed}", "its", "row is", "it", "that example", "scores"
        else:
            rows, its, row, gives = f"{count} rows ({listed}{more})", "their", "rows are", "them"
            example, scores = "those examples", "score"
        finite = f", or finite and right (a {overflowed} loss that overflowed to infinity)" if overflowed else ""
        advice = (
            f"compute loss_fn in float32 if it overflowed, else drop {example}" if overflowed else f"drop {example}"
        )
        warnings.warn(
            f"{STARTS}{rows} of the data at checkpoint {self.checkpoint}: "
            f"{its} gradient {row} stored as {self.grad} gives {gives}, which may be NaN (scoring then refuses the "
            f"set, naming the {row.split()[0]}) or all 0 ({self.zeros}: {example} then {scores} as having no "
            f"influence){finite}; {advice} or fix {its} targets",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


class _Flushed:
    """LossWatch.flushed()'s context manager."""

    def __init__(self, watch: LossWatch) -> None:
        self.watch = watch

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, *rest: Any) -> None:
        if kind is None:
            self.watch.flush()
            return
        try:
            self.watch.flush()
        except Warning as warned:  # a filter "error": the pass's own error is raised, the warning in a note on it
            if error is not None and not isinstance(error, GeneratorExit):  # (a closed generator's: not the user's)
                _noted(error, f"{type(warned).__name__}: {warned}")


def _noted(error: BaseException, note: str) -> None:
    """`note` added to error's notes (as add_note would before Python 3.11); an error taking none is left."""
    with contextlib.suppress(AttributeError, TypeError):
        if hasattr(error, "add_note"):
            error.add_note(note)
        else:
            error.__notes__ = [*getattr(error, "__notes__", ()), note]
