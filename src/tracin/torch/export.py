"""export_gradients: per-example gradients of a PyTorch model at each checkpoint, to memory or a store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._export.fingerprint import DataFingerprint
from .._export.layers import as_patterns
from .._export.metadata import export_metadata, last_layer_entry
from .._progress import progress_bar
from .._export.projection import check_projection, project, projected_dims
from .._export.sinks import MemorySink, StoreSink, need_row_count
from .._validate import positive_int
from .checkpoints import checkpoint_digest, load_checkpoint, parse_checkpoints, tied_aliases
from .data import Batches, as_batches, batch_rows, call_model, host_arrays, tree_map
from .last_layer import LinearFactors
from .layers import EXAMPLE, last_linear, linear_by_name, linear_modules_of, select_parameters
from .per_example import PerExampleGradients, check_loss_fn, check_losses, losses_of

if TYPE_CHECKING:
    from ..gradients import FactoredGradients, Gradients
    from ..store import GradientStore

_DTYPES = ("float32", "float16", "bfloat16")
_MODES = ("full", "last_layer", "factored")
_BATCH_BYTES = 256 * 2**20  # per-example gradient bytes a default batch aims at
_MAX_DEFAULT_BATCH = 1024


def export_gradients(model: nn.Module, checkpoints: Sequence, data: Any, loss_fn: Any, *,
                     layers: Sequence[str] | str | None = None, mode: str = "full", projection: Any = None,
                     dtype: str = "float32", store: str | os.PathLike | None = None,
                     batch_size: int | None = None, progress: bool = True) -> Gradients | FactoredGradients | GradientStore:
    """Per-example gradients of `loss_fn` at every checkpoint, as TracIn needs them.

    model: the nn.Module; it is run in eval mode with each checkpoint's tensors swapped in, and is
        left exactly as it was (weights, train/eval flags, requires_grad).
    checkpoints: sequence of (state_dict or path, learning_rate); each is loaded once (paths with
        torch.load(weights_only=True)); a DataParallel "module." prefix is removed.
    data: (inputs, targets) tensors (NumPy arrays are taken without a copy), a Dataset, a DataLoader
        over a SequentialSampler, or a re-iterable of (inputs, targets) batches; inputs a tensor or
        a tuple/dict of tensors. Every checkpoint must see the same targets in the same order
        (checked by fingerprints: a ValueError otherwise).
    loss_fn: loss_fn(outputs, targets) -> per-example losses of shape (batch,).
    layers: module names (prefixes of parameter names) or globs; default every trainable parameter.
        With mode="last_layer", at most one name, of an nn.Linear (default: the last one to run).
    mode: "full" -> Gradients, one (n, d) matrix per checkpoint; "last_layer" -> FactoredGradients,
        left (n, out) and right (n, in + 1) per checkpoint (exact for that layer's weight and bias);
        "factored" -> FactoredGradients with such a pair for every chosen nn.Linear layer of every
        checkpoint (checkpoint c, layer l at position c * layers + l, weight repeated): exact
        TracIn over those layers at a fraction of the cost of full gradients (all chosen parameters
        must be nn.Linear weights and biases, each layer applied once per example).
    projection: a tracin.Projection applied to every batch before it is stored (float32 out).
    dtype: stored element type, "float32", "float16" or "bfloat16".
    store: a directory: write a GradientStore there as rows are computed, and resume it if an
        earlier call with the same arguments was interrupted. Returns the finished store. Its
        metadata (compared on resume) holds fingerprints of all the data (read once more, up front)
        and of every checkpoint, so other data or checkpoints are refused rather than mixed in.
    batch_size: at most this many rows per gradient computation (larger incoming batches are
        split); default from the gradient size.
    progress: show a tqdm bar over checkpoints x examples.

    Metadata: the schema of tracin._export.metadata (framework "torch").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    check_loss_fn(loss_fn)
    check_projection(projection, mode != "full")
    entries = parse_checkpoints(checkpoints)

    with _evaluating(model):
        return _export(model, entries, data, loss_fn, layers, projection, dtype, store,
                       batch_size, progress, model.state_dict(), mode)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _export(model, entries, data, loss_fn, layers, projection, dtype, store, batch_size,
            progress, reference, mode: str):
    device = next(iter(reference.values())).device if reference else torch.device("cpu")
    layers = None if layers is None else as_patterns(layers, EXAMPLE)
    last = None
    factored = mode != "full"
    if factored:
        if mode == "last_layer":
            names = [_last_layer_name(model, layers, data, device)]
        else:
            names = linear_modules_of(model, select_parameters(model, layers))
        compute: Any = LinearFactors(model, names, loss_fn, mode)
        modules = dict(model.named_modules())
        params = [(n, p.shape) for name in names for n, p in modules[name].named_parameters(prefix=name)]
        if mode == "last_layer":
            name = names[0]
            last = last_layer_entry(name, f"{name}.weight", f"{name}.bias" if modules[name].bias is not None else None)
        slot_dims: list = compute.dims  # one (left, right) pair per layer
        segments = None
        row_elems = sum(p + q for p, q in slot_dims)
    else:
        names = select_parameters(model, layers)
        all_params = dict(model.named_parameters())
        compute = PerExampleGradients(model, names, loss_fn)
        params = [(n, all_params[n].shape) for n in names]
        segments = compute.widths
        slot_dims = [compute.width]
        row_elems = compute.width
    rows_per_batch = batch_size or max(1, min(_MAX_DEFAULT_BATCH, _BATCH_BYTES // (8 * row_elems)))
    batches = as_batches(data, rows_per_batch)
    if batches.one_shot and len(entries) > 1:
        raise TypeError("data is a one-shot iterator, but it is read once per checkpoint; pass a list of "
                        "batches, a DataLoader or a Dataset")
    # Sink slots: per checkpoint one per layer (factored) or one; the weight repeats per slot.
    slots = len(slot_dims)
    dims = [projected_dims(projection, d, segments) for d in slot_dims]
    rates = [lr for _, lr in entries for _ in range(slots)]
    meta = export_metadata("torch", mode, params, layers, dtype, projection,
                           last_layer=last, data=None,
                           checkpoints=[checkpoint_digest(s, i) for i, (s, _) in enumerate(entries)])
    fingerprint = DataFingerprint()
    if store is not None:
        need_row_count(batches.n_rows)
        _read_through(batches, fingerprint)
        meta["fingerprints"]["data"] = fingerprint.data
        sink: Any = StoreSink(store, batches.n_rows, dims * len(entries), dtype, factored, rates, meta)
    else:
        sink = MemorySink(batches.n_rows, len(entries) * slots, dtype, factored, rates, wrap=_as_tensor)
    try:
        if not sink.complete:
            run = _Run(compute, projection, segments, device, sink, batches, fingerprint, progress, len(entries),
                       slots)
            try:
                for c, (source, _) in enumerate(entries):
                    run.checkpoint(c, source, reference)
            finally:
                run.bar.close()
        meta["fingerprints"]["data"] = fingerprint.data
        return sink.finish(meta)
    except BaseException:
        sink.close()
        raise


def _read_through(batches: Batches, fingerprint: DataFingerprint) -> None:
    """One pass over the data recording its fingerprint (before a store, whose spec holds it, is opened)."""
    fingerprint.begin("data")
    for _, inputs, targets in batches:
        fingerprint.batch(host_arrays(targets), host_arrays(inputs))
    fingerprint.end()


def _as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor sharing the memory of a stored array (bfloat16 kept as uint16 bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_host(block: Any) -> Any:
    """A computed block (tensor, (left, right) pair, or list of pairs) on the CPU in a dtype the
    sinks take."""
    if isinstance(block, (tuple, list)):
        return type(block)(_to_host(b) for b in block)
    block = block.detach()
    if block.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        block = block.float()
    return block.cpu()


class _Run:
    """The loop over checkpoints x batches, with the progress bar, the loss check and the data
    fingerprint check. Checkpoint c fills sink slots c * slots ... c * slots + slots - 1 (one per
    factored layer)."""

    def __init__(self, compute, projection, segments, device, sink, batches: Batches,
                 fingerprint: DataFingerprint, progress, n_checkpoints, slots):
        self.compute, self.projection, self.segments, self.device = compute, projection, segments, device
        self.sink, self.batches, self.fingerprint, self.n_checkpoints = sink, batches, fingerprint, n_checkpoints
        self.slots = slots
        self.loss_checked = False
        self.tied = tied_aliases(compute.model)
        self.n_rows = batches.n_rows
        total = None if self.n_rows is None else self.n_rows * n_checkpoints
        self.bar = progress_bar(total, progress, "tracin.torch export")

    def _destination(self, c: int, start: int, rows: int) -> torch.Tensor | None:
        """The sink's own rows, when full gradients can be computed straight into them (CPU, no
        projection, float32 model and stored dtype)."""
        if (self.projection is not None or self.device.type != "cpu"
                or not isinstance(self.compute, PerExampleGradients) or self.compute.dtype != torch.float32):
            return None
        dest = self.sink.destination(c, start, rows, self.compute.width)
        return None if dest is None else torch.from_numpy(dest)

    def checkpoint(self, c: int, source: Any, reference: dict) -> None:
        done = min(self.sink.rows_done(c * self.slots + s) for s in range(self.slots))
        if self.n_rows is not None and done >= self.n_rows:
            self.bar.update(self.n_rows)
            return
        self.bar.set_postfix_str(f"checkpoint {c + 1}/{self.n_checkpoints}")
        state = load_checkpoint(source, c, reference, skip=self.tied)
        seen = 0
        self.fingerprint.begin(f"checkpoint {c}")
        for start, inputs, targets in self.batches:
            rows = batch_rows(targets, "targets")
            self.fingerprint.batch(host_arrays(targets), host_arrays(inputs) if self.fingerprint.recording else ())
            seen = start + rows
            if seen <= done:
                self.bar.update(rows)
                continue
            inputs, targets = (tree_map(lambda t: t.to(self.device, non_blocking=True), x)
                               for x in (inputs, targets))
            if not self.loss_checked:
                with torch.no_grad():
                    check_losses(losses_of(self.compute.model, state, self.compute.loss_fn, inputs, targets), rows)
                self.loss_checked = True
            dest = self._destination(c, start, rows)
            if dest is not None:
                self.compute(state, inputs, targets, out=dest)
            else:
                computed = _to_host(self.compute(state, inputs, targets))
                for s, block in enumerate(computed if isinstance(computed, list) else [computed]):
                    if self.projection is not None:
                        block = project(self.projection, _float_numpy(block), self.segments)
                    self.sink.write(c * self.slots + s, start, block)
            self.bar.update(rows)  # no batch buffer outlives its iteration: the next one is not doubled
        if seen == 0:
            raise ValueError("data has no rows")
        if self.n_rows is None:
            self.n_rows = seen
        elif seen != self.n_rows:
            raise ValueError(f"data gave {seen} rows at checkpoint {c}, expected {self.n_rows}; "
                             "it must give the same rows for every checkpoint")
        self.fingerprint.end()


def _float_numpy(block: Any) -> Any:
    if isinstance(block, tuple):
        return tuple(_float_numpy(b) for b in block)
    return block.float().numpy()


def _last_layer_name(model: nn.Module, layers: list[str] | None, data: Any, device: torch.device) -> str:
    if layers is not None:
        if len(layers) != 1:
            raise ValueError(f"layers: mode='last_layer' takes one nn.Linear module name, got {layers}")
        linear_by_name(model, layers[0])
        return layers[0]
    first = next(iter(as_batches(data, 1)), None)
    if first is None:
        raise ValueError("data has no rows")
    inputs = tree_map(lambda t: t.to(device), first[1])
    return last_linear(model, lambda: call_model(model, inputs))
