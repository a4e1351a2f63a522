"""The export loop shared by the framework adapters: checkpoints x batches -> rows -> transforms -> sink.

An adapter (tracin.torch, tracin.jax) validates its own arguments and hands `export` a Framework:
the few framework-specific steps (load a checkpoint, compute a batch's rows, move them to the
host, fingerprint a batch). Everything else is decided here, once, for both: the checkpoint and
data fingerprints, the metadata, opening the sink (in memory, or a GradientStore read through once
first so its spec holds the data's fingerprint), resuming a store (only the rows not yet written
are computed and written; a batch straddling the resume point is trimmed), the row transforms,
the progress bar, the errors for the same mistakes, and closing the sink on any error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._progress import progress_bar
from .fingerprint import DataFingerprint, checkpoint_file_digest
from .metadata import export_metadata
from .sinks import MemorySink, StoreSink, Wrap, need_row_count
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
    row count when known up front, else None; one_shot: the data can be read only once.
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

    def fingerprint_arrays(self, batch: Batch, inputs: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(target arrays, input arrays or [] when not `inputs`) of the batch's real rows, on the host."""

    def state_digest(self, source: Any, index: int) -> str:
        """Digest of an in-memory checkpoint (paths are digested by the driver)."""

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
    """The export options every adapter takes (validated by the adapter before the driver runs)."""

    mode: str
    layers: list[str] | None
    dtype: str
    store: str | os.PathLike | None
    progress: bool


def check_store(store: Any) -> None:
    """TypeError unless `store` is None or a directory path."""
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a directory path or None, got {type(store).__name__}")


def export(framework: Framework, checkpoints: list[tuple[Any, float]], options: Options,
           transforms: Sequence[RowTransform]) -> Any:
    """Runs the export: Gradients / FactoredGradients in memory, or the finished GradientStore.

    checkpoints: parsed (source, learning rate) pairs; source a path or an in-memory checkpoint.
    Checkpoint c fills sink slots c * slots ... (c + 1) * slots - 1, each weighted by its rate.
    """
    n_rows = framework.n_rows
    if n_rows == 0:
        raise ValueError("data has no rows")
    if framework.one_shot and len(checkpoints) > 1:
        raise ValueError(f"data is a one-shot iterator, but it is read once per checkpoint ({len(checkpoints)} "
                         "checkpoints): pass a re-iterable such as a list of (inputs, targets) batches")
    if options.store is not None:
        need_row_count(n_rows)
    digests = [checkpoint_file_digest(source, c) if isinstance(source, (str, os.PathLike))
               else framework.state_digest(source, c) for c, (source, _) in enumerate(checkpoints)]
    slots = len(framework.slot_dims)
    dims = [chained_dims(transforms, d) for d in framework.slot_dims]
    rates = [lr for _, lr in checkpoints for _ in range(slots)]
    factored = options.mode != "full"

    def metadata(data_digest: str | None) -> dict:
        return export_metadata(framework.name, options.mode, framework.params, options.layers, options.dtype,
                               transforms, last_layer=framework.last_layer,
                               fingerprints={"data": data_digest, "checkpoints": digests, **framework.fingerprints})

    fingerprint = DataFingerprint()
    if options.store is not None:
        _read_through(framework, fingerprint)
        sink: Any = StoreSink(options.store, n_rows, dims * len(checkpoints), options.dtype, factored, rates,
                              metadata(fingerprint.data))
    else:
        sink = MemorySink(n_rows, len(checkpoints) * slots, options.dtype, factored, rates, wrap=framework.wrap)
    loop = _Loop(framework, sink, fingerprint, transforms, slots, len(checkpoints), options.progress)
    try:
        if not sink.complete:
            for c, (source, _) in enumerate(checkpoints):
                loop.checkpoint(c, source)
        return sink.finish() if isinstance(sink, StoreSink) else sink.finish(metadata(fingerprint.data))
    except BaseException:
        sink.close()
        raise
    finally:
        loop.bar.close()


def _read_through(framework: Framework, fingerprint: DataFingerprint) -> None:
    """One pass over the data recording its fingerprint (before a store, whose spec holds it, is opened)."""
    fingerprint.begin("data")
    for batch in framework.batches():
        fingerprint.batch(*framework.fingerprint_arrays(batch, inputs=True))
    fingerprint.end()


class _Loop:
    """The pass over the data at each checkpoint, with the progress bar, the one-time check of the
    user's functions and the data fingerprint check."""

    def __init__(self, framework: Framework, sink: Any, fingerprint: DataFingerprint,
                 transforms: Sequence[RowTransform], slots: int, n_checkpoints: int, progress: bool):
        self.framework, self.sink, self.fingerprint, self.transforms = framework, sink, fingerprint, transforms
        self.slots, self.n_checkpoints = slots, n_checkpoints
        self.n_rows = framework.n_rows
        self.checked = False
        total = None if self.n_rows is None else self.n_rows * n_checkpoints
        self.bar = progress_bar(total, progress, f"tracin.{framework.name} export")

    def checkpoint(self, c: int, source: Any) -> None:
        done = min(self.sink.rows_done(c * self.slots + s) for s in range(self.slots))
        if self.n_rows is not None and done >= self.n_rows:
            self.bar.update(self.n_rows)
            return
        self.bar.set_postfix_str(f"checkpoint {c + 1}/{self.n_checkpoints}")
        state = self.framework.load(source, c)
        seen = 0
        self.fingerprint.begin(f"checkpoint {c}")
        for batch in self.framework.batches():
            self.fingerprint.batch(*self.framework.fingerprint_arrays(batch, inputs=self.fingerprint.recording))
            seen = batch.start + batch.count
            if seen > done:
                self._rows(c, state, batch, skip=max(0, done - batch.start))
            self.bar.update(batch.count)  # no batch buffer outlives its iteration: the next one is not doubled
        if seen == 0:
            raise ValueError("data has no rows")
        if self.n_rows is None:
            self.n_rows = seen
        elif seen != self.n_rows:
            raise ValueError(f"data gave {seen} rows at checkpoint {c}, expected {self.n_rows}; "
                             "it must give the same rows for every checkpoint")
        self.fingerprint.end()

    def _rows(self, c: int, state: Any, batch: Batch, skip: int) -> None:
        """Computes the batch and writes its rows from `skip` on (those not yet in the sink)."""
        if not self.checked:
            self.framework.check(state, batch)
            self.checked = True
        width = self.framework.inplace_width
        if width is not None and not self.transforms and skip == 0:
            dest = self.sink.destination(c * self.slots, batch.start, batch.count, width)
            if dest is not None:
                self.framework.compute_into(state, batch, dest)
                return
        blocks = self.framework.to_host(self.framework.compute(state, batch), batch.count, bool(self.transforms))
        for s, block in enumerate(blocks):
            if skip:
                block = tuple(b[skip:] for b in block) if isinstance(block, tuple) else block[skip:]
            self.sink.write(c * self.slots + s, batch.start + skip, apply_all(self.transforms, block))
