"""export_gradients: per-example gradients of a PyTorch model at each checkpoint, to memory or a store."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._export.checkpoints import warn_unused_states
from .._export.driver import Options, check_store, export, kronecker_projection
from .._export.fingerprint import callable_identity
from .._export.layers import as_patterns
from .._export.loss_watch import LossWatch
from .._export.metadata import last_layer_entry
from .._export.projection import check_projection, refuse_empty_parameters, warn_widening
from .._export.transforms import row_transforms
from .._progress import check_progress
from .._validate import positive_int
from .capture import device_failure
from .checkpoints import (
    FreshBuffers,
    frozen_parameters,
    ignored_keys,
    legacy_state_digest,
    load_checkpoint,
    parse_checkpoints,
    state_digest,
    tied_aliases,
    written_in_forward,
)
from .data import (
    Batches,
    Tree,
    as_batches,
    batch_rows,
    call_model,
    doubled,
    dtype_mismatch,
    first_row,
    host_arrays,
    inputs_mismatch,
    integer_mismatch,
    slice_rows,
    targets_unchanged,
    tree_map,
)
from .first_rows_check import active_autocast, batch_statistics_note
from .host_copy import HostCopier
from .last_layer import LinearFactors
from .layers import (
    EXAMPLE,
    last_linear,
    linear_modules_of,
    linear_name,
    qualified,
    select_parameters,
    tied_first_names,
)
from .losses import check_loss_fn, check_loss_on
from .model_fingerprint import model_digest
from .per_example import PerExampleGradients
from .token_projection import KroneckerRows

if TYPE_CHECKING:
    from ..gradients import FactoredGradients, Gradients
    from ..store import GradientStore

_DTYPES = ("float32", "float16", "bfloat16")
_MODES = ("full", "last_layer", "factored")
_BATCH_BYTES = 256 * 2**20  # per-example gradient bytes a default batch aims at
_MAX_DEFAULT_BATCH = 1024
_CHECKED_ROWS = 2  # rows the loss_fn checks run on, once per export


def export_gradients(
    model: nn.Module,
    checkpoints: Sequence,
    data: Any,
    loss_fn: Any,
    *,
    layers: Sequence[str] | str | None = None,
    mode: str = "full",
    projection: Any = None,
    dtype: str = "float32",
    store: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    preconditioner: str | None = None,
) -> Gradients | FactoredGradients | GradientStore:
    """Per-example gradients of `loss_fn` at every checkpoint, as TracIn needs them.

    model: the nn.Module; it is run in eval mode with each checkpoint's tensors swapped in, and is
        left exactly as it was (weights, buffers, train/eval flags, requires_grad). Every forward
        starts from the checkpoint's buffers: one that changes a buffer (a running statistic, a
        counter) changes it for itself alone (tracin.torch.checkpoints.FreshBuffers; writes it
        cannot undo, through an alias or .data, are reported with a RuntimeWarning). A buffer a
        forward replaces by a tensor of another shape or dtype (a cache grown in forward) is kept,
        with a RuntimeWarning: the later forwards start from it, and the model keeps it afterwards.
        Gradients are taken whatever the caller's context (torch.no_grad() or torch.inference_mode()
        around the call: evaluation code), which is restored after.
        It runs on the device of its parameters under torch's settings as they are: on a GPU, cuDNN
        convolutions use TF32 by default (relative errors near 1e-3); set
        torch.backends.cudnn.allow_tf32 = False (and keep float32 matmul precision "highest") for
        float32 gradients. Under the caller's torch.autocast the gradients carry its rounding (a
        UserWarning says so).
    checkpoints: sequence of (state_dict or path, learning_rate); each is loaded once (files with
        torch.load(weights_only=True), a safetensors file with safetensors.torch.load_file, told by its
        first bytes; a directory is a Hugging Face save_pretrained folder holding
        model.safetensors or pytorch_model.bin, sharded or not; tied weights it leaves out are taken
        from their first name); DataParallel's "module." and torch.compile's "_orig_mod." prefixes
        are removed (a model wrapped in nn.DataParallel, DistributedDataParallel or torch.compile is
        run unwrapped, .module / ._orig_mod, its parameters named as the plain model's, layers= with
        or without the wrappers' prefix), and a file
        that cannot be read is a ValueError naming it. An entry may be (state_dict or path,
        learning_rate, optimizer.state_dict() or its path) for a preconditioner (with
        preconditioner=None the state is unused: a UserWarning says so); a state without parameter
        names (param_names, recorded by an optimizer over model.named_parameters(), torch >= 2.6) is
        matched by position, one param group in model.named_parameters() order: an order whose
        moments' shapes differ from the model's at some position is a ValueError naming it, one that
        only permutes parameters of equal shapes cannot be told and gives them each other's moments
        (see tracin.torch.checkpoints.OptimizerState). A learning rate must not be
        negative (ValueError); a zero one is taken with a UserWarning (it adds nothing to any score).
    data: (inputs, targets) tensors (NumPy arrays are taken without a copy, never cast: float64 ones,
        NumPy's default, fed to a float32 model are a TypeError saying so), a map-style Dataset, a
        DataLoader handing out its dataset's rows in order (0, 1, 2...: row i is example i; a sampler
        or batch_sampler reordering them is refused; an IterableDataset goes in a DataLoader, passed on
        its own it is refused; with num_workers > 1 each worker runs its iterator: a UserWarning), or a
        re-iterable of (inputs, targets) batches; inputs and targets a tensor or a tuple (namedtuple
        too)/dict of tensors (which of the two a tuple of two is: data.PAIR_RULE; a one-shot iterator is
        read once, with one checkpoint). The model is called model(inputs), model(*inputs) for a tuple or
        list, model(**inputs) for a dict (its keys keyword arguments): a forward(self, batch) taking one
        dict gets it from inputs (batch,). Every leaf needs a dimension 0: a scalar or other non-tensor
        leaf (a setting such as a temperature) is a ValueError naming its path (inputs['temperature']);
        give such a setting to the model (an attribute, a default of forward) or to loss_fn with
        functools.partial(loss_fn, temperature=...). Every checkpoint must see the same targets in the
        same order (checked by fingerprints: a ValueError otherwise).
    loss_fn: loss_fn(outputs, targets) -> per-example losses of shape (batch,), called with the two
        positionally (a TypeError of that call says so when its signature cannot take them): an
        instance, nn.CrossEntropyLoss(reduction="none"), not the class (refused). An elementwise loss
        (nn.MSELoss, nn.BCEWithLogitsLoss) returns the outputs' shape, (batch, 1) for one output:
        lambda outputs, targets: loss(outputs, targets).squeeze(-1).
    layers: module names (prefixes of parameter names) or globs; default every trainable parameter.
        A pattern matching trainable and frozen (requires_grad=False) parameters chooses the trainable
        ones (layers=["encoder"] over a LoRA encoder: the adapters); one matching frozen parameters
        only (a frozen layer, a parameter's full name) chooses them.
        With mode="last_layer", at most one name, of an nn.Linear (default: the last one to run); a
        weight tied to another module (a language model's head shared with its embedding) is exported
        under its first name, its gradient through this layer's forward only. A tied weight is chosen
        by its first name (layers=["transformer.wte"]), its gradient then over all its uses.
    mode: "full" -> Gradients, one (n, d) matrix per checkpoint; "last_layer" -> FactoredGradients,
        left (n, out) and right (n, in + 1) per checkpoint (exact for that layer's weight and bias);
        "factored" -> FactoredGradients with such a pair for every chosen nn.Linear layer of every
        checkpoint (checkpoint c, layer l at position c * layers + l, weight repeated): exact
        TracIn over those layers at a fraction of the cost of full gradients (all chosen parameters
        must be nn.Linear weights and biases, each layer applied once per example).
        With "full", parameters of nn.Linear, Hugging Face Conv1D, nn.Embedding and nn.LayerNorm
        layers come from one batched forward and backward pass with hooks (over any number of
        tokens; Hugging Face transformers that torch.func.vmap cannot run included), the others
        from vmap, or a per-example loop where vmap fails (the rule: per_example.PerExampleGradients).
        The hooks (and kronecker=True below) are checked on the first batch's first rows against
        per-example autograd; for a bfloat16 / float16 model that check makes a float32 copy of the
        whole state (about 4 bytes per parameter, whatever layers=), freed after the first batch.
    projection: a tracin.Projection applied to every batch before it is stored (float32 out).
        Projection(dim, seed, kind, per_layer=True, kronecker=True) (mode="full"; language models):
        the weight (with its bias, when chosen) of every chosen nn.Linear and Hugging Face Conv1D, and
        of every nn.Embedding, is projected per token, sum_t (P_rows b_t)(P_cols a_t)^T, from the one
        batched forward and backward, never forming the (out, in) gradient; the other chosen
        parameters (LayerNorm, tied weights, other layers, nn.MultiheadAttention's out_proj, whose
        weight is also used outside its forward: one warning) are computed in full (a second pass) and
        projected flat. dim is split evenly over these segments (each layer's share factored
        k_rows x k_cols, see Projection.kronecker_dims: a small side is kept whole and the share's
        unused columns are zero); metadata["projection"]["segments"] is the layout, and
        Projection.apply(full rows, segments=that layout) gives the same rows up to float32 rounding
        (not the same bits: the products run in another order; measured 4.7e-7 relative).
        tracin.torch.token_projection says more.
    dtype: stored element type, "float32", "float16" or "bfloat16". float16 keeps its precision only for
        |x| >= 2**-14 ~ 6.1e-5: rows whose values are all smaller (examples fit with a loss near 0) keep
        fewer bits or become zero (a RuntimeWarning once per export, at the first batch holding any: it
        counts and names that batch's rows, and later rows are not checked); bfloat16 has nearly float32's range.
    store: a directory: write a GradientStore there as rows are computed, and resume it if an
        earlier call with the same arguments was interrupted. Returns the finished store. Its
        metadata (compared on resume) holds fingerprints of all the data (read once more, up front),
        of every checkpoint, of the model's structure (module types and settings, parameter names,
        shapes and dtypes) and of loss_fn, so a resume with any of them changed is a ValueError
        naming what changed rather than rows mixed from two exports; a store that records no rows yet
        (an export that failed at its first batch) is made again for this call's inputs.
    batch_size: at most this many rows per gradient computation (larger incoming batches are
        split); default from the gradient size.
    progress: True, False or None: a tqdm bar over the examples of each checkpoint (None: only once
        the export has taken a couple of seconds, if tqdm is installed).
    preconditioner: None (plain gradients, SGD as in the TracIn paper), "adam" (g / (sqrt(v_hat) + eps)
        on both sides: attribution) or "adam_update" (train rows only, the next Adam step's direction;
        score against test rows exported with None: LESS-style data selection). "adam_update" needs
        mode="full"; "adam" also works factored / last_layer and with a kronecker=True projection
        through a rank-one factorisation of v (exact for a rank-one v, an approximation for Adam).
        Where v is exactly 0 (embedding rows of tokens the training never held, units never
        updated) the two part ways: full rows divide the gradient there by eps, so it dominates its
        row, while the rank-one factorisation scales the rows and columns of v that are all 0 by 0,
        so they add nothing; both warn (RuntimeWarning, once per layer and checkpoint, with counts;
        full rows only when an exported row has gradient there; neither for an nn.Embedding's
        padding_idx row, which never has gradient).
        See tracin._export.preconditioner and tracin.torch.checkpoints.OptimizerState.

    Metadata: the schema of tracin._export.metadata (framework "torch").
    Errors shared with tracin.jax (tracin._export.driver): a one-shot iterator with several
    checkpoints, data with no rows or rows changing between checkpoints are ValueError; a missing
    checkpoint file is FileNotFoundError. A loss_fn whose losses do not depend on the chosen
    parameters (constant, detached) is a ValueError. An example whose loss is NaN or infinite is not
    an export error: one RuntimeWarning per checkpoint names such rows, stored as autograd gives them:
    NaN (projected: a row of NaN; scoring refuses the set, naming the rows) or all 0 (a per-example
    mean over tokens whose labels are all -100: 0 / 0; it scores as no influence). A finite gradient
    whose projection overflows float32 is a ValueError naming the row (kronecker=True stores it:
    scoring names it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, wrapper_prefix = _unwrapped(model)
    _refuse_meta(model)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    progress = check_progress(progress)
    check_loss_fn(loss_fn)
    check_projection(projection, mode != "full")
    check_store(store)
    _warn_autocast(preconditioner)
    # gradients whatever the caller's context: evaluation code under torch.no_grad() or inference_mode()
    with torch.inference_mode(False), torch.enable_grad():
        entries = parse_checkpoints(checkpoints, model)
        warn_unused_states(entries, preconditioner)
        layers = None if layers is None else [p.removeprefix(wrapper_prefix) for p in as_patterns(layers, EXAMPLE)]
        kronecker = kronecker_projection(projection, mode, preconditioner, entries)
        # a Kronecker projection is taken per token by the adapter, the preconditioner folded into it
        options = Options(mode, layers, dtype, store, progress, None if kronecker else preconditioner)

        with _evaluating(model), FreshBuffers(model) as buffers:
            kron = (projection, entries, preconditioner) if kronecker else None
            framework = _TorchExport(model, loss_fn, layers, mode, data, batch_size, buffers, kron)
            refuse_empty_parameters(projection, framework.params)  # per_layer: a segment per parameter
            if kronecker:  # the exact rows' width: every chosen parameter's element count
                warn_widening(projection, projection.dim, sum(math.prod(shape) for _, shape in framework.params))
                return export(framework, entries, options, framework.compute_rows.recorded())
            return export(framework, entries, options, row_transforms(projection, framework.segments))


def _warn_autocast(preconditioner: str | None) -> None:
    """A UserWarning when the caller runs the export under torch.autocast; with "adam" it says how Adam's
    division amplifies that rounding (the 16-bit check of tracin._export.preconditioner does not see gradients
    that autocast sums in float32)."""
    active = active_autocast()
    if active:
        adam = (
            "; preconditioner='adam' divides it by sqrt(v_hat) + eps, so where a parameter's gradient is ~0 in exact "
            "arithmetic and its v of a float32 training tiny (an attention key's bias: GPT-2's c_attn.bias) that "
            "rounding becomes most of the rows"
            if preconditioner == "adam"
            else ""
        )
        warnings.warn(
            f"export_gradients is called under torch.autocast ({', '.join(active)}): the model runs in that "
            "precision, so the gradients carry its rounding (relative errors near 1e-2 for bfloat16), and the "
            "checks of the batched hooks, mode='last_layer' / 'factored' and kronecker=True on the first rows may "
            f"fail on it{adam}; call export_gradients outside autocast for float32 gradients",
            UserWarning,
            stacklevel=3,  # export_gradients' caller
        )


def _refuse_meta(model: nn.Module) -> None:
    """ValueError naming `model` when any of its parameters or buffers is on the meta device (built with
    device="meta" or under torch.device("meta"): shapes without data, which no forward can run on)."""
    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.device.type == "meta"]
    if meta:
        listed = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"model: its parameters or buffers are on the meta device ({listed}): they have no data for the "
            "forward passes. Call model.to_empty(device=...) first (the checkpoints then give the values)"
        )


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside nn.DataParallel / DistributedDataParallel (.module) and torch.compile (._orig_mod)
    wrappers, however nested, run as it is, its parameters under its own names; and the prefix the
    wrappers put before those names ('_orig_mod.module.'), dropped from layers= patterns."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    frames = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing compiled
    prefix = ""
    while True:
        if isinstance(model, parallel):
            model, prefix = model.module, prefix + "module."
        elif frames is not None and isinstance(model, frames.OptimizedModule):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


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


@dataclass
class _Batch:
    """Rows [start, start + count) of the data, as the user's tensors."""

    start: int
    count: int
    inputs: Tree
    targets: Tree


class _TorchExport:
    """The PyTorch side of one export (see tracin._export.driver.Framework): the model's chosen
    parameters, the gradient computation of the mode, the data as batches, the device."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        layers: list[str] | None,
        mode: str,
        data: Any,
        batch_size: int | None,
        buffers: FreshBuffers,
        kronecker: tuple | None = None,
    ):
        self.model, self.loss_fn, self.buffers = model, loss_fn, buffers
        self.reference = model.state_dict()
        # the first tensor's (a module's extra state, get_extra_state(), may be anything)
        tensors = (t for t in self.reference.values() if isinstance(t, torch.Tensor))
        self.device = next((t.device for t in tensors), torch.device("cpu"))
        self.copier = HostCopier(pinned=True) if self.device.type == "cuda" else None
        self.tied = tied_aliases(model)
        self.written = written_in_forward(model)
        self.frozen = frozen_parameters(model)  # named when a checkpoint lacks only them (LoRA / PEFT)
        self.ignored = ignored_keys(model)  # an older checkpoint's keys the model no longer holds
        modules = dict(model.named_modules())
        self.last_layer = None
        extra: dict = {}
        batches = as_batches(data, 1)  # max_rows set below, from the gradient size
        if kronecker is not None:  # (projection, checkpoints, preconditioner)
            names = select_parameters(model, layers)
            self.compute_rows = KroneckerRows(model, names, loss_fn, *kronecker)
            all_params = dict(model.named_parameters())
            self.params = [(n, tuple(all_params[n].shape)) for n in names]
            self.segments = None
            self.slot_dims = [kronecker[0].dim]
            row_elems = self.compute_rows.batch_elements
            self.inplace_width = None
            if kronecker[2]:
                extra = {"optimizer_states": [entry.optimizer.digest() for entry in kronecker[1]]}
        elif mode == "full":
            names = select_parameters(model, layers)
            self.compute_rows: Any = PerExampleGradients(model, names, loss_fn)
            all_params = dict(model.named_parameters())
            self.params = [(n, tuple(all_params[n].shape)) for n in names]
            self.segments: list[int] | None = self.compute_rows.widths
            self.slot_dims: list = [self.compute_rows.width]
            row_elems = self.compute_rows.width
            inplace = self.compute_rows.dtype == torch.float32
            # gradients in 16 bits (checked by preconditioner="adam"): 16-bit params, or autocast's compute
            half = (torch.bfloat16, torch.float16)
            self.sixteen_bit = any(all_params[n].dtype in half for n in names) or bool(active_autocast())
            self.inplace_width = self.compute_rows.width if inplace else None
        else:
            if mode == "last_layer":
                linears = [_last_layer_name(model, layers, batches, self.device)]
            else:
                linears = linear_modules_of(model, select_parameters(model, layers, note_tied=False))
            self.compute_rows = LinearFactors(model, linears, loss_fn, mode)
            # a tied weight (a language model's head shared with its embedding) is known under its first name
            first = tied_first_names(model)
            self.params = [
                (first.get(n, n), tuple(p.shape))
                for name in linears
                for n, p in modules[name].named_parameters(prefix=name, remove_duplicate=False)
            ]
            names = [n for n, _ in self.params]
            if mode == "last_layer":
                layer = linears[0]
                self.last_layer = last_layer_entry(
                    layer,
                    qualified(layer, "weight"),
                    qualified(layer, "bias") if modules[layer].bias is not None else None,
                )
            self.segments = None
            self.slot_dims = self.compute_rows.dims  # one (left, right) pair per layer
            row_elems = sum(p + q for p, q in self.slot_dims)
            self.inplace_width = None
        self.names = names
        # warns about examples whose loss is NaN or infinite, from each batch's per-example losses (compute_rows.losses)
        self.watch = LossWatch(
            "autograd",
            "a per-example mean over tokens whose labels are all -100, 0 / 0, cross_entropy's gradient being 0 "
            "at an ignored label",
        )
        self.fingerprints = {"model": model_digest(model), "loss": callable_identity(loss_fn), **extra}
        batches.max_rows = batch_size or max(1, min(_MAX_DEFAULT_BATCH, _BATCH_BYTES // (8 * row_elems)))
        self._batches = batches
        self.n_rows, self.one_shot = self._batches.n_rows, self._batches.one_shot

    def batches(self) -> Iterator[_Batch]:
        """The data's batches, once per pass; at the end of a pass, the one warning about the rows whose loss
        was not finite in it (LossWatch.flush)."""
        with self.watch.flushed():  # an interrupted pass too, raising its own error
            for start, inputs, targets in self._batches:
                yield _Batch(start, batch_rows(targets, "targets"), inputs, targets)

    def fingerprint_arrays(self, batch: _Batch) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return host_arrays(batch.targets), host_arrays(batch.inputs)

    def state_digest(self, source: Any, index: int) -> str:
        return state_digest(source, index, self.reference, self.tied, self.frozen, self.ignored)

    def legacy_state_digest(self, source: Any, index: int) -> str:
        return legacy_state_digest(source, index)

    def load(self, source: Any, index: int) -> dict[str, torch.Tensor]:
        state = load_checkpoint(source, index, self.reference, self.tied, self.written, self.frozen, self.ignored)
        self.buffers.keep(state)  # each forward starts from the checkpoint's buffers
        self.watch.checkpoint = index
        if isinstance(self.compute_rows, KroneckerRows):
            self.compute_rows.begin(index)
        return state

    def _on_device(self, batch: _Batch) -> tuple[Tree, Tree]:
        """The batch on the model's device: copied asynchronously to an accelerator (the stream orders
        it before the forward), synchronously to the CPU (the host would read a device-to-host copy
        before it lands)."""
        asynchronous = self.device.type != "cpu"
        return tuple(
            tree_map(lambda t: t.to(self.device, non_blocking=asynchronous), x) for x in (batch.inputs, batch.targets)
        )

    def check(self, state: dict[str, torch.Tensor], batch: _Batch) -> None:
        """The loss checks on the batch's first rows; on the whole batch only to word an error for it
        (a forward pass of the whole batch costs a good part of the batched gradients). An error says how
        the data was read when that may not be what was meant (Batches.note). A loss_fn changing the
        targets in place is refused (targets_unchanged): every later pass would see them changed again."""
        with _noting(self._batches.note):
            self._check(state, batch)

    def _check(self, state: dict[str, torch.Tensor], batch: _Batch) -> None:
        inputs, targets = self._on_device(batch)
        with targets_unchanged(targets):
            self._check_on(state, batch.count, inputs, targets)

    def _check_on(self, state: dict[str, torch.Tensor], count: int, inputs: Tree, targets: Tree) -> None:
        rows = min(_CHECKED_ROWS, count)
        try:
            check_loss_on(
                self.model,
                state,
                self.names,
                self.loss_fn,
                slice_rows(inputs, 0, rows),
                slice_rows(targets, 0, rows),
                rows,
            )
        except (TypeError, ValueError) as e:
            why = inputs_mismatch(self.model, inputs) if isinstance(e, TypeError) else None
            if why is not None:
                raise TypeError(why) from e
            check_loss_on(self.model, state, self.names, self.loss_fn, inputs, targets, count)
        except RuntimeError as e:  # float64 NumPy data for a float32 model: torch's own words name no data
            why = dtype_mismatch(state.values(), inputs, targets, e) or integer_mismatch(
                state.values(), inputs, targets, e
            )
            if why is not None:
                raise TypeError(why) from e
            if type(e) is not RuntimeError or device_failure(e) or "can't allocate memory" in str(e):
                raise  # the device's failures and CPU out of memory (DefaultCPUAllocator) as torch words them
            raise RuntimeError(f"{e} ({_first_rows_note(rows, count, inputs, targets)})") from e
        if isinstance(self.compute_rows, KroneckerRows):
            self.compute_rows.check(state, inputs, targets)

    def compute(self, state: dict[str, torch.Tensor], batch: _Batch) -> Any:
        return self._rows(state, batch)

    def _rows(self, state: dict[str, torch.Tensor], batch: _Batch, out: torch.Tensor | None = None) -> Any:
        """compute_rows on the batch, refusing a loss_fn that changed its targets in place there (an
        in-place change of rows past the first-rows check's, labels[labels == -100] = 0 or y.nan_to_num_():
        the passes over the batch would see other targets, and the next checkpoint other data)."""
        inputs, targets = self._on_device(batch)
        with targets_unchanged(targets):
            rows = self.compute_rows(state, inputs, targets, **({} if out is None else {"out": out}))
        losses = self.compute_rows.losses  # (rows,) on the device: one small copy to the host a batch
        if losses is not None:
            self.watch(losses.cpu().double().numpy(), batch, dtype=str(losses.dtype).removeprefix("torch."))
        return rows

    def compute_into(self, state: dict[str, torch.Tensor], batch: _Batch, out: np.ndarray) -> None:
        """On the CPU straight into `out`; on another device computed there, then copied into `out`
        through the copier's pinned buffer."""
        if self.device.type == "cpu":
            self._rows(state, batch, torch.from_numpy(out))
            return
        computed = self._rows(state, batch)
        if self.copier is None:
            torch.from_numpy(out).copy_(computed)
        else:
            self.copier.into(torch.from_numpy(out), computed)

    def to_host(self, computed: Any, count: int, float32: bool) -> list[Any]:
        """A (batch, d) tensor or a list of (left, right) pairs, on the CPU: float32 NumPy when
        asked, else tensors in a dtype the sinks take."""
        blocks = computed if isinstance(computed, list) else [computed]
        return [_host(block, float32, self.copier) for block in blocks]

    @staticmethod
    def wrap(array: np.ndarray, dtype: str) -> torch.Tensor:
        """A tensor sharing the memory of a stored array (bfloat16 kept as uint16 bits)."""
        if dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def _host(block: Any, float32: bool, copier: HostCopier | None) -> Any:
    if isinstance(block, tuple):
        return tuple(_host(b, float32, copier) for b in block)
    block = block.detach()
    if float32 or block.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        block = block.float()
    block = block.cpu() if copier is None or block.device.type == "cpu" else copier.copy(block)
    return block.numpy() if float32 else block


def _last_layer_name(model: nn.Module, layers: list[str] | None, batches: Batches, device: torch.device) -> str:
    """The layer of mode="last_layer": the one named, else the last nn.Linear to run on the first row
    (read ahead: the export's first pass over `batches` goes on from it, whatever the data)."""
    if layers is not None:
        if len(layers) != 1:
            raise ValueError(f"layers: mode='last_layer' takes one nn.Linear module name, got {layers}")
        return linear_name(model, layers[0])  # a module shared under several names: its first
    first = first_row(batches)
    if first is None:
        raise ValueError("data has no rows")
    inputs = tree_map(lambda t: t.to(device), first[0])
    with _noting(batches.note):
        try:
            return last_linear(model, lambda: call_model(model, inputs))
        except TypeError as e:
            why = inputs_mismatch(model, inputs)
            if why is None:
                raise
            raise TypeError(why) from e
        except RuntimeError as e:
            why = dtype_mismatch(model.parameters(), inputs, (), e) or integer_mismatch(
                model.parameters(), inputs, (), e
            )
            if why is not None:
                raise TypeError(why) from e
            _raise_with_batch_statistics_note(e, model, inputs)
            raise
        except ValueError as e:
            _raise_with_batch_statistics_note(e, model, inputs)
            raise


def _raise_with_batch_statistics_note(e: Exception, model: nn.Module, inputs: Tree) -> None:
    """`e`, raised running the model on one row (`inputs`), raised again noting its BatchNorm modules without
    running statistics (they fail on one row), if it has any and the model runs on that row twice (a batch
    of two: the failure is about one row); else returns."""
    note = batch_statistics_note(model)
    if note is None or type(e) not in (RuntimeError, ValueError):
        return
    try:
        last_linear(model, lambda: call_model(model, doubled(inputs)))
    except Exception:
        return  # fails on two rows too: not the one row's BatchNorm
    raise type(e)(f"{e} (tracin looks for the last nn.Linear on the first row alone; {note})") from e


def _first_rows_note(rows: int, count: int, inputs: Tree, targets: Tree) -> str:
    """Where an error of the first-rows check came from: its `rows` of the batch of `count`, and the
    batch's input and target shapes (the error's own shapes count `rows`, not the batch's rows)."""
    return (
        f"tracin's check ran the model and loss_fn on rows 0..{rows - 1} of the first batch of {count}; "
        f"the batch's inputs {_shapes(inputs)}, targets {_shapes(targets)}"
    )


def _shapes(tree: Tree) -> str:
    """The shapes of the tensors in `tree`, as the tree's structure: (8, 12) or {'input_ids': (8, 12)}."""
    if isinstance(tree, torch.Tensor):
        return str(tuple(tree.shape))
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k!r}: {_shapes(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in tree) + ("," if len(tree) == 1 else "") + ")"
    return type(tree).__name__


_NOTED = (TypeError, ValueError, RuntimeError, IndexError)  # errors a model or loss_fn fed the wrong tensors raises


@contextlib.contextmanager
def _noting(note: str | None) -> Iterator[None]:
    """An error of the types of _NOTED raised inside re-raised as one of its type, with `note` appended."""
    try:
        yield
    except _NOTED as e:
        if note is None or type(e) not in _NOTED:
            raise
        raise type(e)(f"{e} ({note})") from e
