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
from .data import Tree, batch_rows, call_model, slice_rows, tree_map
from .first_rows_check import (
    agrees,
    autocast_note,
    checked_rows,
    coarsest,
    example_gradients,
    gap,
    one_row_error,
    reference_gradients,
    tokens_counted,
    tolerances,
)
from .hook_gradients import COMPARED_ELEMENTS, HookGradients, model_outputs
from .layer_rules import mixes_examples, not_covered
from .losses import LossFn, losses_of, model_caller, random_forward

# On the CPU a batch goes through the hooks in passes of at most about this many bytes of captured layer
# inputs and output gradients: a cap on those captured tensors only, not on all a pass allocates (the
# model's other activations saved for backward, the temporaries of layer_rules). Fewer, larger passes are
# faster: against passes of 32 MiB (width-64 GPT-2 / BERT, benchmarks/transformer_export, medians of
# interleaved runs), 128 MiB is 1.04-1.13x faster with two threads (64 x 128 and 256 x 32 tokens) and
# 1.01-1.08x with one; 256 MiB gains 1-2% more. Other devices take the batch in one pass.
_PASS_BYTES = 128 * 2**20
# An output tensor of more elements per example is not compared batched vs alone (_depends_on_the_batch): keeping it
# for the comparison past the pass that made it would cost memory (a language model's (T, vocabulary) logits), so
# model_outputs drops it as it is captured.
_COMPARED_ELEMENTS = COMPARED_ELEMENTS


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
    - every batch of 2 or more rows that used the hooks: the model's outputs in the hooked (batched) pass (the
      floating tensors of its output tree, hook_gradients.output_leaves) against the same examples' outputs
      alone: every row where vmap or the loop ran too (they return them: no extra forward), else the last row
      by one forward of it alone without gradients (a spot check). They agree within (rtol + atol) x the
      largest finite |output| of that tensor in the batch (first_rows_check.tolerances of the coarsest dtype of
      the state and outputs: 1.1e-4 in float32; a batch's scale, not a row's, so that float32 rounding of a
      well-fit output is not taken for dependence), or hold the same non-finite value; a tensor whose shape
      alone is not one row of the batched one is not compared. A disagreement (an example's output depends on
      the rest of its batch: padding to the batch's longest sequence, which the first rows of the first batch
      need not show) recomputes that batch one example at a time (vmap or the loop) for every parameter, with a
      warning naming the first such batch and row (once an export; `batch_dependent` counts them); the next
      batch takes the hooks again, so a batch's rows depend on its own rows only (a resumed or distributed
      export gets the same bytes: review72 F1, review73 F1/F2).
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
        self.batches = 0  # calls so far, for the warning naming a batch
        self._first_row_off = 0  # the row _by_hooks found depending on its batch (returning None)
        self.batch_dependent = 0  # batches recomputed one example at a time (_depends_on_the_batch)
        self._vmapped = vmap(grad(self._loss_of_one, has_aux=True), in_dims=(None, None, 0, 0))

    def _loss_of_one(self, chosen: dict, rest: dict, x: Tree, y: Tree) -> tuple[torch.Tensor, tuple]:
        """The loss of one example and, as the auxiliary output, the floating tensors of its model output
        (hook_gradients.output_leaves; none when the model ran more or less than once)."""
        one = (tree_map(lambda t: t.unsqueeze(0), x), tree_map(lambda t: t.unsqueeze(0), y))
        with model_outputs(self.model, 1) as seen:
            loss = losses_of(self.model, {**rest, **chosen}, self.loss_fn, *one).sum()
        return loss, tuple(seen[0]) if len(seen) == 1 else ()

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
        self.batches += 1
        passes = 1 if self.hooks is None or out.device.type != "cpu" else -(-rows // self._pass_rows())
        batched = _Outputs(keep_all=bool(self.others))  # the hooked passes' outputs, for _depends_on_the_batch
        for start, stop in itertools.pairwise(rows * k // passes for k in range(passes + 1)):
            if self.hooks is None:
                break
            part = (slice_rows(inputs, start, stop), slice_rows(targets, start, stop))
            hooked = self._by_hooks(state, *part, out[start:stop])
            leaves, self.hooks.outputs = self.hooks.outputs, None  # past the pass, `batched` keeps what it compares
            if hooked:
                batched.add(leaves, stop - start)
            del leaves
            if hooked is None:  # the first-rows check saw this batch's outputs depend on it: the next one checks
                self._dependent(start + self._first_row_off, state, inputs, targets)
                self._by_autodiff(self.names, state, inputs, targets, out)
                return out
            if not hooked:
                self.hooks, self.others = None, list(self.names)
        checked = self.hooks is not None and rows > 1 and batched.usable
        if self.others:
            alone = self._by_autodiff(self.others, state, inputs, targets, out)
            if checked and self._depends_on_the_batch(state, batched, alone, inputs, targets):
                self._by_autodiff(self.names, state, inputs, targets, out)
        elif checked:
            # hooks only: one example alone, the last row, against its output in the batch (no gradient)
            with torch.no_grad(), model_outputs(self.model, 1) as seen:
                call_model(model_caller(self.model, state), slice_rows(inputs, rows - 1, rows))
            alone = [t.unsqueeze(0) for t in seen[0]] if len(seen) == 1 else None
            if self._depends_on_the_batch(state, batched, alone, inputs, targets):
                self._by_autodiff(self.names, state, inputs, targets, out)
        return out

    def _depends_on_the_batch(
        self, state, batched: _Outputs, alone: list[torch.Tensor] | None, inputs, targets
    ) -> bool:
        """True (after a warning, the first time in the export: _dependent) when the outputs of the batch's hooked
        passes and `alone` (per output tensor: (n, 1, ...), the last n rows of the batch each run alone) disagree
        beyond first_rows_check's tolerances relative to the batch's largest |output| (see the class docstring)."""
        if alone is None or len(alone) != len(batched.leaves):
            return False
        row = _first_differing(batched.leaves, batched.scales, alone, coarsest(state.values()))
        if row is None:
            return False
        self._dependent(batched.rows - alone[0].shape[0] + row, state, inputs, targets)
        return True

    def _dependent(self, row: int, state, inputs, targets) -> None:
        """Counts a batch whose output for `row` depends on the rest of the batch; the first time in the export,
        a warning. A forward drawing random numbers (dropout with training=True) gives the hooks up instead, as
        the first-rows check does: its rows differ from run to run whatever computes them."""
        self.batch_dependent += 1
        if self.batch_dependent > 1:
            return
        if random_forward(self.model, state, self.loss_fn, inputs, targets):  # three passes, once an export
            _warn_leaving(
                f"the model's output for row {row} of batch {self.batches} differs in its batch and alone, and the "
                "forward draws random numbers (three passes on the batch gave different losses: dropout with "
                "training=True, sampling?): every method then gives other rows on every run"
            )
            self.hooks, self.others = None, list(self.names)
            return
        warnings.warn(
            f"the model's output for row {row} of batch {self.batches} (counted from 1 over the export's calls "
            "to this gradient function) differs in its batch and alone beyond rounding: it depends on the rest of "
            "its batch (padding to the batch's longest sequence?). A per-example gradient is that of the example "
            "alone: such a batch is computed one example at a time for every parameter (torch.func.vmap or a "
            "loop), the batch after it by the hooks again; this warning is not repeated for later batches",
            RuntimeWarning,
            stacklevel=4,
        )

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

    def _by_hooks(self, state, inputs, targets, out) -> bool | None:
        """Hook-path columns of `out`; False (hooks to be given up) when the first batch of 2 or more rows (or a
        batch of one before it) shows they cannot be trusted; None (unchecked: the batch to be recomputed one
        example at a time, the next one checked) when the check's rows disagree and so do their outputs in the
        batch and alone (an output depending on its batch: padding to the batch's longest sequence)."""
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
        with model_outputs(self.model, 1) as seen:  # each checked row's outputs alone (when run once each)
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
            elif (
                not self.hooks.expanded
                and (row := self._checked_outputs_differ(state, seen, out.shape[0], rows)) is not None
            ):
                # (a layer whose batch-1 calls the hooks expanded makes the hooked outputs differ by itself)
                self._first_row_off = row
                return None
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

    def _checked_outputs_differ(self, state, seen: list[list[torch.Tensor]], batch: int, rows: int) -> int | None:
        """The first of the first-rows check's `rows` rows whose output alone (`seen`: the check's forwards, one
        per row when run in the model's dtype) differs from its output in the hooked pass of `batch` rows, as
        _depends_on_the_batch compares them; None when they agree or cannot be compared."""
        batched = _Outputs(keep_all=True)
        batched.add(self.hooks.outputs, batch)
        if not batched.usable or len(seen) != rows or any(len(s) != len(batched.leaves) for s in seen):
            return None
        try:
            alone = [torch.stack(leaf) for leaf in zip(*seen, strict=True)]
        except RuntimeError:  # shapes differing from row to row
            return None
        head = [t[:rows] for t in batched.leaves]
        return _first_differing(head, batched.scales, alone, coarsest(state.values()))

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

    def _by_autodiff(self, names: list[str], state, inputs, targets, out) -> list[torch.Tensor] | None:
        """Columns of `names` by vmap(grad), or by the per-example loop once vmap has failed. Returns the
        examples' model outputs, each run alone (per output tensor (batch, 1, ...)), or None when unknown."""
        if self.vectorised:
            chosen = {n: state[n] for n in names}
            rest = {n: t for n, t in state.items() if n not in chosen}
            try:
                grads, outputs = self._vmapped(chosen, rest, inputs, targets)
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
                return list(outputs) if outputs else None
        return self._one_at_a_time(names, state, inputs, targets, out)

    def _one_at_a_time(
        self, names: list[str], state, inputs: Tree, targets: Tree, out: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """Columns of `names`, one example at a time with torch.autograd.grad; returns the examples' outputs as
        _by_autodiff does (None when the model ran more or less than once an example or their shapes differ)."""
        rows = out.shape[0]
        with model_outputs(self.model, 1) as seen:  # each example's compared (small) outputs only
            grads = example_gradients(self.model, state, names, self.loss_fn, inputs, targets, rows)
            for i, parts in enumerate(grads):
                for n, g in zip(names, parts, strict=True):
                    offset, width = self.columns[n]
                    out[i, offset : offset + width].copy_(g.reshape(-1))
        if len(seen) != rows or len({len(s) for s in seen}) != 1:
            return None
        try:
            return [torch.stack(leaf) for leaf in zip(*seen, strict=True)]
        except RuntimeError:  # shapes differing from example to example
            return None

    def _one_row_error(self, e: Exception, state, inputs: Tree, targets: Tree) -> Exception | None:
        """first_rows_check.one_row_error for an error of vmap, whose passes are of one row each (unsqueeze(0)):
        None (raise `e` as it is) when the model and loss run on this example alone outside vmap."""
        try:
            with torch.enable_grad():
                losses_of(self.model, state, self.loss_fn, inputs, targets)
        except Exception as alone:
            return one_row_error(alone, self.model, state, self.loss_fn, inputs, targets)
        return None


def _first_differing(
    leaves: list[torch.Tensor], scales: list[torch.Tensor], alone: list[torch.Tensor], dtype: torch.dtype
) -> int | None:
    """The first row i where a batched output tensor (leaves: (n, ...) each, `scales` its batch's largest finite
    |value|) and the same example's alone (n, 1, ...) differ by more than (rtol + atol) x scale (first_rows_check.
    tolerances of the coarsest of `dtype` and the outputs' dtypes) and are not the same non-finite value; tensors of
    other shapes or devices are not compared."""
    rtol, atol = tolerances(coarsest([torch.empty(0, dtype=dtype), *leaves]))
    first = None
    for got, want, scale in zip(leaves, alone, scales, strict=True):
        n = got.shape[0]
        if want.shape != (n, 1, *got.shape[1:]) or got.device != want.device or not got.numel():
            continue
        wide = torch.float64 if torch.float64 in (got.dtype, want.dtype) else torch.float32
        g, w = got.to(wide), want.reshape(got.shape).to(wide)
        same = (g == w) | (g.isnan() & w.isnan()) | ((g - w).abs() <= (rtol + atol) * scale)
        bad = (~same).reshape(n, -1).any(1).nonzero()
        if len(bad):
            first = int(bad[0]) if first is None else min(first, int(bad[0]))
    return first


class _Outputs:
    """The model's outputs in a batch's hooked passes (hook_gradients.output_leaves of each pass): per output
    tensor, the largest finite |value| over the batch (`scales`) and the rows kept (`leaves`: every row when
    keep_all, else the last row only). Not `usable` when a pass's outputs are unknown or do not match. A tensor
    that is not batch-first (no per-example rows) or is too large (_per_row) stands as an empty (rows, 0) one: it
    compares nothing."""

    def __init__(self, keep_all: bool):
        self.keep_all, self.usable, self.rows = keep_all, True, 0
        self.scales: list[torch.Tensor] = []
        self._parts: list[list[torch.Tensor]] = []
        self._shapes: list | None = None

    def add(self, leaves: list[torch.Tensor] | None, rows: int) -> None:
        shapes = None if leaves is None else [t.shape[1:] if _per_row(t, rows) else None for t in leaves]
        if shapes is None or (self._shapes is not None and shapes != self._shapes):
            self.usable = False
            return
        self._shapes = shapes
        leaves = [t if s is not None else t.new_zeros(rows, 0) for t, s in zip(leaves, shapes, strict=True)]
        scales = [_largest_finite(t) for t in leaves]
        self.scales = (
            scales if not self.scales else [torch.maximum(a, b) for a, b in zip(self.scales, scales, strict=True)]
        )
        self.rows += rows
        self._parts = [*self._parts, leaves] if self.keep_all else [[t[-1:].clone() for t in leaves]]

    @property
    def leaves(self) -> list[torch.Tensor]:
        """Per output tensor, the rows kept (the batch's last ones), in order."""
        if len(self._parts) > 1:
            self._parts = [[torch.cat(p) for p in zip(*self._parts, strict=True)]]
        return self._parts[0] if self._parts else []


def _per_row(t: torch.Tensor, rows: int) -> bool:
    """Whether `t` holds (rows, ...) per-example outputs small enough to be compared (_COMPARED_ELEMENTS)."""
    return t.dim() > 0 and t.shape[0] == rows and t.numel() <= rows * _COMPARED_ELEMENTS


def _largest_finite(t: torch.Tensor) -> torch.Tensor:
    """The largest finite |value| of `t` (0 when none), as a 0-d float64 tensor on its device."""
    if not t.numel():
        return torch.zeros((), dtype=torch.float64, device=t.device)
    a = t.detach().abs()
    return torch.where(a.isfinite(), a, 0).max().double()


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
