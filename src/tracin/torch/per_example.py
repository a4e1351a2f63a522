"""Per-example gradients of chosen parameters: batched hooks where the layer types allow, torch.func
vmap(grad) for the rest, a per-example loop where vmap cannot run the model."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from .capture import NotCaptured, Refused, bytes_of_one, device_failure, ids_shared_by_the_batch
from .data import Tree, batch_rows, slice_rows, tree_map
from .first_rows_check import (
    agrees,
    autocast_note,
    checked_rows,
    example_gradients,
    gap,
    one_row_error,
    reference_gradients,
    tokens_counted,
)
from .hook_gradients import HookGradients
from .layer_rules import mixes_examples, not_covered
from .losses import LossFn, losses_of, random_forward

# On the CPU a batch goes through the hooks in passes of at most about this many bytes of captured layer
# inputs and output gradients: a cap on those captured tensors only, not on all a pass allocates (the
# model's other activations saved for backward, the temporaries of layer_rules). Fewer, larger passes are
# faster: against passes of 32 MiB (width-64 GPT-2 / BERT, benchmarks/transformer_export, medians of
# interleaved runs), 128 MiB is 1.04-1.13x faster with two threads (64 x 128 and 256 x 32 tokens) and
# 1.01-1.08x with one; 256 MiB gains 1-2% more. Other devices take the batch in one pass.
_PASS_BYTES = 128 * 2**20


class PerExampleGradients:
    """(batch, d) gradients of the per-example losses w.r.t. the chosen parameters, flattened and
    concatenated in `names` order, in the parameters' dtype on their device.

    The rule, parameter by parameter:
    - hooks (hook_gradients): a parameter every holder of which is an nn.Linear, Hugging Face Conv1D,
      nn.Embedding or nn.LayerNorm running its own forward and holding no parameters but weight and bias (not
      weight_norm's weight_g, weight_v: layer_rules.covers; the warning naming the modules left to vmap says
      so). Batched forward and backward passes for all of them, no vmap (transformers that vmap cannot run get
      here); on the CPU a forward pass of one example without gradients measures the bytes the hooks capture
      per example (the probe), then every batch goes in equal passes of at most about _PASS_BYTES of captured
      tensors. Not used at all when a module mixes the examples of a batch in eval mode (BatchNorm without
      running statistics: a warning). Before the first check, a hooked pass that raises any error gives the
      hooks up, with a warning naming the error (a layer run on one example at a time: the capture expands its
      calls of batch 1 to the batch, which changes what the model computes; the warning names such layers),
      except the device's failures, out of memory and a refused model (capture.Refused), which are raised. On
      the first batch, a covered layer that did not run through its forward, or ran on tensors that are not
      batch-first (batch, ..., features), sends its parameters to vmap; then the rest is checked once, on the
      first rows, against the per-example loop (16-bit state widened to float32 for it), within tolerances of
      the state's coarsest dtype widened by the gap of the loop in the model's own dtype to that reference
      (first_rows_check.tolerances): a disagreement (a layer that mixes examples, a parameter also used
      outside its module's forward) sends every parameter to vmap, with a warning; equal non-finite values on
      both sides agree (an example with a NaN loss is exported as it is; scoring refuses it, naming its row).
      Calls shared by the batch (batch size 1, broadcast later, as Hugging Face position embeddings)
      are covered; unbatched ones are not: an embedding whose 1-D ids do not grow from example 0 alone to
      example 0 twice (wpe(arange(T)), capture.ids_shared_by_the_batch) goes to vmap before the first check.
    - every other parameter: torch.func vmap(grad) over the batch. When some parameters take the
      hooks and some do not, one warning names the modules of those that do not.
    - if vmap cannot run the model (in-place ops, custom autograd functions, data-dependent control
      flow) or runs out of device memory: a warning, then one example at a time with
      torch.autograd.grad (about 1 / batch of vmap's memory). Other device failures are raised.
    Every path runs the model on batches of one row (the check, vmap, the loop): an error of a model
    and loss that run on two rows but not one is raised saying so (first_rows_check.one_row_error:
    an output squeezed to 0-d).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss_fn: LossFn):
        self.model, self.names, self.loss_fn = model, list(names), loss_fn
        params = dict(model.named_parameters())
        self.widths = [params[n].numel() for n in self.names]
        self.width = sum(self.widths)
        self.dtype = params[self.names[0]].dtype
        offsets = itertools.accumulate(self.widths, initial=0)
        self.columns = {n: (o, w) for n, o, w in zip(self.names, offsets, self.widths, strict=False)}
        self.hooks: HookGradients | None = HookGradients(model, self.names, loss_fn)
        mixing = [n for n, m in model.named_modules() if mixes_examples(m)]
        if mixing and self.hooks.plan:
            warnings.warn(
                f"{_listed(mixing)} mix the examples of a batch even in eval mode (BatchNorm without "
                "running statistics); per-example gradients are taken with torch.func.vmap, one example "
                "at a time",
                RuntimeWarning,
                stacklevel=4,
            )
        if mixing or not self.hooks.plan:
            self.hooks = None
        self.others = [n for n in self.names if self.hooks is None or n not in self.hooks.plan]
        self.skipped: dict[str, str] = {}  # covered layers the first batch showed unusable, and why
        self.checked = False  # by a check of 2 or more rows: final
        self.checked_one = False  # by a check of one row: final for passes of one row
        self.vectorised = True
        self._vmapped = vmap(grad(self._loss_of_one), in_dims=(None, None, 0, 0))

    def _loss_of_one(self, chosen: dict, rest: dict, x: Tree, y: Tree) -> torch.Tensor:
        one = (tree_map(lambda t: t.unsqueeze(0), x), tree_map(lambda t: t.unsqueeze(0), y))
        return losses_of(self.model, {**rest, **chosen}, self.loss_fn, *one).sum()

    def __call__(
        self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Writes into `out` ((batch, d), the parameters' dtype and device) when given."""
        if out is None:
            first = state[self.names[0]]
            out = torch.empty((batch_rows(targets, "targets"), self.width), dtype=first.dtype, device=first.device)
        rows = out.shape[0]
        if self.hooks is not None and out.device.type == "cpu" and self.hooks.bytes_per_row is None:
            # the probe is measured apart from the passes, so that every batch is cut into the same
            # passes whichever batch comes first (a range of a distributed export included): BLAS may
            # round a row differently in a pass of another size
            self.hooks.bytes_per_row = bytes_of_one(self.model, self.hooks.layers, state, slice_rows(inputs, 0, 1))
        if self.hooks is not None and not self.checked_one:
            self._skip_shared_ids(state, inputs)
        passes = 1 if self.hooks is None or out.device.type != "cpu" else -(-rows // self._pass_rows())
        for start, stop in itertools.pairwise(rows * k // passes for k in range(passes + 1)):
            if self.hooks is None:
                break
            part = (slice_rows(inputs, start, stop), slice_rows(targets, start, stop))
            if not self._by_hooks(state, *part, out[start:stop]):
                self.hooks, self.others = None, list(self.names)
        if self.others:
            self._by_autodiff(self.others, state, inputs, targets, out)
        return out

    def _skip_shared_ids(self, state, inputs: Tree) -> None:
        """Sends to vmap the embeddings the hooks would take one id per example that are called on 1-D ids
        shared by the batch (capture.ids_shared_by_the_batch: wpe(arange(T)), T == rows by chance included),
        before the first check (which would otherwise give up the hooks of every layer)."""
        modules = dict(self.model.named_modules())
        embeddings = [m for m in self.hooks.layers if isinstance(modules[m], nn.Embedding) and m not in self.skipped]
        if embeddings:
            shared = ids_shared_by_the_batch(self.model, embeddings, state, inputs)
            self.skipped = {**self.skipped, **dict.fromkeys(sorted(shared), "called on 1-D ids shared by the batch")}

    def _pass_rows(self) -> int:
        """Most rows of a hook pass: about _PASS_BYTES of captured tensors (measured by the probe). A
        batch is cut into the fewest passes of at most this many rows, of equal sizes (+-1 row): no
        small last pass paying a pass's fixed costs for a few rows."""
        per_row = self.hooks.bytes_per_row
        return max(1, int(_PASS_BYTES // max(per_row, 1.0)))

    def _by_hooks(self, state, inputs, targets, out) -> bool:
        """Hook-path columns of `out`; False (hooks to be given up) when the first batch of 2 or more rows (or a
        batch of one before it) shows they cannot be trusted."""
        try:
            silent, unusable = self.hooks(state, inputs, targets, out, self.columns)
        except Exception as e:  # KeyboardInterrupt and other BaseExceptions pass
            refused = isinstance(e, (Refused, MemoryError)) or device_failure(e)
            if refused or (self.checked_one and not isinstance(e, NotCaptured)):
                # the device's failure, out of memory, a model refused, or after the first batch the model's:
                # not the hooks'
                explained = (
                    one_row_error(e, self.model, state, self.loss_fn, inputs, targets) if len(out) == 1 else None
                )
                if explained is None:
                    raise
                raise explained from e
            # before the first check, any failure of the hooked pass gives the hooks up: the layers they
            # expanded (capture.stream) may have changed what the model computes, into an error of any type
            _warn_leaving(
                f"the hooked pass failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                + self._one_at_a_time_layers(out.shape[0])
            )
            return False
        if self.checked or (self.checked_one and out.shape[0] < 2):
            if unusable:
                _warn_leaving("; ".join(f"{m}: {why}" for m, why in unusable.items()))
                return False
            return True
        self.skipped = {**self.skipped, **dict.fromkeys(silent, "did not run through its forward"), **unusable}
        if self.skipped:
            moved = set(self.hooks.drop(list(self.skipped)))
            self.others = [n for n in self.names if n in moved or n in self.others]
            if not self.hooks.plan:
                return False
        head_inputs, head_targets, rows = checked_rows(inputs, targets, out.shape[0])
        hooked = list(self.hooks.plan)
        reference = reference_gradients(self.model, state, hooked, self.loss_fn, head_inputs, head_targets, rows)
        columns = [self.columns[n] for n in hooked]
        pairs = [(out[:rows, o : o + w], _stacked(reference.rows, k)) for k, (o, w) in enumerate(columns)]
        widened = reference.own is not None
        own_gap = gap((_stacked(reference.own, k), want) for k, (_, want) in enumerate(pairs)) if widened else 0.0
        tokens = tokens_counted(reference, self.model, self.hooks.layers, state, slice_rows(head_inputs, 0, 1))
        if not agrees(pairs, reference.dtype, tokens, widened, own_gap):
            if random_forward(self.model, state, self.loss_fn, head_inputs, head_targets):
                _warn_leaving(
                    "they disagree with per-example autograd on the first batch, and the forward draws "
                    "random numbers (three passes on the same rows gave different losses: dropout with "
                    "training=True, sampling?): every method then gives other rows on every run"
                )
            else:
                _warn_leaving(
                    "they disagree with per-example autograd on the first batch: a layer mixes the "
                    "examples of a batch, or a parameter is also used outside its module's forward"
                    + (", or a layer ran on one example at a time" if self.hooks.expanded else "")
                    + self._one_at_a_time_layers(out.shape[0])
                    + autocast_note()
                )
            return False
        first, self.checked_one = not self.checked_one, True
        self.checked = rows > 1  # one row cannot show a layer mixing the examples: checked again
        if self.others and first:
            modules = dict(self.model.named_modules())
            owners = dict.fromkeys(n.rpartition(".")[0] for n in self.others)
            reasons = {m: self.skipped.get(m) or (not_covered(modules[m]) if m in modules else None) for m in owners}
            named = [
                f"{m or 'the model itself'} ({type(modules[m]).__name__}{': ' + reasons[m] if reasons[m] else ''})"
                for m in owners
            ]
            warnings.warn(
                f"the batched per-example hooks cover nn.Linear, Conv1D, nn.Embedding and nn.LayerNorm "
                f"layers run through their forward, holding no parameters but weight and bias; {_listed(named)} "
                "are computed with torch.func.vmap instead",
                UserWarning,
                stacklevel=4,
            )
        return True

    def _one_at_a_time_layers(self, rows: int) -> str:
        """Words for the warning giving up the hooks, naming the layers the hooked pass ran on batch-1 tensors
        in a batch of `rows` (a loop over the examples, or a call shared by the batch: capture.stream)."""
        if not self.hooks.expanded:
            return ""
        return (
            f"; {_listed(sorted(self.hooks.expanded))} ran on batch-1 tensors in a batch of {rows} rows, which "
            "the hooks take for a call shared by the batch and expand to it: a layer run on one example at a "
            "time (a loop over the rows) then computes something else"
        )

    def _by_autodiff(self, names: list[str], state, inputs, targets, out) -> None:
        """Columns of `names` by vmap(grad), or by the per-example loop once vmap has failed."""
        if self.vectorised:
            chosen = {n: state[n] for n in names}
            rest = {n: t for n, t in state.items() if n not in chosen}
            try:
                grads = self._vmapped(chosen, rest, inputs, targets)
            except (RuntimeError, NotImplementedError) as e:
                out_of_memory = isinstance(e, torch.cuda.OutOfMemoryError)
                if device_failure(e) and not out_of_memory:
                    raise
                why = str(e).splitlines()[0]
                if "saved tensor hooks" in why:  # torch.utils.checkpoint(use_reentrant=False), CPU offloading
                    why += " (the forward saves tensors through hooks: activation checkpointing or offloading)"
                cannot = "ran out of device memory on a batch" if out_of_memory else "cannot run this model"
                warnings.warn(
                    f"torch.func.vmap {cannot} ({type(e).__name__}: {why}); falling back to a slower "
                    "per-example loop" + (" (about 1 / batch of vmap's memory)" if out_of_memory else ""),
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.vectorised = False
            except Exception as e:  # the model's or loss's error on the one-row batches vmap runs
                one = (slice_rows(inputs, 0, 1), slice_rows(targets, 0, 1))
                explained = self._one_row_error(e, state, *one)
                if explained is None:
                    raise
                raise explained from e
            else:
                for n in names:
                    offset, width = self.columns[n]
                    out[:, offset : offset + width].copy_(grads[n].reshape(out.shape[0], width))
                return
        self._one_at_a_time(names, state, inputs, targets, out)

    def _one_at_a_time(self, names: list[str], state, inputs: Tree, targets: Tree, out: torch.Tensor) -> None:
        """Columns of `names`, one example at a time with torch.autograd.grad."""
        grads = example_gradients(self.model, state, names, self.loss_fn, inputs, targets, out.shape[0])
        for i, parts in enumerate(grads):
            for n, g in zip(names, parts, strict=True):
                offset, width = self.columns[n]
                out[i, offset : offset + width].copy_(g.reshape(-1))

    def _one_row_error(self, e: Exception, state, inputs: Tree, targets: Tree) -> Exception | None:
        """first_rows_check.one_row_error for an error of vmap, whose passes are of one row each (unsqueeze(0)):
        None (raise `e` as it is) when the model and loss run on this example alone outside vmap."""
        try:
            with torch.enable_grad():
                losses_of(self.model, state, self.loss_fn, inputs, targets)
        except Exception as alone:
            return one_row_error(alone, self.model, state, self.loss_fn, inputs, targets)
        return None


def _stacked(grads: list[list[torch.Tensor]], k: int) -> torch.Tensor:
    """(rows, numel) of parameter k's gradients, one row per example."""
    return torch.stack([g[k].reshape(-1) for g in grads])


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _warn_leaving(reason: str) -> None:
    warnings.warn(
        f"per-example gradients by batched hooks given up ({reason}); using torch.func.vmap",
        RuntimeWarning,
        stacklevel=5,
    )
