"""export_gradients: per-example gradients of a PyTorch model at each checkpoint, to memory or a store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoints import describe, load_checkpoint, parse_checkpoints, tied_aliases
from .data import Batches, as_batches, batch_rows, call_model, tree_map
from .last_layer import LastLayerFactors
from .layers import last_linear, linear_by_name, select_parameters
from .per_example import PerExampleGradients, check_loss_fn, check_losses, losses_of
from .sinks import MemorySink, StoreSink

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODES = ("full", "last_layer")
_BATCH_BYTES = 256 * 2**20  # per-example gradient bytes a default batch aims at
_MAX_DEFAULT_BATCH = 1024


def export_gradients(model: nn.Module, checkpoints: Sequence, data: Any, loss_fn: Any, *,
                     layers: Sequence[str] | str | None = None, mode: str = "full", projection: Any = None,
                     dtype: str = "float32", store: str | os.PathLike | None = None,
                     batch_size: int | None = None, progress: bool = True):
    """Per-example gradients of `loss_fn` at every checkpoint, as TracIn needs them.

    model: the nn.Module; it is run in eval mode with each checkpoint's tensors swapped in, and is
        left exactly as it was (weights, train/eval flags, requires_grad).
    checkpoints: sequence of (state_dict or path, learning_rate); each is loaded once (paths with
        torch.load(weights_only=True)); a DataParallel "module." prefix is removed.
    data: (inputs, targets) tensors, a Dataset, a non-shuffling DataLoader, or a re-iterable of
        (inputs, targets) batches; inputs a tensor or a tuple/dict of tensors.
    loss_fn: loss_fn(outputs, targets) -> per-example losses of shape (batch,).
    layers: module names (prefixes of parameter names) or globs; default every trainable parameter.
        With mode="last_layer", at most one name, of an nn.Linear (default: the last one to run).
    mode: "full" -> Gradients, one (n, d) matrix per checkpoint; "last_layer" -> FactoredGradients,
        left (n, out) and right (n, in + 1) per checkpoint (exact for that layer's weight and bias).
    projection: a tracin.Projection applied to every batch before it is stored (float32 out).
    dtype: stored element type, "float32", "float16" or "bfloat16".
    store: a directory: write a GradientStore there as rows are computed, and resume it if an
        earlier call with the same arguments was interrupted. Returns the finished store.
    batch_size: at most this many rows per gradient computation (larger incoming batches are
        split); default from the gradient size.
    progress: show a tqdm bar over checkpoints x examples.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    check_loss_fn(loss_fn)
    sources, rates = parse_checkpoints(checkpoints)

    with _evaluating(model):
        return _export(model, sources, rates, data, loss_fn, layers, projection, dtype, store,
                       batch_size, progress, model.state_dict(), factored=mode == "last_layer")


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


def _export(model, sources, rates, data, loss_fn, layers, projection, dtype, store, batch_size,
            progress, reference, *, factored: bool):
    device = next(iter(reference.values())).device if reference else torch.device("cpu")
    meta: dict[str, Any] = {"framework": "torch", "torch_version": torch.__version__,
                            "mode": "last_layer" if factored else "full", "layers": _layers_spec(layers)}
    if factored:
        name = _last_layer_name(model, layers, data, device)
        compute = LastLayerFactors(model, name, loss_fn)
        layer = compute.layer
        meta["parameters"] = [[n, list(p.shape)] for n, p in layer.named_parameters(prefix=name)]
        meta["last_layer"] = {"module": name, "bias": compute.bias}
        raw_dims: Any = compute.dims
        row_elems = sum(raw_dims)
    else:
        names = select_parameters(model, layers)
        params = dict(model.named_parameters())
        widths = [params[n].numel() for n in names]
        compute = PerExampleGradients(model, names, loss_fn)
        meta["parameters"] = [[n, list(params[n].shape)] for n in names]
        raw_dims = sum(widths)
        row_elems = raw_dims
    rows_per_batch = batch_size or max(1, min(_MAX_DEFAULT_BATCH, _BATCH_BYTES // (8 * row_elems)))
    batches = as_batches(data, rows_per_batch)
    if batches.one_shot and len(sources) > 1:
        raise TypeError("data is a one-shot iterator, but it is read once per checkpoint; pass a list of "
                        "batches, a DataLoader or a Dataset")

    project = _projector(projection, factored, raw_dims, None if factored else widths)
    dims = project.dims
    meta.update(dtype=dtype, dims=raw_dims if not factored else list(raw_dims),
                projection=None if projection is None else projection.to_dict(),
                checkpoints=[describe(s, i) for i, s in enumerate(sources)], learning_rates=rates)
    if store is not None:
        sink: Any = StoreSink(store, batches.n_rows, [dims] * len(sources), dtype, factored, rates, meta)
        if sink.complete:
            return sink.finish()
    else:
        sink = MemorySink(batches.n_rows, len(sources), factored, rates, meta)

    run = _Run(compute, project, _DTYPES[dtype], device, sink, batches, progress, len(sources))
    with run.bar:
        for c, source in enumerate(sources):
            run.checkpoint(c, source, reference)
    return sink.finish()


class _Run:
    """The loop over checkpoints x batches, with the progress bar and the loss check."""

    def __init__(self, compute, project, dtype, device, sink, batches: Batches, progress, n_checkpoints):
        self.compute, self.project, self.dtype, self.device = compute, project, dtype, device
        self.sink, self.batches, self.n_checkpoints = sink, batches, n_checkpoints
        self.loss_checked = False
        self.tied = tied_aliases(compute.model)
        self.n_rows = batches.n_rows
        total = None if self.n_rows is None else self.n_rows * n_checkpoints
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="ex", desc="tracin export", dynamic_ncols=True)
        else:
            self.bar = contextlib.nullcontext()

    def _destination(self, c: int, start: int, rows: int) -> torch.Tensor | None:
        """The sink's own rows, when full gradients can be computed straight into them (CPU, no
        projection, stored in the model's dtype)."""
        if (self.project.projection is not None or self.device.type != "cpu"
                or not isinstance(self.compute, PerExampleGradients) or self.compute.dtype != self.dtype
                or not hasattr(self.sink, "destination")):
            return None
        return self.sink.destination(c, start, rows, self.compute.width, self.dtype)

    def _advance(self, rows: int) -> None:
        if hasattr(self.bar, "update"):
            self.bar.update(rows)

    def checkpoint(self, c: int, source: Any, reference: dict) -> None:
        done = self.sink.rows_done(c)
        if self.n_rows is not None and done >= self.n_rows:
            self._advance(self.n_rows)
            return
        if hasattr(self.bar, "set_postfix_str"):
            self.bar.set_postfix_str(f"checkpoint {c + 1}/{self.n_checkpoints}")
        state = load_checkpoint(source, c, reference, skip=self.tied)
        seen = 0
        for start, inputs, targets in self.batches:
            rows = batch_rows(targets, "targets")
            seen = start + rows
            if seen <= done:
                self._advance(rows)
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
                self.sink.write(c, start, self.project(self.compute(state, inputs, targets), self.dtype))
            self._advance(rows)  # no batch buffer outlives its iteration: the next one is not doubled
        if self.n_rows is None:
            self.n_rows = seen
        elif seen != self.n_rows:
            raise ValueError(f"data gave {seen} rows at checkpoint {c}, expected {self.n_rows}; "
                             "it must give the same rows for every checkpoint")


def _layers_spec(layers: Any) -> list[str] | None:
    if layers is None:
        return None
    return [layers] if isinstance(layers, str) else list(layers)


def _last_layer_name(model: nn.Module, layers: Any, data: Any, device: torch.device) -> str:
    spec = _layers_spec(layers)
    if spec is not None:
        if len(spec) != 1:
            raise ValueError(f"layers: mode='last_layer' takes one nn.Linear module name, got {spec}")
        linear_by_name(model, spec[0])
        return spec[0]
    first = next(iter(as_batches(data, 1)), None)
    if first is None:
        raise ValueError("data is empty")
    inputs = tree_map(lambda t: t.to(device), first[1])
    return last_linear(model, lambda: call_model(model, inputs))


class _Projector:
    """Moves a computed block to the host in the stored dtype, projecting it first if asked."""

    def __init__(self, projection: Any, factored: bool, segments: list[int] | None, dims: Any):
        self.projection, self.factored, self.segments, self.dims = projection, factored, segments, dims

    def __call__(self, block: Any, dtype: torch.dtype) -> Any:
        if self.projection is None:
            if self.factored:
                return tuple(b.to(dtype).cpu() for b in block)
            return block.to(dtype).cpu()
        if self.factored:
            left, right = (b.float().cpu().numpy() for b in block)
            return tuple(torch.from_numpy(np.ascontiguousarray(m)).to(dtype)
                         for m in self.projection.apply_factored(left, right))
        kwargs = {"segments": self.segments} if self.segments is not None else {}
        out = self.projection.apply(block.float().cpu().numpy(), **kwargs)
        return torch.from_numpy(np.ascontiguousarray(out)).to(dtype)


def _projector(projection: Any, factored: bool, raw_dims: Any, segments: list[int] | None) -> _Projector:
    """The projector, with the per-checkpoint dims of what it stores (probed on a zero row)."""
    if projection is None:
        return _Projector(None, factored, segments, tuple(raw_dims) if factored else raw_dims)
    if not (hasattr(projection, "apply") and hasattr(projection, "to_dict")):
        raise TypeError(f"projection must be a tracin.Projection, got {type(projection).__name__}")
    probe = _Projector(projection, factored, segments, None)
    if factored:
        p, q = raw_dims
        left, right = probe((torch.zeros(1, p), torch.zeros(1, q)), torch.float32)
        probe.dims = (left.shape[1], right.shape[1])
    else:
        probe.dims = probe(torch.zeros(1, raw_dims), torch.float32).shape[1]
    return probe
