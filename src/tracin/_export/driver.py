"""The export loop shared by the framework adapters: checkpoints x batches -> rows -> transforms -> sink.

An adapter (tracin.torch, tracin.jax) validates its own arguments and hands `export` a Framework:
the few framework-specific steps (load a checkpoint, compute a batch's rows, move them to the
host, fingerprint a batch). Everything else is decided here, once, for both: the checkpoint and
data fingerprints, the metadata, opening the sink (in memory, or a GradientStore read through once
first so its spec holds the data's fingerprint), resuming a store (only the rows not yet written
are computed and written; a batch straddling the resume point is trimmed), the row transforms
(an optimizer preconditioner first, from the checkpoints' optimizer states, then the adapter's),
the progress bar, the errors for the same mistakes, and closing the sink on any error. Inside
`store_rows(start, stop)` an export writes only those rows of its store, beside other writers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._progress import progress_bar, progress_note
from ..projection import NonFiniteRowError
from ..store._files import store_root
from .checkpoints import Checkpoint, missing_optimizer_state
from .fingerprint import DataFingerprint, FileStat, check_unchanged, checkpoint_file_digest, checkpoint_file_stats
from .metadata import export_metadata
from .preconditioner import Preconditioned, check_preconditioner
from .rank_one import RankOneAdam, layer_groups
from .resume import as_exported_before, refuse_unrecorded_static, replace_empty_export
from .sinks import COUNTABLE, MemorySink, StoreSink, Wrap, ZeroRows, need_row_count, zero_rows
from .transforms import Dims, RowTransform, apply_all, chained_dims


class Batch(Protocol):
    """Rows [start, start + count) of the data; the adapter's inputs and targets ride along."""

    start: int
    count: int


class Framework(Protocol):
    """What an adapter supplies for one export.

    name: "torch" | "jax" (metadata and progress bar). params: (name, shape) of the exported
    parameters in row order; last_layer: metadata["last_layer"] or None. slot_dims: per checkpoint
    the raw widths of each sink slot (one d for full rows; one (p, q) per factored layer).
    segments: the parameter widths of a full row (per-layer projection), None when factored.
    fingerprints: the adapter's own fingerprint entries ("model", "loss"...). n_rows: the data's
    row count when known without reading it, else None (a store= export counts the rows in its
    read-through); one_shot: the data can be read only once. countable_data (optional): the data
    forms a store= export takes, in the adapter's words (for the error on one-shot data).
    inplace_width: the width of full float32 rows the adapter can compute straight into a host
    buffer (compute_into), None when it cannot.
    """

    name: str
    params: list[tuple[str, Sequence[int]]]
    last_layer: dict | None
    slot_dims: list[Dims]
    segments: list[int] | None
    fingerprints: Mapping[str, Any]
    n_rows: int | None
    one_shot: bool
    inplace_width: int | None
    wrap: Wrap

    def batches(self) -> Iterator[Batch]:
        """One pass over the data, in row order."""

    def fingerprint_arrays(self, batch: Batch) -> tuple[list[np.ndarray] | None, list[np.ndarray]]:
        """(target arrays, input arrays) of the batch's real rows, on the host; the targets may be None
        (the data has none: DataFingerprint.batch)."""

    def state_digest(self, source: Any, index: int) -> str:
        """Digest of an in-memory checkpoint (paths are digested by the driver)."""

    def legacy_state_digest(self, source: Any, index: int) -> str:
        """The digest versions before metadata["checkpoint_sources"] recorded for an in-memory
        checkpoint, where it differs from state_digest's (torch); an adapter whose digest never
        changed may omit it. Used only to resume, or return, a store those versions wrote."""

    def array_state_digest(self, source: Any, index: int) -> str:
        """The digest of an in-memory checkpoint's arrays alone, where state_digest also covers its
        static parts (jax); used only to explain why a store whose record is that digest cannot be
        resumed. An adapter whose digest never left anything out may omit it."""

    def load(self, source: Any, index: int) -> Any:
        """Checkpoint `index` ready for compute (each checkpoint is loaded once)."""

    def check(self, state: Any, batch: Batch) -> None:
        """Checks the user's functions on the first batch computed (raises on a misuse)."""

    def compute(self, state: Any, batch: Batch) -> Any:
        """The batch's per-example gradients, on the framework's device."""

    def to_host(self, computed: Any, count: int, float32: bool) -> list[Any]:
        """Per sink slot the first `count` rows of `computed` on the host, as the sinks take them
        (float32 / float16 / bfloat16); float32 NumPy when `float32` (the transforms need it)."""

    def compute_into(self, state: Any, batch: Batch, out: np.ndarray) -> None:
        """Computes the batch's full float32 rows into `out` ((count, inplace_width), host memory);
        called only when inplace_width is not None (an adapter without that path may omit it)."""


@dataclass(frozen=True)
class Options:
    """The export options every adapter takes (validated by the adapter before the driver runs).

    preconditioner: None, "adam" or "adam_update" (tracin._export.preconditioner; checked here);
    preconditioner_settings: what the metadata records with it (hyperparameters the adapter was
    given), None when they are read from each checkpoint's optimizer state.
    """

    mode: str
    layers: list[str] | None
    dtype: str
    store: str | os.PathLike | None
    progress: bool | None
    preconditioner: str | None = None
    preconditioner_settings: Mapping[str, Any] | None = None


_ROWS: ContextVar[tuple[int, int] | None] = ContextVar("tracin_export_rows", default=None)
_BATCH_STARTS: ContextVar[list[int] | None] = ContextVar("tracin_export_batch_starts", default=None)
_STORE_STATE_SAID: ContextVar[bool] = ContextVar("tracin_export_store_state_said", default=True)


@contextmanager
def store_state_unsaid() -> Iterator[None]:
    """Inside, an export does not say that its store is resumed or finished already (the caller says what it
    does: tracin.distributed's client, finalizing the store its range writers just filled)."""
    token = _STORE_STATE_SAID.set(False)
    try:
        yield
    finally:
        _STORE_STATE_SAID.reset(token)


@contextmanager
def batch_starts() -> Iterator[list[int]]:
    """Inside, an export into a store appends the first row of each batch of its reading pass to the
    list yielded (tracin.distributed cuts its row ranges on these edges)."""
    starts: list[int] = []
    token = _BATCH_STARTS.set(starts)
    try:
        yield starts
    finally:
        _BATCH_STARTS.reset(token)


@contextmanager
def store_rows(start: int, stop: int) -> Iterator[None]:
    """Exports run inside write only rows [start, stop) of their store=, as one of several writers
    on disjoint ranges (tracin.distributed.export_gradients): the store must exist (created by an
    export inside store_rows(0, 0), which creates or checks it and computes nothing), the export
    returns None and leaves the store unfinalized; a plain export of the same arguments afterwards
    merges the ranges' progress and finalizes it. Every batch is computed whole (the same bits as
    one export), then cut to the range; a range writer killed part way resumes from its last block.
    """
    token = _ROWS.set((start, stop))
    try:
        yield
    finally:
        _ROWS.reset(token)


def check_store(store: Any) -> None:
    """TypeError unless `store` is None or a directory path; ValueError for an empty one or an existing file
    (before any work)."""
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a directory path or None, got {type(store).__name__}")
    if store is not None:
        store_root(store, "store")  # "" is refused naming store= (the store layer would name its path)
        if os.path.exists(store) and not os.path.isdir(store):
            raise ValueError(
                f"store: {os.fspath(store)} exists and is not a directory; give a directory path (a new one, or "
                "the store of an earlier export to resume)"
            )


def export(
    framework: Framework,
    checkpoints: Sequence[Checkpoint | tuple],
    options: Options,
    transforms: Sequence[RowTransform],
) -> Any:
    """Runs the export: Gradients / FactoredGradients in memory, or the finished GradientStore.

    checkpoints: parsed (source, learning rate[, optimizer state]) entries; source a path or an
    in-memory checkpoint, optimizer state an OptimizerState (tracin._export.preconditioner) or None.
    Checkpoint c fills sink slots c * slots ... (c + 1) * slots - 1, each weighted by its rate.
    transforms: the adapter's row transforms; a preconditioner from `options` goes before them.
    """
    checkpoints = [Checkpoint(*entry) for entry in checkpoints]
    check_preconditioning(options.preconditioner, options.mode, checkpoints)
    transforms = [*_preconditioning(options, checkpoints, framework), *transforms]
    n_rows = framework.n_rows
    if n_rows == 0:
        raise ValueError("data has no rows")
    if framework.one_shot and len(checkpoints) > 1:
        raise ValueError(
            f"data is a one-shot iterator, but it is read once per checkpoint ({len(checkpoints)} "
            "checkpoints): pass a re-iterable such as a list of (inputs, targets) batches, or, for data larger than "
            "memory, an object whose __iter__ starts a new pass (class Batches: def __iter__(self): return "
            "make_batches(), make_batches being the generator function)"
        )
    rows = _ROWS.get()
    if rows is not None and options.store is None:
        raise ValueError("an export of a row range (tracin.distributed) needs store=, a directory every writer sees")
    if options.store is not None and n_rows is None and framework.one_shot:
        need_row_count(n_rows, getattr(framework, "countable_data", None))
    files = [isinstance(entry.source, (str, os.PathLike)) for entry in checkpoints]
    # the files each path's digest reads, as os.stat sees them first: checked again once the checkpoint is loaded
    stats: list[list[FileStat] | None] = []
    digests = []
    for c, (entry, file) in enumerate(zip(checkpoints, files, strict=True)):
        stats.append(checkpoint_file_stats(entry.source, c) if file else None)
        digests.append(checkpoint_file_digest(entry.source, c) if file else framework.state_digest(entry.source, c))
    extra = {"optimizer_states": [entry.optimizer.digest() for entry in checkpoints]} if options.preconditioner else {}
    # how each optimizer-state digest was made, wherever they are recorded (the driver's preconditioner, or the
    # adapter's with a Kronecker projection): scoring compares two "adam" sides' digests made alike
    states_recorded = "optimizer_states" in extra or "optimizer_states" in framework.fingerprints
    optimizer_sources = [optimizer_state_source(entry.optimizer) for entry in checkpoints] if states_recorded else None
    slots = len(framework.slot_dims)
    dims = [chained_dims(transforms, d) for d in framework.slot_dims]
    rates = [entry.lr for entry in checkpoints for _ in range(slots)]
    factored = options.mode != "full"

    def metadata(data_digest: str | None) -> dict:
        return export_metadata(
            framework.name,
            options.mode,
            framework.params,
            options.layers,
            options.dtype,
            transforms,
            last_layer=framework.last_layer,
            fingerprints={"data": data_digest, "checkpoints": digests, **extra, **framework.fingerprints},
            checkpoint_sources=["file" if file else "state" for file in files],
            optimizer_state_sources=optimizer_sources,
        )

    def legacy_digest(c: int) -> str | None:
        legacy = getattr(framework, "legacy_state_digest", None)
        return None if legacy is None else legacy(checkpoints[c].source, c)

    fingerprint = DataFingerprint()
    if options.store is not None:
        counted = _read_through(framework, fingerprint, options.progress)
        if n_rows is not None and counted != n_rows:
            raise ValueError(f"data gave {counted} rows, expected {n_rows} (its length)")
        n_rows = counted
        fresh = metadata(fingerprint.data)
        meta = as_exported_before(options.store, fresh, legacy_digest)
        spec = {
            "n_rows": n_rows,
            "dims": dims * len(checkpoints),
            "weights": rates,
            "dtype": options.dtype,
            "factored": factored,
        }
        # a store that records no rows holds nothing to mix: one left by an export that failed at its first
        # batch is made again for this one (never by a range writer: the store is its whole export's)
        if (rows is None or rows[0] == rows[1]) and replace_empty_export(options.store, spec, meta, fresh):
            meta = fresh
        arrays_only = getattr(framework, "array_state_digest", None)
        if arrays_only is not None:
            refuse_unrecorded_static(options.store, fresh, lambda c: arrays_only(checkpoints[c].source, c))
        sink: Any = StoreSink(
            options.store,
            n_rows,
            spec["dims"],
            options.dtype,
            factored,
            rates,
            meta,
            rows=None if rows is None or rows[0] == rows[1] else rows,
            slots=slots,
        )
        if rows is not None and rows[0] == rows[1]:  # the store created (or checked) for range writers
            sink.close()
            return None
    else:
        sink = MemorySink(
            n_rows, len(checkpoints) * slots, options.dtype, factored, rates, wrap=framework.wrap, slots=slots
        )
    loop = None
    try:  # the sink (a store's lock and files) is released on any error, the bar's creation included
        # a resumed store's rows already written, done first: where the bar starts (a range writer's from 0)
        initial = 0
        if isinstance(sink, StoreSink):
            initial = _note_store_state(framework.name, options, sink, n_rows, len(checkpoints), slots, rows)
        loop = _Loop(
            framework,
            sink,
            fingerprint,
            transforms,
            slots,
            len(checkpoints),
            # a finished store: no bar drawn at 0 of a pass computing nothing (an automatic one, None, made but
            # never updated, never shows)
            options.progress and not sink.complete,
            n_rows,
            stop=None if rows is None else rows[1],
            stats=stats,
            initial=initial if rows is None else 0,
        )
        if not sink.complete:
            for c, entry in enumerate(checkpoints):
                loop.checkpoint(c, entry.source)
        result = sink.finish() if isinstance(sink, StoreSink) else sink.finish(metadata(fingerprint.data))
    except BaseException:
        sink.close()
        raise
    finally:
        if loop is not None:
            loop.bar.close()
    loop.zeros.warn()  # after the store is finalized: a filter "error" leaves it whole
    return result


def _note_store_state(
    name: str, options: Options, sink: Any, n_rows: int, n_checkpoints: int, slots: int, rows: tuple[int, int] | None
) -> int:
    """Says once, where progress is shown (progress_note), that the export's store is finished already (its
    rows are not computed again) or that the export resumes it, with the rows already in it. Returns the rows
    (of its range, over the checkpoints in order) written before the first one missing: where a resumed
    export's bar starts."""
    start, stop = (0, n_rows) if rows is None else rows
    span = stop - start
    each = [
        max(0, min(min(sink.rows_done(c * slots + s) for s in range(slots)), stop) - start)
        for c in range(n_checkpoints)
    ]
    done = sum(each)
    # rows in it (in every slot): those after a missing row of their checkpoint too (range writers of a
    # distributed export leave gaps), which are computed again, each checkpoint's rows resumed from its first
    # missing one
    missing = sink._writer.missing  # [start, stop) ranges of a slot within the sink's rows not written yet
    held = sum(
        max(0, span - max(sum(b - a for a, b in missing(c * slots + s)) for s in range(slots)))
        for c in range(n_checkpoints)
    )
    leading = 0
    for count in each:
        leading += count
        if count < span:
            break
    where = f"gradient store {os.fsdecode(options.store)}" + ("" if rows is None else f" (rows [{start}, {stop}))")
    total = span * n_checkpoints
    shape = f"{span} examples x {n_checkpoints} checkpoint{'s' if n_checkpoints != 1 else ''}"
    if sink.complete:
        text = f"{where} holds all {total} rows already ({shape}): nothing to compute"
    elif held > done:
        text = (
            f"resuming {where}: {held} of {total} rows already in it ({shape}); computing {total - done}: the "
            f"{total - held} missing and the {held - done} written after a missing row of their checkpoint (each "
            "checkpoint resumes at its first missing row)"
        )
    elif done:
        text = f"resuming {where}: {done} of {total} rows already in it ({shape}); computing the other {total - done}"
    else:
        return 0
    if _STORE_STATE_SAID.get():
        progress_note(options.progress, f"tracin.{name} export: {text}")
    return leading


def optimizer_state_source(state: Any) -> str:
    """metadata["optimizer_state_sources"]'s entry for an adapter's optimizer state: "file" when its digest is
    of a file's bytes (torch's OptimizerState given a path keeps it as .source), else "state" (of the
    in-memory state's arrays: torch's state_dict, jax's optax state)."""
    return "file" if isinstance(getattr(state, "source", None), (str, os.PathLike)) else "state"


def check_preconditioning(kind: str | None, mode: str, checkpoints: Sequence[Checkpoint]) -> None:
    """check_preconditioner(kind, mode), then ValueError unless every checkpoint carries the optimizer
    state that a preconditioner `kind` (not None) needs."""
    check_preconditioner(kind, mode)
    if kind is None:
        return
    for c, entry in enumerate(checkpoints):
        if entry.optimizer is None:
            # os.fsdecode: a PathLike may give bytes, which os.path.join would not mix with "optimizer.pt"
            folder = os.fsdecode(entry.source) if isinstance(entry.source, (str, os.PathLike)) else None
            held = folder is not None and os.path.isfile(os.path.join(folder, "optimizer.pt"))
            raise ValueError(
                missing_optimizer_state(c, kind)
                + (
                    f"; its folder holds optimizer.pt (a Trainer's checkpoint-N): give the folder again as the "
                    f"third item, ({folder!r}, learning_rate, {folder!r})"
                    if held
                    else ""
                )
                + _mixed_optimizers_note(checkpoints)
            )


def _mixed_optimizers_note(checkpoints: Sequence[Checkpoint]) -> str:
    """For a refusal of a checkpoint without an optimizer state where others carry one (a run that trained
    with SGD, then Adam): how to export such a run, in two parts whose scores add up."""
    carrying = [c for c, entry in enumerate(checkpoints) if entry.optimizer is not None]
    if not carrying or len(carrying) == len(checkpoints):
        return ""
    return (
        f"; {len(carrying)} of the {len(checkpoints)} checkpoints carry one: for a run that changed optimizer "
        "(SGD, then Adam), export the checkpoints without a state in a call of their own with preconditioner=None "
        "and the others with the preconditioner, each on both sides, and add the two parts' results: "
        "tracin.scores, tracin.self_influence and tracin.aggregate of a set of checkpoints are sums over them"
    )


def kronecker_projection(
    projection: Any, mode: str, preconditioner: str | None, checkpoints: Sequence[Checkpoint]
) -> bool:
    """Whether `projection` is a Kronecker one (kronecker=True), which an adapter takes per token with
    the preconditioner folded in (so the driver does not check it: this does); ValueError for what it
    cannot go with."""
    if not getattr(projection, "kronecker", False):
        return False
    if mode != "full":
        raise ValueError(
            f"projection with kronecker=True projects full rows per token: it needs mode='full', got {mode!r}"
        )
    if preconditioner == "adam_update":
        raise ValueError(
            "preconditioner='adam_update' is not rank one, so a kronecker=True projection cannot keep it: "
            "use preconditioner='adam', or a projection without kronecker"
        )
    check_preconditioning(preconditioner, mode, checkpoints)
    return True


def _preconditioning(
    options: Options, checkpoints: list[Checkpoint], framework: Framework
) -> list[Preconditioned | RankOneAdam]:
    """[the preconditioner transform] when options ask for one (check_preconditioning has passed):
    Preconditioned for full rows, RankOneAdam for factored ones; else []."""
    kind = options.preconditioner
    if kind is None:
        return []
    settings = options.preconditioner_settings
    if settings is None:
        settings = {"hyperparameters": "b1, b2, eps and step of each checkpoint's optimizer state"}

    def moments(c: int) -> list:
        return checkpoints[c].optimizer.moments(framework.params)

    if options.mode != "full":
        groups = layer_groups(framework.params, framework.slot_dims)
        return [RankOneAdam(moments, groups, settings, [name for name, _ in framework.params])]
    names = [name for name, _ in framework.params]
    shapes = [shape for _, shape in framework.params]
    sixteen_bit = getattr(framework, "sixteen_bit", True)  # an adapter that cannot tell: the gradients' bits
    return [Preconditioned(kind, moments, settings, names, shapes, sixteen_bit)]


def _read_through(framework: Framework, fingerprint: DataFingerprint, progress: bool | None) -> int:
    """One pass over the data recording its fingerprint (before a store, whose spec holds it, is opened),
    with a progress bar; returns its row count."""
    bar = progress_bar(
        framework.n_rows, progress, f"tracin.{framework.name} export: reading the data", unit_scale=False
    )
    rows, starts = 0, _BATCH_STARTS.get()
    try:
        fingerprint.begin("data")
        for batch in framework.batches():
            if starts is not None:
                starts.append(batch.start)
            fingerprint.batch(*framework.fingerprint_arrays(batch))
            rows = batch.start + batch.count
            bar.update(batch.count)
        fingerprint.end()
    finally:
        bar.close()
    if rows == 0:
        raise ValueError("data has no rows")
    return rows


# after the row-count error of a pass giving fewer rows than the first (or its length)
_READ_ONCE = (
    " (data that can be read only once, such as an object whose __iter__ returns the same generator "
    "every time, is read again for each checkpoint, and once before with store=: pass {countable})"
)


class _Loop:
    """The pass over the data at each checkpoint, with the progress bar, the one-time check of the
    user's functions and the data fingerprint check. stop: the end of the range the sink writes
    (None: every row); rows from there on are not computed. stats: per checkpoint the FileStats of the
    files its digest read (None: in memory), compared once it is loaded (check_unchanged). initial: the rows
    a resumed store holds before its first missing one, where the bar starts."""

    def __init__(
        self,
        framework: Framework,
        sink: Any,
        fingerprint: DataFingerprint,
        transforms: Sequence[RowTransform],
        slots: int,
        n_checkpoints: int,
        progress: bool | None,
        n_rows: int | None,
        stop: int | None = None,
        stats: Sequence[list[FileStat] | None] = (),
        initial: int = 0,
    ):
        self.framework, self.sink, self.fingerprint, self.transforms = framework, sink, fingerprint, transforms
        self.slots, self.n_checkpoints = slots, n_checkpoints
        self.n_rows = n_rows
        self.stop = stop
        self.stats = stats
        self.countable = getattr(framework, "countable_data", None) or COUNTABLE
        self.checked = False
        self.progress = progress
        self.bar = self._bar(initial)
        self.zeros = ZeroRows()  # rows all 0 at every checkpoint this export computes (warned at its end)

    def _bar(self, initial: int = 0) -> Any:
        """initial: rows a resumed store holds, done first (the updates of the passes count them again)."""
        return progress_bar(
            self.n_rows,
            self.progress,
            f"tracin.{self.framework.name} export",
            passes=self.n_checkpoints,
            unit_scale=False,
            initial=initial,
        )

    def checkpoint(self, c: int, source: Any) -> None:
        done = min(self.sink.rows_done(c * self.slots + s) for s in range(self.slots))
        end = self.n_rows if self.stop is None else self.stop
        self.zeros.begin(c)
        if end is not None and done >= end:
            self.bar.update(self.n_rows)
            self.zeros.end(c)  # none of its rows computed here: no row is claimed 0 at every checkpoint
            return
        state = self.framework.load(source, c)
        if c < len(self.stats) and self.stats[c] is not None:  # before any of its rows is written
            check_unchanged(source, c, self.stats[c])
        seen = 0
        self.fingerprint.begin(f"checkpoint {c}")
        batches = self.framework.batches()
        for batch in batches:
            try:
                self.fingerprint.batch(*self.framework.fingerprint_arrays(batch))
                seen = batch.start + batch.count
                if seen > done and (self.stop is None or batch.start < self.stop):
                    keep = batch.count if self.stop is None else min(batch.count, self.stop - batch.start)
                    self._rows(c, state, batch, skip=max(0, done - batch.start), keep=keep)
                self.bar.update(batch.count)  # no batch buffer outlives its iteration: the next one is not doubled
            except BaseException as error:
                _thrown_into(batches, error)
                raise
        if seen == 0 and not self.n_rows:
            raise ValueError("data has no rows")
        if self.n_rows is None:  # known now (a Sequence loader in memory): later passes get a total, an ETA
            self.n_rows = seen
            if c + 1 < self.n_checkpoints:
                self.bar.close()
                self.bar = self._bar()
                self.bar.update(seen * (c + 1))
        elif seen != self.n_rows and self.fingerprint.data is None:  # the first pass: n_rows is len(data)
            raise ValueError(
                f"data gave {seen} rows at checkpoint {c}, but its length (len) was {self.n_rows}: len(data) "
                "must count the rows iterating it yields, and the data must not change during the export"
            )
        elif seen != self.n_rows:
            raise ValueError(
                f"data gave {seen} rows at checkpoint {c}, expected {self.n_rows}; "
                "it must give the same rows for every checkpoint"
                + (_READ_ONCE.format(countable=self.countable) if seen < self.n_rows else "")
            )
        self.fingerprint.end()
        self.zeros.end(c)

    def _rows(self, c: int, state: Any, batch: Batch, skip: int, keep: int) -> None:
        """Computes the batch and writes its rows [skip, keep) (those of the sink's range not yet in it)."""
        if not self.checked:
            self.framework.check(state, batch)
            self.checked = True
        width = self.framework.inplace_width
        if width is not None and not self.transforms and skip == 0 and keep == batch.count:
            dest = self.sink.destination(c * self.slots, batch.start, batch.count, width)
            if dest is not None:
                self.framework.compute_into(state, batch, dest)
                if self.zeros.wanted(batch.start, batch.count):
                    self.zeros.see(batch.start, zero_rows(dest))
                return
        with _rows_numbered(c, batch.start):
            blocks = self.framework.to_host(self.framework.compute(state, batch), batch.count, bool(self.transforms))
        watch = self.zeros.wanted(batch.start + skip, keep - skip)
        zero = None  # rows all 0 in every slot so far (of the rows stored, after the transforms)
        with self.sink.batch():  # a store records the rows of every slot once, not once per slot
            for s, block in enumerate(blocks):
                if skip or keep < batch.count:
                    block = tuple(b[skip:keep] for b in block) if isinstance(block, tuple) else block[skip:keep]
                with _rows_numbered(c, batch.start + skip):
                    block = apply_all(self.transforms, block, c, s)
                self.sink.write(c * self.slots + s, batch.start + skip, block)
                if watch and (zero is None or zero.any()):
                    zero = zero_rows(block) if zero is None else zero & zero_rows(block)
        if watch and zero is not None:
            self.zeros.see(batch.start + skip, zero)


def _thrown_into(batches: Iterator[Batch], error: BaseException) -> None:
    """`error`, raised computing or storing a batch (a Ctrl-C, a full disk, a NaN row a store refuses), thrown
    into the pass's `batches` generator at its yield, so that what it does on leaving sees that error and not
    a GeneratorExit (LossWatch.flushed notes its warning on it under a warnings filter "error"), and does it
    now, not when the traceback holding the generator is freed. The generator's own error in return (its
    cleanup failing) is raised instead, chained to `error`; one that takes the error and yields is closed, one
    that takes it and returns leaves `error` raised (not its StopIteration).
    `error` keeps its traceback (throw adds the generator's frames, and ours, before the real place), and a
    StopIteration (a next() on a spent iterator in loss_fn) is itself again, not PEP 479's RuntimeError."""
    throw = getattr(batches, "throw", None)
    if throw is None:  # an iterator, not a generator: nothing of it runs on leaving
        return
    where = error.__traceback__
    try:
        throw(error)
    except BaseException as raised:
        pep479 = isinstance(error, StopIteration) and isinstance(raised, RuntimeError) and raised.__cause__ is error
        # (PEP 479: a generator raising the StopIteration thrown in; a StopIteration of its own: it returned)
        if raised is error or pep479 or isinstance(raised, StopIteration):
            return
        raise
    finally:
        error.__traceback__ = where
    close = getattr(batches, "close", None)
    if close is not None:
        close()


@contextmanager
def _rows_numbered(checkpoint: int, first: int) -> Iterator[None]:
    """A projection's error naming a row of the block it was given (numbered from 0) names it as the
    data's row (the block's first being `first`), at checkpoint `checkpoint`."""
    try:
        yield
    except NonFiniteRowError as e:
        raise ValueError(f"checkpoint {checkpoint}: {e.message.format(first + e.row)}") from None
