"""Per-example gradients of chosen parameters: batched hooks where the layer types allow, torch.func
vmap(grad) for the rest, a per-example loop where vmap cannot run the model."""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from .._caller import user_stacklevel
from .capture import NotCaptured, Refused, bytes_of_one, device_failure, ids_shared_by_the_batch
from .data import Tree, batch_rows, call_model, slice_rows, tree_map
from .first_rows_check import (
    agrees,
    as_float64,
    autocast_note,
    checked_rows,
    coarsest,
    example_gradients,
    float64_room,
    gap,
    one_row_error,
    reference_gradients,
    tokens_counted,
    tolerances,
)
from .hook_gradients import COMPARED_ELEMENTS, HookGradients, model_outputs, recorded_losses, recording
from .layer_rules import mixes_examples, not_covered
from .losses import LossFn, losses_of, model_caller, random_forward

# On the CPU a batch goes through the hooks in passes of at most about this many bytes of captured layer
# inputs and output gradients: a cap on those captured tensors only, not on all a pass allocates (the
# model's other activations saved for backward, the temporaries of layer_rules). Fewer, larger passes are
# faster: against passes of 32 MiB (width-64 GPT-2 / BERT, benchmarks/transformer_export, medians of
# interleaved runs), 128 MiB is 1.04-1.13x faster with two threads (64 x 128 and 256 x 32 tokens) and
# 1.01-1.08x with one; 256 MiB gains 1-2% more. Other devices take the batch in one pass.
_PASS_BYTES = 128 * 2**20
# Outputs that differ batched vs alone beyond the tolerance are run again in float64 (_beyond_rounding) before the
# batch is taken as depending on the rest of it. The float64 copy of the state that takes is kept from one such look
# to the next of the same checkpoint (the same tensors, unmodified: the export loads a checkpoint once for all its
# batches) when it is at most this many bytes, the size of a CPU pass's captured tensors: a model whose outputs are
# small differences of large sums can need a look on every batch, and copying the state again for each costs about as
# much as its float64 forward of a few rows. A larger copy is made for each look and freed after it, but for its
# floating buffers (small, and FreshBuffers keeps a working copy of every buffer a forward of the checkpoint ran with
# until the next checkpoint: a new float64 buffer on each look would pile up there).
_KEPT_FLOAT64_BYTES = _PASS_BYTES


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
      outside its module's forward) sends every parameter to vmap, with a warning, where a float32 one is still
      there when the checked rows' hooked pass and autograd are run again in float64 (_disagree_in_float64: a
      well-fit regression's residuals differ by float32 rounding alone, batched vs alone); equal non-finite values on
      both sides agree (an example with a NaN loss is exported as it is: a NaN row, or an all-0 one for a mean over
      no tokens, 0 / 0; the export warns naming it, `losses`).
      Calls shared by the batch (batch size 1, broadcast later, as Hugging Face position embeddings)
      are covered; unbatched ones are not: an embedding whose 1-D ids do not grow from example 0 alone to
      example 0 twice (wpe(arange(T)), capture.ids_shared_by_the_batch) goes to vmap before the first check.
    - every other parameter: torch.func vmap(grad) over the batch. When some parameters take the
      hooks and some do not, one warning names the modules of those that do not.
    - if vmap cannot run the model (in-place ops, custom autograd functions, data-dependent control
      flow) or runs out of device memory: a warning, then one example at a time with
      torch.autograd.grad (about 1 / batch of vmap's memory). Other device failures are raised.
    - every batch of 2 or more rows that used the hooks: the model's outputs in the hooked (batched) pass (the floating
      tensors of its output tree, hook_gradients.output_leaves) against the same examples' outputs alone: every row
      where vmap or the loop ran too (they return them: no extra forward), else the last row by one forward of it alone
      without gradients (a spot check). They agree within (rtol + atol) x the largest finite |output| of that tensor in
      the batch (first_rows_check.tolerances of the coarsest dtype of the state and outputs: 1.1e-4 in float32; a
      batch's scale, not a row's, so that float32 rounding of a well-fit output is not taken for dependence), or hold
      the same non-finite value. A batch-first tensor, (rows, *rest) in the pass, that is (1, *other) alone, other !=
      rest (per-token outputs over the batch's longest sequence), is compared over the part the example has alone
      (_row_gaps: the leading or trailing slice of the batched row, whichever is closer), and the example's loss in
      the pass and alone is compared relative to its own |loss| with a floor (_reshaped_rows, _loss_differs: a model
      and loss masking the padding agree; a well-fit row reading the pads is not hidden by a large loss elsewhere);
      another tensor whose shape alone is not one row of the batched one (sequence-first, 0-d) is not compared.
      Rows (and such losses) that disagree are run again in float64, the pass holding them and each of them alone
      (_beyond_rounding): outputs that are small differences of large sums differ by float32 rounding beyond the
      tolerance, which float64 shrinks ~2e-9-fold (`rounding_only` counts such batches: hooks kept, no warning). A
      disagreement still there in float64 (an example's output depends on the rest of its batch: padding to the batch's
      longest sequence, which the first rows of the first batch need not show), or one the float64 look could not judge
      (no room for the copy, the model failing or not computing in float64; the warning says why), recomputes that batch
      one example at a time (vmap or the loop) for every parameter, with a warning naming the first such batch and row,
      the gap and the tolerance (once an export; `batch_dependent` counts them); the next batch takes the hooks again,
      so a batch's rows depend on its own rows only (a resumed or distributed export gets the same bytes).
    - every hooked pass: each hooked parameter's rows summed over the batch (from the captured calls, each call's
      tokens of all examples taken as one example's: a GEMM for a Linear; a large Linear, Conv1D or Embedding weight
      along 16 fixed Gaussian directions instead, hook_gradients._unsummed_along) against autograd's gradient of
      the batch's summed loss from the same backward pass (hook_gradients._unsummed, scale-aware): a parameter also
      used outside its layer's forward (F.linear(x, layer.weight), a forward hook) for examples past the first rows
      checked is missed by the hooks. Such a batch is recomputed one example at a time for every parameter (vmap or
      the loop), with a warning naming the layer (once an export; `unsummed_batches` counts them). Cost: 18-20% of a
      hooked batch of MLPs on one CPU thread (the parameter gradients in the backward pass and the summed factors, about
      7% each; digits 64-128-128-10 and 256-512-512-10, batch 256, min of 30 interleaved runs); 10% of the digits
      MLP's whole export (3 checkpoints, two threads).
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
                stacklevel=user_stacklevel(),
            )
        if mixing or not self.hooks.plan:
            self.hooks = None
        self.others = [n for n in self.names if self.hooks is None or n not in self.hooks.plan]
        self.skipped: dict[str, str] = {}  # covered layers the first batch showed unusable, and why
        self.checked = False  # by a check of 2 or more rows: final
        self.checked_one = False  # by a check of one row: final for passes of one row
        self.vectorised = True
        self.batches = 0  # calls so far, for the warning naming a batch
        self.batch_dependent = 0  # batches recomputed one example at a time (_depends_on_the_batch)
        self.rounding_only = 0  # batches whose outputs differed in float32 only, not in float64 (_beyond_rounding)
        self.unsummed_batches = 0  # batches recomputed one example at a time as their hooked rows did not sum up
        # _one_at_a_time's outputs per example ((1, ...) each), where their shapes differ from example to example
        self._alone_outputs: list[list[torch.Tensor]] | None = None
        self._found: tuple[int, str] = (0, "")  # the row _by_hooks found depending on its batch, and the words
        # float64 copies of the state's floating tensors kept between looks (_float64_state): name -> (a weak
        # reference to the tensor copied, its version counter then, the copy)
        self._float64: dict[str, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self._alone_losses: torch.Tensor | None = None  # vmap's per-example losses, (rows,), for _loss_differs
        # the last call's per-example losses ((rows,), detached, on the device; None when unknown), for the export's
        # warning about a NaN or infinite loss (_export.loss_watch)
        self.losses: torch.Tensor | None = None
        self._vmapped = vmap(grad_and_value(self._loss_of_one, has_aux=True), in_dims=(None, None, 0, 0))

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
        if any(state.get(n) is not source() for n, (source, _, _) in self._float64.items()):
            self._float64 = {}  # another checkpoint's
        passes = 1 if self.hooks is None or out.device.type != "cpu" else -(-rows // self._pass_rows())
        batched = _Outputs(keep_all=bool(self.others))  # the hooked passes' outputs, for _depends_on_the_batch
        self.losses, pass_losses = None, []
        for start, stop in itertools.pairwise(rows * k // passes for k in range(passes + 1)):
            if self.hooks is None:
                break
            part = (slice_rows(inputs, start, stop), slice_rows(targets, start, stop))
            hooked = self._by_hooks(state, *part, out[start:stop])
            leaves, self.hooks.outputs = self.hooks.outputs, None  # past the pass, `batched` keeps what it compares
            if hooked:
                batched.add(leaves, stop - start, self.hooks.losses)
                pass_losses.append(self.hooks.losses)
            del leaves
            if hooked is None:  # the first-rows check saw this batch's outputs depend on it: the next one checks
                self._dependent(start + self._found[0], self._found[1], state, inputs, targets)
                self._by_autodiff(self.names, state, inputs, targets, out)
                return out
            if hooked and self.hooks.unsummed:  # a hooked parameter also used where the hooks do not see
                self._unsummed(self.hooks.unsummed)
                self._by_autodiff(self.names, state, inputs, targets, out)
                return out
            if not hooked:
                self.hooks, self.others = None, list(self.names)
        if self.hooks is not None and len(pass_losses) == passes and all(t is not None for t in pass_losses):
            self.losses = torch.cat(pass_losses)
        checked = self.hooks is not None and rows > 1 and batched.usable
        if self.others:
            self._alone_outputs = self._alone_losses = None
            alone = self._by_autodiff(self.others, state, inputs, targets, out)
            examples, self._alone_outputs = self._alone_outputs, None
            losses, self._alone_losses = self._alone_losses, None
            if alone is None and examples is not None:  # per output tensor, each example's (1, ...)
                alone = [list(leaf) for leaf in zip(*examples, strict=True)]
            if checked and self._depends_on_the_batch(state, batched, alone, inputs, targets, losses):
                self._by_autodiff(self.names, state, inputs, targets, out)
        elif checked:
            # hooks only: one example alone, the last row, against its output in the batch (no gradient)
            with torch.no_grad(), model_outputs(self.model, 1) as seen:
                outputs = call_model(model_caller(self.model, state), slice_rows(inputs, rows - 1, rows))
                loss = _loss_or_none(self.loss_fn, outputs, slice_rows(targets, rows - 1, rows))
            del outputs
            alone = [t.unsqueeze(0) for t in seen[0]] if len(seen) == 1 else None
            if self._depends_on_the_batch(state, batched, alone, inputs, targets, loss):
                self._by_autodiff(self.names, state, inputs, targets, out)
        return out

    def _depends_on_the_batch(
        self,
        state,
        batched: _Outputs,
        alone: list[torch.Tensor | list[torch.Tensor]] | None,
        inputs,
        targets,
        losses: torch.Tensor | None = None,
    ) -> bool:
        """True (after a warning, the first time in the export: _dependent) when the outputs of the batch's hooked
        passes and `alone` (per output tensor: (n, 1, ...), the last n rows of the batch each run alone, or a list of
        their n (1, ...) where shapes differ from example to example) disagree beyond first_rows_check's tolerances
        relative to the batch's largest |output|, also in float64 or where float64 cannot tell (_beyond_rounding; see
        the class docstring). An output whose shape changes with the batch (_reshaped_rows: trimmed to the batch's
        longest sequence) is compared so over the part the example has alone (_row_gaps), and the example's loss in
        the batch and alone (`losses`: the last rows'; computed here where None) is compared too (_loss_differs): a
        model that masks the padding (causal attention with a mask, a packed RNN) and a loss that masks it give the
        same outputs there and the same loss and gradient; a model reading the pads does not, however small the
        example's loss is beside the batch's."""
        if not alone:
            return False
        shapes = [[t[i].shape for t in alone] for i in range(len(alone[0]))]
        if any(len(s) != len(batched.leaves) for s in shapes):
            return False
        offset = batched.rows - len(shapes)
        found = None
        reshaped = dict(_reshaped_rows(batched, shapes, offset))
        for row, words in reshaped.items():
            found = self._loss_differs(state, batched, row, words, inputs, targets, losses, offset)
            if found is not None:
                break
        if found is None:
            found = self._beyond_rounding(state, inputs, batched.leaves, batched.scales, alone, batched.bounds, offset)
            if found is not None and found[0] in reshaped:
                found = (found[0], f"{reshaped[found[0]]}, over the part it has alone {found[1]}")
        if found is None:
            return False
        self._dependent(*found, state, inputs, targets)
        return True

    def _loss_differs(
        self, state, batched: _Outputs, row: int, words: str, inputs, targets, losses, offset: int
    ) -> tuple[int, str] | None:
        """(row, words for the warning) when the loss of `row`, whose output's shape changes with its batch (`words`:
        _reshaped_rows), differs in its hooked pass (batched.losses) and alone (losses[row - offset], else one no-grad
        forward of the row with loss_fn) beyond first_rows_check's tolerances of the coarsest dtype of the state and
        losses times the larger of the two |losses| and 1e-3 of the batch's largest finite |loss|, and still does in
        float64 (_float64_loss_gap) or float64 cannot tell; or the losses cannot be had. None when they agree (the same
        value, non-finite included): an output trimmed to the batch's longest sequence under a loss that masks the
        padding.

        Why the example's own loss: per-example losses spread far more than outputs (a well-fit row's
        cross-entropy 1e-6, a mislabeled row's 50 in the same batch), so a gap relative to the batch's largest loss
        hid a well-fit row's loss doubling. Why a floor and float64: a loss is often a small difference of large
        terms (logsumexp(z) - z_y with logits ~40 rounds by ~40 x 2^-24 ~ 2e-6, a well-fit row's whole loss), so
        relative to itself alone it differs by float32 rounding batched vs alone; the floor (1e-3 of the batch's
        largest loss) keeps a near-zero loss from making every rounding a disagreement, and a gap past it is measured
        again in float64, where rounding is ~2e-9 times smaller. A model reading the pads of a row whose loss is
        under the floor is still found by its outputs over the part it has alone (_row_gaps)."""
        mine = None if batched.losses is None else batched.losses[row]
        one = None if losses is None or len(losses) <= row - offset else losses[row - offset]
        if mine is not None and one is None:
            with torch.no_grad():
                outputs = call_model(model_caller(self.model, state), slice_rows(inputs, row, row + 1))
                alone = _loss_or_none(self.loss_fn, outputs, slice_rows(targets, row, row + 1))
            one = None if alone is None else alone[0]
        if mine is None or one is None:
            return row, f"{words} (the loss of the example in its batch and alone could not be compared)"
        mine, one = mine.detach().double(), one.detach().double().to(mine.device)
        if mine == one or (mine.isnan() and one.isnan()):
            return None
        rtol, atol = tolerances(coarsest([torch.empty(0, dtype=self.dtype), batched.losses]))
        gap = _loss_gap(mine, one, _largest_finite(batched.losses))
        if gap <= rtol + atol:
            return None
        said = f"{words}, its loss by {gap:.1e} of its |loss| (tolerance {rtol + atol:.1e})"
        if coarsest([*state.values(), batched.losses]) == torch.float64:
            return row, f"{said}, computed in float64"
        why = float64_room(state)
        if why is None:
            try:
                gap64 = self._float64_loss_gap(state, inputs, targets, row, batched.bounds)
            except _NoLook as e:
                why = str(e)
            except Exception as e:  # the model's or loss's error in float64
                if device_failure(e):
                    raise
                message = str(e).splitlines()[0] if str(e) else ""
                why = f"the model or loss failed in float64: {type(e).__name__}: {message}"
            else:
                if gap64 <= rtol + atol:
                    self.rounding_only += 1
                    return None
                return row, f"{said}, and by {gap64:.1e} in float64, where rounding is ~2e-9 times smaller"
        return row, f"{said}; the float64 check telling rounding from dependence could not run ({why})"

    def _float64_loss_gap(self, state, inputs: Tree, targets: Tree, row: int, bounds: list[tuple[int, int]]) -> float:
        """_loss_gap of `row`'s loss in its pass (`bounds`) and alone, both run in float64 without gradients (state,
        inputs and targets as float64 copies); _NoLook when the losses are not float64 (n,) and (1,)."""
        wide = self._float64_state(state)
        start, stop = next((a, b) for a, b in bounds if a <= row < b)
        got = []
        for a, b in ((start, stop), (row, row + 1)):
            x, y = as_float64(slice_rows(inputs, a, b)), as_float64(slice_rows(targets, a, b))
            with torch.no_grad():
                losses = self.loss_fn(call_model(model_caller(self.model, wide), x), y)
            if not isinstance(losses, torch.Tensor) or losses.shape != (b - a,) or losses.dtype != torch.float64:
                raise _NoLook("the loss in float64 was not a float64 tensor of one value per example")
            got.append(losses.detach())
        return _loss_gap(got[0][row - start], got[1][0], _largest_finite(got[0]))

    def _beyond_rounding(
        self,
        state,
        inputs: Tree,
        leaves: list[torch.Tensor],
        scales: list[torch.Tensor],
        alone: list[torch.Tensor],
        bounds: list[tuple[int, int]],
        offset: int,
    ) -> tuple[int, str] | None:
        """(row, the words for the warning) of the first row whose outputs differ in the batch and alone (leaves,
        scales: the batch's largest finite |output|, alone: as _row_gaps takes them; row = offset + their index)
        beyond the tolerance, and still differ when run again in float64 (the pass of `bounds`, (start, stop) rows
        of `inputs`, holding it, and the row alone: _float64_look), or could not be run so; None when none differs,
        or every row that does agrees in float64 (`rounding_only` counts the batch).

        Why float64: the tolerance is (rtol + atol) of the state's dtype (1.1e-4 in float32) times the batch's
        largest |output|, but an output that is a small difference of large sums (a bias cancelling w.h ~ 8 into
        outputs ~1e-2) carries float32 rounding of eps32 times those sums: batched vs alone (other kernels, other
        summation orders; TF32 or another convolution algorithm for one row on a GPU) it can exceed that. The same
        operations in float64 round eps64 / eps32 ~ 2e-9 times as much, while an output that depends on the rest
        of its batch (padding to its longest sequence, a packed GRU, a batch mean) differs by as much as in
        float32, where it was beyond the tolerance. So a row is taken as dependent only when its float64 outputs
        still differ beyond the float64 tolerances (tolerances(float64): the same 1.1e-4, RTOL and ATOL being above
        both eps) times its float64 batch's largest |output|: the change that counts as dependence is the same
        size, measured where rounding cannot reach it (as the first-rows check's float64 look at Kronecker
        segments, token_projection.KroneckerRows._beyond_rounding). Rows are looked at in order until one is
        confirmed: at most one float64 forward of the pass and one of a row alone per differing row, no more
        forwards than the one-example recompute the look may spare. Where no float64 look is possible the batch
        is recomputed, as before it: one example at a time its rows are right either way."""
        gaps, tolerance = _row_gaps(leaves, scales, alone, coarsest(state.values()))
        differing = [] if gaps is None else (gaps > tolerance).nonzero()[:, 0].tolist()
        if not differing:
            return None
        first = offset + differing[0]
        said = f"by {gaps[differing[0]].item():.1e} of the batch's largest |output| (tolerance {tolerance:.1e})"
        if coarsest([*state.values(), *leaves]) == torch.float64:
            # the model computes in float64 already: a float64 look would repeat the same forwards
            return first, f"{said}, computed in float64"
        # (the look copies the whole floating state, kept up to _KEPT_FLOAT64_BYTES, even where
        # `layers` names a few parameters whose one-example recompute it spares; not weighed here)
        why = float64_room(state)
        if why is None:
            try:
                look = self._float64_look(state, inputs, [offset + i for i in differing], bounds)
            except _NoLook as e:
                why = str(e)
            except Exception as e:  # the model's error in float64 (KeyboardInterrupt and other BaseExceptions pass)
                if device_failure(e):
                    raise
                message = str(e).splitlines()[0] if str(e) else ""
                why = f"the model failed in float64: {type(e).__name__}: {message}"
            else:
                if look is None:
                    self.rounding_only += 1
                    return None
                row, gap64, tolerance64 = look
                gap32 = gaps[row - offset].item()
                said = (
                    f"by {gap32:.1e} of the batch's largest |output| (tolerance {tolerance:.1e}), and by {gap64:.1e} "
                    f"in float64 (tolerance {tolerance64:.1e}), where rounding is ~2e-9 times smaller"
                )
                return row, said
        return first, f"{said}; the float64 check telling rounding from dependence could not run ({why})"

    def _float64_look(
        self, state, inputs: Tree, rows: list[int], bounds: list[tuple[int, int]]
    ) -> tuple[int, float, float] | None:
        """The first of `rows` (ascending) whose output, in its pass (`bounds`) and alone, both run in float64
        without gradients (the state and inputs as float64 copies: first_rows_check.as_float64, _float64_state),
        differ beyond the float64 tolerances times the pass's largest |output| of that tensor: (row, its gap
        relative to that, the tolerance); None when every row agrees. _NoLook when the float64 outputs cannot be
        compared (not float64, not one output per forward, not the float32 run's count)."""
        wide = self._float64_state(state)
        held: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None  # the pass run: start, leaves, scales
        for row in rows:
            start, stop = next((a, b) for a, b in bounds if a <= row < b)
            if held is None or held[0] != start:
                held = None  # the previous pass's outputs go before the next forward
                leaves = _float64_outputs(self.model, wide, slice_rows(inputs, start, stop), stop - start)
                held = (start, leaves, [_largest_finite(t) for t in leaves])
            one = _float64_outputs(self.model, wide, slice_rows(inputs, row, row + 1), 1)
            if len(one) != len(held[1]):
                raise _NoLook(f"the model returned {len(held[1])} floating outputs on its batch, {len(one)} alone")
            i = row - start
            got = [t[i : i + 1] for t in held[1]]
            gaps, tolerance = _row_gaps(got, held[2], [t.unsqueeze(0) for t in one], torch.float64)
            if gaps is None:
                raise _NoLook("no float64 output of the batch and alone had the same shape")
            if gaps[0] > tolerance:
                return row, gaps[0].item(), tolerance
        return None

    def _float64_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with every floating tensor as a float64 copy: those kept from an earlier look at the same
        checkpoint reused (the same tensor, its version counter unchanged: not written in place since); the copies
        kept for the next look, all of them when at most _KEPT_FLOAT64_BYTES, else its buffers' only (see there).
        A write the version counter does not see (through `.data`, or a NumPy view of the tensor) between two looks
        leaves the kept copy stale: only the judgement of rounding vs dependence reads it, never the
        rows, which come from the live tensors."""
        wide: dict[str, torch.Tensor] = {}
        made: dict[int, torch.Tensor] = {}  # one copy of a tensor under two names (tied weights stay tied)
        with torch.no_grad():
            for n, t in state.items():
                kept = self._float64.get(n)
                if not t.is_floating_point():
                    wide[n] = t
                elif id(t) in made:
                    wide[n] = made[id(t)]
                elif kept is not None and kept[0]() is t and kept[1] == _version(t):
                    wide[n] = made[id(t)] = kept[2]
                else:
                    wide[n] = made[id(t)] = as_float64(t)
        small = sum(t.numel() * 8 for t in made.values()) <= _KEPT_FLOAT64_BYTES
        self._float64 = {  # not a float64 tensor of the state itself (as_float64 returns it): nothing to keep
            n: (weakref.ref(t), _version(t), wide[n])
            for n, t in state.items()
            if t.is_floating_point()
            and wide[n] is not t
            and _version(t) is not None
            and (small or n not in self._parameters)
        }
        return wide

    def _dependent(self, row: int, said: str, state, inputs, targets) -> None:
        """Counts a batch whose output for `row` depends on the rest of the batch (`said`: by how much, and whether
        float64 confirmed it: _beyond_rounding); the first time in the export, a warning. A forward drawing random
        numbers (dropout with training=True) gives the hooks up instead, as the first-rows check does: its rows
        differ from run to run whatever computes them."""
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
        unjudged = "float64 check" in said
        warnings.warn(
            f"the model's output for row {row} of batch {self.batches} (counted from 1 over the export's calls "
            f"to this gradient function) differs in its batch and alone {said}: "
            + (
                "taken as depending on the rest of its batch (padding to the batch's longest sequence? or float32 "
                "rounding of outputs that are small differences of large sums)"
                if unjudged
                else "it depends on the rest of its batch (padding to the batch's longest sequence?)"
            )
            + ". A per-example gradient is that of the example "
            "alone: such a batch is computed one example at a time for every parameter (torch.func.vmap or a "
            "loop), the batch after it by the hooks again; this warning is not repeated for later batches",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _unsummed(self, layers: dict[str, tuple[float, float]]) -> None:
        """Counts a batch whose hooked rows of `layers` ({layer: (gap, tolerance)}) do not sum to the gradient of its
        summed loss (hook_gradients._unsummed); the first time in the export, a warning naming the layers."""
        self.unsummed_batches += 1
        if self.unsummed_batches > 1:
            return
        named = _listed([f"{m!r} (by {g:.1e} of its size, tolerance {t:.1e})" for m, (g, t) in layers.items()])
        warnings.warn(
            f"the per-example gradients of layer {named} by the batched hooks do not sum to the gradient of batch "
            f"{self.batches}'s summed loss (counted from 1 over the export's calls to this gradient function): its "
            "parameters are also used outside the layer's forward for some examples (a functional call such as "
            "F.linear(x, layer.weight), a forward hook), which the hooks do not see. Such a batch is computed one "
            "example at a time for every parameter (torch.func.vmap or a loop); this warning is not repeated for "
            "later batches",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
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
            dtype32 = reference.dtype == torch.float32 and not widened  # (autocast's dtype is not)
            if random_forward(self.model, state, self.loss_fn, head_inputs, head_targets):
                _warn_leaving(
                    "they disagree with per-example autograd on the first batch, and the forward draws "
                    "random numbers (three passes on the same rows gave different losses: dropout with "
                    "training=True, sampling?): every method then gives other rows on every run"
                )
                return False
            if (
                not self.hooks.expanded
                and (found := self._checked_outputs_differ(state, inputs, seen, out.shape[0], rows)) is not None
            ):
                # (a layer whose batch-1 calls the hooks expanded makes the hooked outputs differ by itself)
                self._found = found
                return None
            unjudged = self._disagree_in_float64(state, head_inputs, head_targets, hooked) if dtype32 else ""
            if unjudged is not None:
                _warn_leaving(
                    "they disagree with per-example autograd on the first batch"
                    + (", also in float64" if dtype32 and not unjudged else "")
                    + ": a layer or loss_fn mixes the examples of a batch, or a parameter is also used outside its "
                    "module's forward (by the model, or by loss_fn)"
                    + (", or a layer ran on one example at a time" if self.hooks.expanded else "")
                    + self._one_at_a_time_layers(out.shape[0])
                    + autocast_note()
                    + (f" ({unjudged})" if unjudged else "")
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
                stacklevel=user_stacklevel(),
            )
        return True

    def _disagree_in_float64(self, state, inputs: Tree, targets: Tree, hooked: list[str]) -> str | None:
        """For a float32 first-rows check that failed: None when the hooked rows of `hooked` on these rows (`inputs`,
        `targets`: the checked rows, as one pass) agree with per-example autograd when both are run again in float64
        (the state, inputs and targets as float64 copies: _float64_state), within the float64 tolerances
        (first_rows_check.agrees); "" when they still disagree; else why float64 could not judge. Why: a well-fit
        regression's per-example gradients carry its residual (output - target, ~1e-4 of outputs ~1), which batched vs
        alone differs by float32 rounding of the outputs, beyond rtol of the residual; float64 shrinks that rounding
        ~2e-9-fold, while a layer or loss_fn mixing the examples or a parameter used outside its module's forward
        disagrees as much as in float32 (as _beyond_rounding for outputs). Once an export at most (the first batch)."""
        why = float64_room(state)
        if why is not None:
            return why
        hooks = self.hooks
        kept = hooks.expanded, hooks.outputs, hooks.losses, hooks.unsummed, hooks.bytes_per_row
        try:
            wide, x, y = self._float64_state(state), as_float64(inputs), as_float64(targets)
            rows = batch_rows(y, "targets")
            out = torch.zeros((rows, self.width), dtype=torch.float64, device=state[hooked[0]].device)
            _, unusable = hooks(wide, x, y, out, self.columns)
            reference = list(example_gradients(self.model, wide, hooked, self.loss_fn, x, y, rows))
        except Exception as e:  # the model's or loss's error in float64; KeyboardInterrupt passes
            # out of memory: float64_room counts the state's copy only, not the pass's float64 gradients and
            # activations; the float32 verdict stands (the hooks given up, as without the look)
            if device_failure(e) and not isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            message = str(e).splitlines()[0] if str(e) else ""
            return f"the float64 check could not run: {type(e).__name__}: {message}"
        finally:
            hooks.expanded, hooks.outputs, hooks.losses, hooks.unsummed, hooks.bytes_per_row = kept
        if unusable:
            why = _listed([f"{m} ({unusable[m]})" for m in sorted(unusable)])
            return f"the float64 check could not run: the hooks cannot take layers {why} on the checked rows"
        columns = [self.columns[n] for n in hooked]
        pairs = [(out[:, o : o + w], _stacked(reference, k)) for k, (o, w) in enumerate(columns)]
        return None if agrees(pairs, torch.float64) else ""

    def _checked_outputs_differ(
        self, state, inputs: Tree, seen: list[list[torch.Tensor]], batch: int, rows: int
    ) -> tuple[int, str] | None:
        """(row, words) of the first of the first-rows check's `rows` rows whose output alone (`seen`: the check's
        forwards, one per row when run in the model's dtype) differs from its output in the hooked pass of `batch`
        rows (`inputs`), as _depends_on_the_batch compares them (float64 included: _beyond_rounding); None when they
        agree or cannot be compared."""
        batched = _Outputs(keep_all=True)
        batched.add(self.hooks.outputs, batch)
        if not batched.usable or len(seen) != rows or any(len(s) != len(batched.leaves) for s in seen):
            return None
        reshaped = _reshaped(batched, [[t.shape for t in s] for s in seen], 0)
        if reshaped is not None:
            return reshaped
        try:
            alone = [torch.stack(leaf) for leaf in zip(*seen, strict=True)]
        except RuntimeError:  # shapes differing from row to row
            return None
        head = [t[:rows] for t in batched.leaves]
        return self._beyond_rounding(state, inputs, head, batched.scales, alone, [(0, batch)], 0)

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
                grads, (losses, outputs) = self._vmapped(chosen, rest, inputs, targets)
            except (RuntimeError, NotImplementedError) as e:
                out_of_memory = isinstance(e, torch.cuda.OutOfMemoryError)
                if device_failure(e) and not out_of_memory:
                    raise
                why = str(e).splitlines()[0]
                if "saved tensor hooks" in why:  # torch.utils.checkpoint(use_reentrant=False), CPU offloading
                    why += " (the forward saves tensors through hooks: activation checkpointing or offloading)"
                cannot = "ran out of device memory on a batch" if out_of_memory else "cannot run this model"
                modules = _listed(list(dict.fromkeys(n.rpartition(".")[0] or "the model itself" for n in names)))
                warnings.warn(
                    f"torch.func.vmap {cannot} ({type(e).__name__}: {why}); falling back to a slower "
                    f"per-example loop for {modules} (any warning saying they are computed with vmap is "
                    "superseded)"
                    + (" (about 1 / batch of vmap's memory)" if out_of_memory else "")
                    + f"; layers= leaving them out skips the loop{_vmap_way_out(self.model, why)}",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
                self.vectorised = False
            except Exception as e:  # the model's or loss's error on the one-row batches vmap runs
                one = (slice_rows(inputs, 0, 1), slice_rows(targets, 0, 1))
                explained = self._one_row_error(state, *one)
                if explained is None:
                    raise
                raise explained from e
            else:
                for n in names:
                    offset, width = self.columns[n]
                    out[:, offset : offset + width].copy_(grads[n].reshape(out.shape[0], width))
                self.losses = self._alone_losses = losses.detach()
                return list(outputs) if outputs else None
        return self._one_at_a_time(names, state, inputs, targets, out)

    def _one_at_a_time(
        self, names: list[str], state, inputs: Tree, targets: Tree, out: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """Columns of `names`, one example at a time with torch.autograd.grad; returns the examples' outputs as
        _by_autodiff does (None when the model ran more or less than once an example or their shapes differ)."""
        rows = out.shape[0]
        self._alone_outputs = None
        losses: list = []
        with model_outputs(self.model, 1) as seen:  # each example's compared (small) outputs only
            loss_fn = recording(self.loss_fn, losses)
            grads = example_gradients(self.model, state, names, loss_fn, inputs, targets, rows)
            for i, parts in enumerate(grads):
                for n, g in zip(names, parts, strict=True):
                    offset, width = self.columns[n]
                    out[i, offset : offset + width].copy_(g.reshape(-1))
        self.losses = recorded_losses(losses, rows)
        if len(seen) != rows or len({len(s) for s in seen}) != 1:
            return None
        try:
            return [torch.stack(leaf) for leaf in zip(*seen, strict=True)]
        except RuntimeError:  # shapes differing from example to example: kept for _depends_on_the_batch
            self._alone_outputs = [list(s) for s in seen]
            return None

    def _one_row_error(self, state, inputs: Tree, targets: Tree) -> Exception | None:
        """first_rows_check.one_row_error for an error of vmap, whose passes are of one row each (unsqueeze(0)):
        None (the caller raises vmap's error as it is) when the model and loss run on this example alone, outside
        vmap."""
        try:
            with torch.enable_grad():
                losses_of(self.model, state, self.loss_fn, inputs, targets)
        except Exception as alone:
            return one_row_error(alone, self.model, state, self.loss_fn, inputs, targets)
        return None


def _row_gaps(
    leaves: list[torch.Tensor],
    scales: list[torch.Tensor],
    alone: list[torch.Tensor | list[torch.Tensor]],
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, float]:
    """(gaps, tolerance): per row i, the largest |batched - alone| over the output tensors (leaves: (n, ...) each,
    `scales` its batch's largest finite |value|; alone: the same examples' (n, 1, ...), or a list of n (1, ...) where
    their shapes differ) relative to that tensor's scale (0 where both hold the same value or non-finite value, inf
    where only one is finite or the scale is 0), float64 (n,), None when nothing was compared; a row differs where
    its gap is over the tolerance, rtol + atol of first_rows_check.tolerances of the coarsest of `dtype` and the
    outputs' dtypes. A row whose output alone has another shape than in the batch (its shape changes with the batch:
    _reshaped_rows) is compared over the part it has alone, the leading slice batched[i][:T, ...] of the shape alone
    or the trailing one batched[i][-T:, ...] (left padding), whichever is closer, where no dimension alone is larger
    (a model reading the pads of its trimmed batch differs in both; the trailing slice is for left padding);
    tensors of other shapes or devices are not compared."""
    rtol, atol = tolerances(coarsest([torch.empty(0, dtype=dtype), *leaves]))
    worst = None
    for got, want, scale in zip(leaves, alone, scales, strict=True):
        n = got.shape[0]
        if not got.numel():
            continue
        if isinstance(want, torch.Tensor) and want.shape == (n, 1, *got.shape[1:]):
            if got.device != want.device:
                continue
            g, w = got.double(), want.reshape(got.shape).double()
            gaps = _gaps(g, w, scale).reshape(n, -1).amax(1)
        else:
            ones = list(want)
            if len(ones) != n:
                continue
            gaps = torch.zeros(n, dtype=torch.float64, device=got.device)
            compared = False
            for i, one in enumerate(ones):
                rest = one.shape[1:]
                if (
                    one.dim() != got.dim()
                    or one.shape[0] != 1
                    or one.device != got.device
                    or any(a > b for a, b in zip(rest, got.shape[1:], strict=True))
                    or not one.numel()
                ):
                    continue
                # right padding keeps the example's part leading, left padding trailing: the closer of the two
                # (a model reading the pads differs in both; one not reading them agrees in one)
                lead = got[i][tuple(slice(0, a) for a in rest)]
                trail = got[i][tuple(slice(b - a, b) for a, b in zip(rest, got.shape[1:], strict=True))]
                w = one[0].double()
                gaps[i] = torch.minimum(_gaps(lead.double(), w, scale).amax(), _gaps(trail.double(), w, scale).amax())
                compared = True
            if not compared:
                continue
        worst = gaps if worst is None else torch.maximum(worst, gaps)
    return worst, rtol + atol


def _loss_gap(mine: torch.Tensor, one: torch.Tensor, largest: torch.Tensor) -> float:
    """|mine - one| of an example's loss in its batch and alone relative to the larger of |mine|, |one| and 1e-3 of
    the batch's `largest` finite |loss| (_loss_differs says why); inf where one is not finite or that scale is 0."""
    if mine == one or (mine.isnan() and one.isnan()):
        return 0.0
    scale = torch.stack([mine.abs(), one.abs(), 1e-3 * largest]).nan_to_num(nan=0, posinf=0).max()
    return ((mine - one).abs() / scale).nan_to_num(nan=math.inf).item() if scale > 0 else math.inf


def _gaps(g: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|g - w| / scale elementwise (float64), 0 where both hold the same value or non-finite value, inf where only
    one is finite or the scale is 0."""
    same = (g == w) | (g.isnan() & w.isnan())
    return ((g - w).abs() / scale).nan_to_num(nan=math.inf).masked_fill(same, 0)


def _reshaped(batched: _Outputs, shapes: list[list[torch.Size]], offset: int) -> tuple[int, str] | None:
    """The first of _reshaped_rows, None when there is none."""
    return next(_reshaped_rows(batched, shapes, offset), None)


def _reshaped_rows(batched: _Outputs, shapes: list[list[torch.Size]], offset: int) -> Iterator[tuple[int, str]]:
    """(row, the words for the warning) of each example (row = offset + its index in `shapes`: per example,
    the shape of each output tensor alone) whose output alone is (1, *rest) where the batch's is (rows, *other) in
    its pass of `rows` rows (batch-first: _Outputs' shapes), `other` != `rest` of as many dimensions, both holding
    elements: an output of the example alone whose shape changes with its batch (per-token outputs over the batch's
    longest sequence) may depend on the batch, whatever its values (_loss_differs decides). An output that is not
    batch-first is not taken: a sequence-first (T, B, ...) one is (T, 1, ...) alone, its first dimension not 1
    (where T == B by chance too), and a 0-d one or one whose first dimension is not the pass's rows has no
    batch-first shape (None in _Outputs' shapes)."""
    if batched.shapes is None:
        return
    for i, example in enumerate(shapes):
        row = offset + i
        start, stop = next((a, b) for a, b in batched.bounds if a <= row < b)
        for k, (other, one) in enumerate(zip(batched.shapes, example, strict=True)):
            if other is None or len(one) != len(other) + 1 or one[0] != 1 or tuple(one[1:]) == tuple(other):
                continue
            if math.prod(other) and math.prod(one):
                yield (
                    row,
                    (
                        f"in shape: output tensor {k} is {(stop - start, *other)} in its pass of {stop - start} rows "
                        f"and {tuple(one)} alone"
                    ),
                )
                break


def _float64_outputs(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: Tree, rows: int) -> list:
    """The floating outputs of one no-grad forward of `model` with `state` (float64) on `inputs` (`rows` rows,
    widened to float64 here), a tensor that is not (rows, ...) or too large to compare (_per_row) as an empty
    (rows, 0) one; _NoLook when the model ran more or less than once or returned a compared output of another
    dtype (a forward casting to float32)."""
    with torch.no_grad(), model_outputs(model, rows) as seen:
        call_model(model_caller(model, state), as_float64(inputs))
    if len(seen) != 1:
        raise _NoLook(f"the model ran {len(seen)} times on one batch")
    leaves = [t if _per_row(t, rows) else t.new_zeros(rows, 0) for t in seen[0]]
    other = sorted({str(t.dtype).removeprefix("torch.") for t in leaves if t.numel() and t.dtype != torch.float64})
    if other:
        raise _NoLook(f"with its state and inputs in float64 the model returned {', '.join(other)} outputs")
    return leaves


class _NoLook(Exception):
    """The float64 look cannot judge a disagreement (_beyond_rounding): why."""


def _version(t: torch.Tensor) -> int | None:
    """The version counter of `t` (bumped by every in-place write), None for an inference tensor (none)."""
    return None if t.is_inference() else t._version


class _Outputs:
    """The model's outputs in a batch's hooked passes (hook_gradients.output_leaves of each pass): per output
    tensor, the largest finite |value| over the batch (`scales`) and the rows kept (`leaves`: every row when
    keep_all, else the last row only). Not `usable` when a pass's outputs are unknown or do not match. A tensor
    that is not batch-first (no per-example rows) or is too large (_per_row) stands as an empty (rows, 0) one: it
    compares nothing."""

    def __init__(self, keep_all: bool):
        self.keep_all, self.usable, self.rows = keep_all, True, 0
        self.bounds: list[tuple[int, int]] = []  # each pass's (start, stop) rows
        self.scales: list[torch.Tensor] = []
        self._parts: list[list[torch.Tensor]] = []
        self._shapes: list | None = None
        self._losses: list[torch.Tensor] | None = []  # each pass's per-example losses; None once one is unknown

    def add(self, leaves: list[torch.Tensor] | None, rows: int, losses: torch.Tensor | None = None) -> None:
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
        self.bounds.append((self.rows, self.rows + rows))
        self._losses = None if self._losses is None or losses is None else [*self._losses, losses]
        self.rows += rows
        self._parts = [*self._parts, leaves] if self.keep_all else [[t[-1:].clone() for t in leaves]]

    @property
    def shapes(self) -> list[torch.Size | None] | None:
        """Per output tensor, its shape past the rows in every pass (None: not batch-first or too large to
        compare); None before a pass."""
        return self._shapes

    @property
    def losses(self) -> torch.Tensor | None:
        """The batch's per-example losses in its hooked passes, (rows,); None when a pass's are unknown."""
        return torch.cat(self._losses) if self._losses else None

    @property
    def leaves(self) -> list[torch.Tensor]:
        """Per output tensor, the rows kept (the batch's last ones), in order."""
        if len(self._parts) > 1:
            self._parts = [[torch.cat(p) for p in zip(*self._parts, strict=True)]]
        return self._parts[0] if self._parts else []


def _per_row(t: torch.Tensor, rows: int) -> bool:
    """Whether `t` holds (rows, ...) per-example outputs small enough to be compared (COMPARED_ELEMENTS)."""
    return t.dim() > 0 and t.shape[0] == rows and t.numel() <= rows * COMPARED_ELEMENTS


def _largest_finite(t: torch.Tensor) -> torch.Tensor:
    """The largest finite |value| of `t` (0 when none), as a 0-d float64 tensor on its device."""
    if not t.numel():
        return torch.zeros((), dtype=torch.float64, device=t.device)
    a = t.detach().abs()
    return torch.where(a.isfinite(), a, 0).max().double()


def _stacked(grads: list[list[torch.Tensor]], k: int) -> torch.Tensor:
    """(rows, numel) of parameter k's gradients, one row per example."""
    return torch.stack([g[k].reshape(-1) for g in grads])


def _vmap_way_out(model: nn.Module, why: str) -> str:
    """The rest of the vmap fallback's advice: a Hugging Face model whose 'sdpa' attention reads a given
    attention_mask's values (masking_utils: padding_mask.all(), data-dependent control flow vmap cannot run)
    runs under vmap with eager attention, the same gradients up to rounding (the loop: ~10x the export time
    of a tiny LLaMA with padded batches)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or "data-dependent" not in why:
        return ""
    return (
        ", or let vmap run the model: its 'sdpa' attention reads the attention_mask's values, which vmap cannot; "
        "model.set_attn_implementation('eager') before the export (older transformers: load the model with "
        "attn_implementation='eager') avoids that (the same gradients up to rounding)"
    )


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _loss_or_none(loss_fn: LossFn, outputs: object, targets: Tree) -> torch.Tensor | None:
    """loss_fn(outputs, targets) of one example, detached as a (1,) tensor; None when it raises or returns another
    shape (compared where it can be: a loss failing on one row fails in the export's own paths too)."""
    try:
        losses = loss_fn(outputs, targets)
    except Exception:
        return None
    return losses.detach().reshape(1) if isinstance(losses, torch.Tensor) and losses.numel() == 1 else None


def _warn_leaving(reason: str) -> None:
    warnings.warn(
        f"per-example gradients by batched hooks given up ({reason}); using torch.func.vmap",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
