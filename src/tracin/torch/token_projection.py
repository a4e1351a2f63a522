"""Per-example gradients projected per token by Kronecker products (tracin.Projection(..., kronecker=True)).

A layer applied over T tokens has the per-example weight gradient G_i = sum_t b_it a_it^T (b: output
gradient, a: input with a 1 appended for the bias). Its segment of the projected row is

    P_rows G_i P_cols^T = sum_t (P_rows b_it) (P_cols a_it)^T        (k_rows x k_cols, row-major)

computed in one batched forward and backward pass (capture.stream, layer_rules) without forming G_i:
O(T (rows k_rows + cols k_cols + k_rows k_cols)) per example. Tokens whose output gradient is zero
(padding the loss masks) add nothing. Kronecker segments: the weight (and its bias, when chosen too) of every
nn.Linear and Hugging Face Conv1D, and the weight of every nn.Embedding (the one-hot input side is a gather of
P_rows' columns; the padding_idx row gets no gradient); a weight tied between such modules, all nn.Linear or
nn.Embedding (GPT-2's wte and lm_head: vocab x hidden both), is one segment whose per-token products of every use
add up, as its gradient does (an embedding called on ids without a batch dimension, whose first dimension is not
the batch's, as wpe(arange(T)) or T5's relative_attention_bias on a (q_len, k_len) grid, keeps its segment,
projected from its full per-example gradients, one warning; ids of shape (B,), one per example, are projected per
token). Every other chosen parameter (LayerNorm, a weight tied to a Conv1D or another layer type: one warning,
other layer types, and the out_proj of an nn.MultiheadAttention, whose weight the attention reads without running
out_proj's forward: one warning) is one plain segment: its per-example gradient is computed in full
(PerExampleGradients, a second pass) and projected flat. The layout depends on the model's structure and the chosen
parameters only (train and test exports agree), and is recorded in the metadata. The result equals Projection.apply
on the full rows with the same layout where the hooks see every use of a Kronecker layer's weight and each
example's rows stay its own: the first rows are checked against per-example autograd (check: a layer mixing the
examples, or its weight used outside its forward there, is refused; one run on one example at a time is projected
from full gradients), and every batch's per-token rows of a layer, summed, against the projection of autograd's
gradient of its summed loss (_sum_checked: a weight also used outside its forward for later examples; that batch's
rows of the layer are then projected from full gradients). A use within the sum check's tolerances (in 16 bits eps
x the positions summed: gross misses only), or a model reordering the rows of a later batch, which leaves the sum
alone, is not seen.

preconditioner="adam": a Kronecker segment uses the rank-one factorisation of v_hat + eps^2 (rank_one.py): the
columns of P_rows scaled by sqrt(s / r) and those of P_cols by 1 / sqrt(c), once per checkpoint (eps^2 bounds a
row or column of v near 0 as eps bounds full Adam's; an entry weighted far over 1 / eps is warned about);
plain segments are preconditioned exactly, g / (sqrt(v_hat) + eps), before their projection. The first-rows
check and the sum check project by the unscaled factors (the latter by a second per-token product per call):
they do not depend on the scales.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .._export.checkpoints import Checkpoint
from .._export.kronecker_share import check_balanced
from .._export.preconditioner import AdamMoments, Preconditioned
from .._export.projection import keeping_nonfinite
from .._export.rank_one import _scales
from .._export.transforms import Recorded
from ..projection import LayerMatrix, Projection
from .capture import Call, NotCaptured, fails_without_hooks, ids_alone_and_twice, one_at_a_time, stream
from .data import Tree, batch_rows, slice_rows
from .first_rows_check import (
    Reference,
    _dense,
    agrees,
    autocast_note,
    checked_rows,
    coarsest,
    counts_tokens,
    example_gradients,
    float64_room,
    in_float64,
    largest_finite,
    reference_gradients,
    tokens_counted,
)
from .hook_gradients import _unsummed, parameter_owners, recorded_losses, recording
from .layer_rules import _autocast_off, covers, token_form
from .layers import qualified
from .losses import LossFn
from .per_example import PerExampleGradients

_TOKENS_PER_EXAMPLE = 256  # tokens an example is assumed to have when choosing the default batch size
_SPREAD = 4  # standard deviations of the projected own-dtype gap the hook rows' largest gap may reach
# the factorisation is of v_hat + eps^2; the recorded text keeps "v" as earlier versions wrote it (resume and
# scoring compare metadata["preconditioner"]: stores exported before would otherwise be refused)
_FACTORED_ADAM = (
    "Kronecker layers: rank-one r c^T / sum(r) of v + eps^2 (exact for Adafactor, approximate for Adam); "
    "other parameters: g / (sqrt(v_hat) + eps)"
)


@dataclass
class _Segment:
    """One segment of the projected row: a Kronecker layer (module set) or a plain parameter."""

    index: int  # position in the layout
    names: list[str]  # the parameters it covers, in row order
    layer: LayerMatrix | int
    dim: int
    start: int  # first output column
    module: str | None = None
    kind: str | None = None  # "dense" (Linear, Conv1D) or "embedding" for Kronecker segments
    # Kronecker segments: (module, kind) of every module holding the weight; a tied weight has several (GPT-2's
    # wte and lm_head), whose per-token products add up in the one segment
    uses: tuple[tuple[str, str], ...] = ()


class KroneckerRows:
    """(batch, projection.dim) float32 CPU rows: the chosen parameters' per-example gradients
    projected segment by segment (the layout `segments`), Kronecker segments per token.

    checkpoints: the parsed checkpoints (their optimizer states, for `preconditioner`); preconditioner:
    None or "adam".
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        loss_fn: LossFn,
        projection: Projection,
        checkpoints: Sequence[Checkpoint],
        preconditioner: str | None,
    ):
        self.model, self.loss_fn, self.projection = model, loss_fn, projection
        self.checkpoints, self.preconditioner = checkpoints, preconditioner
        self._modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self._shapes = {n: tuple(params[n].shape) for n in names}
        plan = _plan(model, list(names))
        dims = projection.segment_dims(len(plan))
        self.segments: list[_Segment] = []
        start = 0
        for j, ((seg_names, layer, uses), dim) in enumerate(zip(plan, dims, strict=True)):
            module, kind = uses[0] if uses else (None, None)
            self.segments.append(_Segment(j, seg_names, layer, dim, start, module, kind, uses))
            start += dim
        self.kron = [s for s in self.segments if s.module is not None]
        self._segment_of = {m: s.module for s in self.kron for m, _ in s.uses}  # a module: its segment's key
        shares = [(f"layer {s.module!r}", s.dim, s.layer) for s in self.kron]
        check_balanced(projection.dim, shares, len(self.segments))
        self.plain = [s for s in self.segments if s.module is None]
        plain_names = [n for s in self.plain for n in s.names]
        self._plain_rows = PerExampleGradients(model, plain_names, loss_fn) if plain_names else None
        self._plain_adam = (
            Preconditioned(
                "adam", lambda c: self._moments(c, plain_names), {}, plain_names, [self._shapes[n] for n in plain_names]
            )
            if preconditioner and plain_names
            else None
        )
        first = params[self.kron[0].names[0]] if self.kron else params[names[0]]
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.device = first.device
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._unscaled: list[tuple[torch.Tensor, torch.Tensor]] = []  # with "adam": the sum check's factors
        self._checkpoint: int | None = None
        self._warned: set[int] = set()  # checkpoints whose factors have been scaled (and zero v warned about)
        self._unbatched: dict[str, PerExampleGradients] = {}  # embeddings called on ids without a batch dimension
        self._shared_ids: set[str] | None = None  # embeddings on ids shared by the batch (None: not probed)
        self._expanded: set[str] = set()  # layers whose calls the last pass of _projected expanded to the batch
        # layers whose per-token rows of a batch did not sum up (_unsummed), computed from full gradients for it
        self._exact: dict[tuple[str, ...], PerExampleGradients] = {}
        self.batches = 0  # calls so far, for the warning naming a batch
        # the last call's per-example losses ((rows,), detached, on the device; None when unknown), for the export's
        # warning about a NaN or infinite loss (_export.loss_watch)
        self.losses: torch.Tensor | None = None
        self.unsummed_batches = 0  # batches whose per-token rows of a layer did not sum to its summed-loss gradient

    # --- what the export records ---

    @property
    def batch_elements(self) -> int:
        """Elements held per example, for the default batch size: the projected row, the plain
        segments' full gradients, the captured inputs and output gradients of _TOKENS_PER_EXAMPLE tokens."""
        plain = sum(s.layer for s in self.plain)
        captured = sum((s.layer.rows + s.layer.cols) * len(s.uses) for s in self.kron) * _TOKENS_PER_EXAMPLE
        return self.projection.dim + plain + captured

    def recorded(self) -> list[Recorded]:
        """The row transforms the metadata records: the preconditioner (if any) and the projection
        with its layout (what Projection.apply needs to reproduce the rows from full ones)."""
        out = []
        if self.preconditioner:
            out.append(
                Recorded(
                    "preconditioner",
                    {
                        "kind": "adam",
                        "factored": _FACTORED_ADAM,
                        "hyperparameters": "b1, b2, eps and step of each checkpoint's optimizer state",
                    },
                    self.projection.dim,
                )
            )
        spec = {**self.projection.to_dict(), "segments": [_spec(s.layer) for s in self.segments]}
        out.append(Recorded("projection", spec, self.projection.dim))
        return out

    # --- per checkpoint and per batch ---

    def begin(self, checkpoint: int) -> None:
        """The factors of checkpoint `checkpoint` (scaled by its optimizer state with "adam")."""
        if checkpoint == self._checkpoint:
            return
        moments, warn = None, checkpoint not in self._warned  # one zero-v warning per layer per checkpoint
        self._warned.add(checkpoint)
        if self.preconditioner:  # every chosen parameter's: the state's checks (one learning rate) see them all
            by_name = dict(zip(self._shapes, self._moments(checkpoint, list(self._shapes)), strict=True))
            moments = [by_name[n] for s in self.kron for n in s.names]
        self._factors, self._unscaled, k = [], [], 0
        for seg in self.kron:
            p_rows, p_cols = (
                np.asarray(p, np.float64) for p in self.projection.layer_factors(seg.index, seg.layer, seg.dim)
            )
            if moments is not None:
                self._unscaled.append(
                    tuple(torch.as_tensor(p, dtype=self.dtype, device=self.device) for p in (p_rows, p_cols))
                )
                # the padding_idx row's zero v is the embedding's doing unless a tied head uses the row too
                padding = self._modules[seg.module].padding_idx if {k for _, k in seg.uses} == {"embedding"} else None
                left, right = _layer_scales(
                    moments[k : k + len(seg.names)], seg.layer, repr(seg.names[0]), checkpoint, warn, padding
                )
                p_rows, p_cols = p_rows * left, p_cols * right
            k += len(seg.names)
            self._factors.append(
                tuple(torch.as_tensor(p, dtype=self.dtype, device=self.device) for p in (p_rows, p_cols))
            )
        self._checkpoint = checkpoint

    def __call__(self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree) -> torch.Tensor:
        rows = batch_rows(targets, "targets")
        out = torch.empty((rows, self.projection.dim), dtype=torch.float32)
        self.batches += 1
        self.losses = None
        if self.kron:
            blocks = self._projected(state, inputs, targets, rows, summing=True)
            for seg, block in zip(self.kron, blocks, strict=True):
                used = seg.start + block.shape[1]
                out[:, seg.start : used] = block.to("cpu", torch.float32)
                out[:, used : seg.start + seg.dim] = 0  # a small layer's unused columns (kronecker_dims)
        if self._plain_rows is not None:
            self._plain(state, inputs, targets, out)
            if self.losses is None:
                self.losses = self._plain_rows.losses
        return out

    def check(self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree) -> None:
        """ValueError naming the Kronecker layers whose rows on the first rows differ from per-example
        autograd projected by the same factors (a layer mixing the examples of a batch, or a weight
        also used outside its module's forward), and the layers= that leaves them out. Tolerances of the
        state's coarsest dtype against a reference with 16-bit state widened to float32, widened by the
        own-dtype autograd's gap to it, per segment (first_rows_check); a float32 segment beyond them is
        refused only if its float64 rows disagree too (_beyond_rounding). With "adam", by the unscaled
        factors: whether a layer's rows are its examples' does not depend on the preconditioner, whose
        scales would multiply the rounding of a row or column of v near 0 (an attention key's bias) by
        millions, beyond the tolerances, and refuse the layer where the model cannot run in float64."""
        if not self.kron:
            return
        scaled = self._factors
        self._factors = self._unscaled or scaled
        try:
            self._check_rows(state, inputs, targets)
        finally:
            self._factors = scaled

    def _check_rows(self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree) -> None:
        """check, by the factors self._factors."""
        inputs, targets, rows = checked_rows(inputs, targets, batch_rows(targets, "targets"))
        got = self._projected(state, inputs, targets, rows)
        expanded = set(self._expanded)
        names = [n for s in self.kron for n in s.names]
        reference = reference_gradients(self.model, state, names, self.loss_fn, inputs, targets, rows)
        wide = self._reference_projected(reference.rows)
        own = None if reference.own is None else self._reference_projected(reference.own)
        modules = [m for s in self.kron for m, _ in s.uses]
        tokens = tokens_counted(reference, self.model, modules, state, slice_rows(inputs, 0, 1))
        dtype, widened = reference.dtype, reference.own is not None
        bad: dict[int, float] = {}  # disagreeing segment: the size of its float32 numbers, either side's
        for j in range(len(self.kron)):
            # a softmax head's b sums to 0 over classes: P_rows rows of one sign project it to float32 noise
            floor = self._spread(j, [self._segment_matrix(j, w) for w in reference.rows])
            own_gap = self._own_gap(reference, j, own[j], wide[j], floor) if own is not None else 0.0
            if not agrees(list(zip(got[j], wide[j], strict=True)), dtype, tokens, widened, own_gap, floor):
                bad[j] = max(largest_finite([got[j].abs(), *(w.abs() for w in wide[j])]), floor)
        skipped = None  # why the float64 second look was not made
        if bad and dtype == torch.float32 and self.dtype == torch.float32:
            skipped = float64_room(state)
            bad = self._beyond_rounding(bad, state, inputs, targets, rows, names)
        bad = [self.kron[j] for j in bad]
        # run on one example at a time, each call indexed (fc(h[i:i + 1])[0]): the hooks' expansion to the batch
        # sends every example's gradient to row 0 (the sum holds, the rows do not); full gradients are exact
        looped = [s.module for s in bad if s.module in expanded]
        bad = [s for s in bad if s.module not in expanded]
        if bad:
            raise ValueError(
                f"projection with kronecker=True: the per-token gradients of {sorted(s.module for s in bad)} "
                f"disagree with per-example autograd on the first rows beyond {dtype} rounding ("
                + (f"{tokens} tokens; " if counts_tokens(dtype, widened) else "")
                + "first_rows_check.tolerances): a layer mixes the examples of a batch, or its "
                "weight is also used outside the module's forward"
                + autocast_note()
                + (f" ({skipped})" if skipped else "")
                + ". Either export them without kronecker "
                "(Projection(dim, per_layer=True)), or leave them out: "
                + self._leaving_out([n for seg in bad for n in seg.names])
            )
        if looped:
            self._in_full(looped, "their per-token rows disagree with per-example autograd on the first rows", rows)

    def _beyond_rounding(
        self, bad: dict[int, float], state, inputs: Tree, targets: Tree, rows: int, names: list[str]
    ) -> dict[int, float]:
        """The Kronecker segments of `bad` (index: the largest |number| of its float32 rows, hooked or autograd,
        or its _spread) whose rows still disagree when the hooked pass and per-example autograd are run again
        in float64 (in_float64: the state, inputs and targets widened, the same factors): beyond rtol |want| +
        atol max(that float32 size, the float64 rows' largest |want| or _spread) (first_rows_check.agrees).
        Why: a side's float32 rounding error is at most its float32 numbers plus the true ones (about the
        float64 rows), so that size bounds it even where both sides are nothing but noise (a gradient that
        cancelled upstream of the layer, T5's decoder q and k with one key: eps32 times sizes the layer never
        sees). The same operations in float64 round eps64 / eps32 ~ 2e-9 times as much, far below atol (1e-5)
        times that size, while a layer mixing the examples or a weight also used outside its module's forward
        disagrees by as much as in float32, where it was beyond atol times it. All of `bad` when the model
        cannot run in float64 (a cast inside its forward, no room on the device)."""
        widened = in_float64(state, inputs, targets)
        if widened is None:
            return bad
        saved = self.dtype, self._factors
        self.dtype, self._factors = torch.float64, [(p.double(), q.double()) for p, q in saved[1]]
        try:
            got = self._projected(*widened, rows)
            reference = list(example_gradients(self.model, widened[0], names, self.loss_fn, *widened[1:], rows))
            want = self._reference_projected(reference)
            floors = {j: self._spread(j, [self._segment_matrix(j, w) for w in reference]) for j in bad}
        except Exception:  # KeyboardInterrupt passes; the float32 refusal stands
            return bad
        finally:
            self.dtype, self._factors = saved
        return {
            j: scale
            for j, scale in bad.items()
            if not agrees(list(zip(got[j], want[j], strict=True)), torch.float64, floor=max(scale, floors[j]))
        }

    def _leaving_out(self, names: list[str]) -> str:
        """The layers= of the chosen parameters but `names`, as an error suggests it."""
        keep = [n for n in self._shapes if n not in names]
        return f"layers={keep!r}" if keep else "no other layer is chosen"

    def _own_gap(
        self, reference: Reference, j: int, own: list[torch.Tensor], wide: list[torch.Tensor], floor: float
    ) -> float:
        """The gap of own-dtype autograd to the widened reference in Kronecker segment j's projected rows
        (`own` to `wide`), at least _SPREAD standard deviations of the projection of its full gradients'
        gap E had E random signs: sqrt(P_rows^2 E^2 P_cols^2^T) (the projected rows are a few numbers: their
        largest gap is a noisy estimate of the rounding of the model's own dtype); relative to the check's
        scale, the largest |wide| but at least `floor` (first_rows_check.agrees)."""
        spread = self._spread(
            j,
            [
                self._segment_matrix(j, o) - self._segment_matrix(j, w)
                for o, w in zip(reference.own, reference.rows, strict=True)
            ],
        )
        scale = max(largest_finite(w.abs() for w in wide), floor)
        return max(
            largest_finite((o.to(w.dtype) - w).abs() for o, w in zip(own, wide, strict=True)), _SPREAD * spread
        ) / max(scale, 1e-30)

    def _segment_matrix(self, j: int, grads: list[torch.Tensor]) -> torch.Tensor:
        """Kronecker segment j's rows x (cols [+ 1]) gradient from one example's gradients of every segment's
        parameters (in the segments' order), in the factors' dtype."""
        first = sum(len(s.names) for s in self.kron[:j])
        seg = self.kron[j]
        return _layer_matrix(seg, [t.to(self.dtype) for t in grads[first : first + len(seg.names)]])

    def _spread(self, j: int, matrices: list[torch.Tensor]) -> float:
        """The largest entry of _uncancelled over `matrices` M of Kronecker segment j (by its factors): the size its
        projected numbers have before any cancellation."""
        return max((_uncancelled(*self._factors[j], m).max().item() for m in matrices), default=0.0)

    def _reference_projected(self, reference: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Per Kronecker segment, per example its one-example gradient projected by the segment's factors."""
        out: list[list[torch.Tensor]] = [[] for _ in self.kron]
        for grads in reference:
            k = 0
            for j, (seg, (p_rows, p_cols)) in enumerate(zip(self.kron, self._factors, strict=True)):
                g = _layer_matrix(seg, [t.to(self.dtype) for t in grads[k : k + len(seg.names)]])
                with _autocast_off(g.device):
                    out[j].append((p_rows @ g @ p_cols.T).reshape(-1))
                k += len(seg.names)
        return out

    # --- the pieces ---

    def _projected(self, state, inputs: Tree, targets: Tree, rows: int, summing: bool = False) -> list[torch.Tensor]:
        """Per Kronecker segment its (rows, k_rows * k_cols) projected gradients, on the device; each call is
        projected inside the backward pass as soon as its output gradient exists (capture.stream); the
        output gradients themselves stay held by autograd until the pass ends. An embedding called on ids
        without a batch dimension (nanoGPT's wpe(arange(T)), broadcast later: its output gradient is the
        batch's sum; T5's relative_attention_bias on a (q_len, k_len) grid of buckets; flattened ids
        wte(ids.view(-1))) is projected from its full per-example gradients instead (PerExampleGradients,
        vmap): the same factors, the same layout, one warning. Ids whose first dimension is `rows` are one
        row per example (a class, user or timestep embedding (B,), tokens (B, T): per token) unless forwards
        of example 0 alone and twice showed that dimension not growing (_ids_without_batch, decided on the
        first batch: wpe(arange(T)) with T == rows, even where T is the batch's trimmed length, or a grid with
        q_len == rows). With `summing` (an export's batch), each streamed layer's rows are then summed and checked
        against its summed-loss gradient from the same backward pass (_sum_checked)."""
        if self._shared_ids is None:
            embeddings = [m for s in self.kron for m, kind in s.uses if kind == "embedding"]
            self._shared_ids = _ids_without_batch(self.model, embeddings, state, inputs) if embeddings else set()
        shared_ids = self._shared_ids
        by_module = {seg.module: (seg, factors) for seg, factors in zip(self.kron, self._factors, strict=True)}
        kinds = {m: kind for seg in self.kron for m, kind in seg.uses}  # every module holding a segment's weight
        totals = {
            seg.module: torch.zeros((rows, p_rows.shape[0], p_cols.shape[0]), dtype=self.dtype, device=self.device)
            for seg, (p_rows, p_cols) in zip(self.kron, self._factors, strict=True)
        }
        # by segment (its first module; a tied weight's other modules add to it): the module and why
        unusable: dict[str, tuple[str, str]] = {}
        unbatched: dict[str, tuple[int, ...]] = {}  # embedding: the shape of its first ids without a batch dimension
        tokens: dict[str, int] = {}  # positions (examples x tokens, over the calls) the layer's rows sum
        grad_dtypes: dict[str, set[torch.dtype]] = {}  # the dtypes of its output gradients
        # with "adam" the sum check projects by the unscaled factors too (_sum_checked)
        unscaled = (
            {seg.module: f for seg, f in zip(self.kron, self._unscaled, strict=True)}
            if summing and self._unscaled
            else {}
        )
        unscaled_totals = {
            m: torch.zeros((rows, p_rows.shape[0], p_cols.shape[0]), dtype=self.dtype, device=self.device)
            for m, (p_rows, p_cols) in unscaled.items()
        }

        def consume(module: str, index: int, call: Call) -> None:
            layer, kind = self._segment_of[module], kinds[module]
            if layer in unusable or layer in unbatched:
                return
            seg, (p_rows, p_cols) = by_module[layer]
            ids = call.input
            if kind == "embedding" and (ids.dim() == 0 or ids.shape[0] != rows or module in shared_ids):
                unbatched[layer] = tuple(ids.shape)
                return
            try:
                a, b = token_form(self._modules[module], call, rows)
            except NotCaptured as e:  # raised after the pass, not inside autograd's hook
                unusable[layer] = (module, str(e))
                return
            args = (kind, seg.layer, a, b)
            totals[layer] += _token_product(*args, p_rows, p_cols, self._modules[module], self.dtype)
            if layer in unscaled:
                unscaled_totals[layer] += _token_product(*args, *unscaled[layer], self._modules[module], self.dtype)
            tokens[layer] = tokens.get(layer, 0) + b.shape[0] * b.shape[1]
            grad_dtypes.setdefault(layer, set()).add(b.dtype)

        streamed = [m for m in kinds if self._segment_of[m] not in self._unbatched]
        expanded: set[str] = set()
        expanded_shapes: dict[str, tuple[int, ...]] = {}
        summed = (
            dict.fromkeys(n for m in streamed for n in by_module[self._segment_of[m]][0].names) if summing else None
        )
        losses: list = []
        try:
            stream(
                self.model,
                streamed,
                state,
                recording(self.loss_fn, losses),
                inputs,
                targets,
                consume,
                expanded,
                expanded_shapes,
                summed=summed,
            )
        except Exception as e:  # KeyboardInterrupt and other BaseExceptions pass
            looped = sorted(expanded & set(streamed))
            if not looped or isinstance(e, NotCaptured):
                raise
            if fails_without_hooks(self.model, state, self.loss_fn, inputs, targets):
                raise  # a shared call expanded by the hooks, and an error of the batch's own
            # calls on batch-1 tensors, expanded to the batch by the hooks, after which the pass failed. An
            # embedding called as often with one example as with two, on ids whose first dimension is 1 both
            # times (_ids_without_batch), is not run once per row: its ids have no batch dimension (T5's
            # relative_attention_bias on the (1, k_len) grid of a one-position decoder) and its output is not
            # broadcast over the batch. The others: a layer run on one example at a time (a loop over the rows)
            grids = {
                self._segment_of[m]: expanded_shapes[m]
                for m in looped
                if kinds[m] == "embedding" and m not in shared_ids and m in expanded_shapes
            }
            self._by_full_gradients(grids)
            rest = sorted({self._segment_of[m] for m in looped} - set(grids))
            if rest:
                first = str(e).splitlines()[0] if str(e) else ""
                self._in_full(rest, f"the hooked pass failed ({type(e).__name__}: {first})", rows)
            return self._projected(state, inputs, targets, rows, summing)
        self._expanded = {self._segment_of[m] for m in expanded}
        self.losses = recorded_losses(losses, rows)
        self._by_full_gradients({k: v for k, v in sorted(unbatched.items()) if k not in unusable})
        for layer, full in self._unbatched.items():
            totals.update(self._from_full([layer], full, state, inputs, targets, rows))
        if summed is not None:
            checked = [m for m in by_module if m in tokens and m not in unusable and m not in self._unbatched]
            self._sum_checked(
                checked, totals, unscaled_totals, summed, tokens, grad_dtypes, state, inputs, targets, rows
            )
        if unusable:
            key, (layer, why) = next(iter(unusable.items()))
            seg = by_module[key][0]
            shared = (
                " (a position embedding shared by the batch is projected per example when called on ids of shape "
                "(1, T): wpe(pos[None]), not wpe(pos)[None])"
                if kinds[layer] == "embedding"
                else ""
            )
            raise ValueError(
                f"projection with kronecker=True: layer {layer!r} cannot be projected per token ({why}). Call it "
                f"on batch-first inputs{shared}, export without kronecker (Projection(dim, per_layer=True)), or "
                f"leave it out: {self._leaving_out(seg.names)}"
            )
        return [totals[seg.module].reshape(rows, -1) for seg in self.kron]

    def _in_full(self, layers: list[str], why: str, rows: int) -> None:
        """Layers `layers`, run on batch-1 tensors in a batch of `rows` (a loop over the examples), after which
        `why` (the hooked pass failed, or their rows disagree with per-example autograd: each call indexed, [0]),
        projected from full per-example gradients (PerExampleGradients: vmap, or its per-example loop) from now on,
        with one warning."""
        for layer in layers:
            names = next(s.names for s in self.kron if s.module == layer)
            self._unbatched[layer] = self._without_hooks(names)  # its hooks would meet the same batch-1 calls
        warnings.warn(
            f"projection with kronecker=True: {why}: "
            f"{one_at_a_time(set(layers), rows)}; their full per-example gradients are computed (vmap) and "
            "projected by the same factors, exact but slower: run the layer on the whole batch to project it "
            "per token",
            UserWarning,
            stacklevel=5,
        )

    def _without_hooks(self, names: list[str]) -> PerExampleGradients:
        """Full per-example gradients of parameters `names` by vmap (or its per-example loop) only, never the
        batched hooks: for layers whose hooked rows are known to be wrong."""
        full = PerExampleGradients(self.model, names, self.loss_fn)
        full.hooks, full.others = None, names
        return full

    def _from_full(
        self, layers: list[str], full: PerExampleGradients, state, inputs: Tree, targets: Tree, rows: int
    ) -> dict[str, torch.Tensor]:
        """{layer: (rows, k_rows, k_cols)}: the Kronecker segments of `layers` projected by their factors from
        their full per-example gradients (`full`, of their parameters in the segments' order)."""
        segments = [
            next((s, f) for s, f in zip(self.kron, self._factors, strict=True) if s.module == m) for m in layers
        ]
        names = [n for seg, _ in segments for n in seg.names]
        parts = iter(torch.split(full(state, inputs, targets).to(self.dtype), [state[n].numel() for n in names], dim=1))
        out = {}
        for seg, (p_rows, p_cols) in segments:
            g = _layer_matrices(seg, [next(parts).reshape(rows, *state[n].shape) for n in seg.names])
            with _autocast_off(g.device):
                out[seg.module] = p_rows @ g @ p_cols.T
        return out

    def _sum_checked(
        self,
        layers: list[str],
        totals: dict[str, torch.Tensor],
        unscaled_totals: Mapping[str, torch.Tensor],
        summed: Mapping[str, torch.Tensor | None],
        tokens: Mapping[str, int],
        grad_dtypes: Mapping[str, set[torch.dtype]],
        state,
        inputs: Tree,
        targets: Tree,
        rows: int,
    ) -> None:
        """Each of `layers`' per-token rows (totals[layer], (rows, k_rows, k_cols)) summed over the batch against
        P_rows [G | g] P_cols^T of autograd's gradient of the batch's summed loss (`summed`: from the same backward
        pass, every use of the weight included), both by the projection's own factors (with "adam" its unscaled
        ones: the rows in `unscaled_totals`, not the exported ones: whether the hooks saw
        every use does not depend on the preconditioner, whose scales would multiply the rounding of a row or
        column of v near 0, as an attention key's bias, by millions and blame it on a missed use), within
        hook_gradients._unsummed's tolerances of the coarsest dtype of the layer's parameters, their summed
        gradients and its output gradients, over tokens[layer] positions (in float32 1.1e-4 of the rows' norm; in 16
        bits eps x the positions: gross misses only). A weight also used outside its module's forward (F.linear(x,
        layer.weight), a functional tied head, a forward hook) for examples past the first rows checked is missed by
        the hooks: such a layer's rows of this batch are replaced by its full per-example gradients
        (PerExampleGradients) projected by the same (scaled) factors, with a warning naming the layers the first time
        in the export (`unsummed_batches` counts such batches); the next batch takes the hooks again. Costs
        autograd's weight gradients in the backward pass and one projection of a weight-sized matrix per layer (with
        "adam", the per-token products twice: scaled for the rows, unscaled for the check). A gap over the tolerance
        is judged again against the size the projected sum has before P's cancellation (the Frobenius norm of
        _uncancelled of the summed gradient: review28 F1's floor): a softmax head's output gradient sums to 0 over
        the classes, P_rows rows of one sign map it to float32 noise on both sides, not a missed use."""
        factors = {seg.module: (seg, f) for seg, f in zip(self.kron, self._unscaled or self._factors, strict=True)}
        missed: dict[str, tuple[float, float]] = {}
        for layer in layers:
            seg, (p_rows, p_cols) = factors[layer]
            hooked = unscaled_totals.get(layer, totals[layer])
            grads = [_dense(summed[n], state[n]) for n in seg.names]
            matrix = _layer_matrix(seg, [g.to(self.dtype) for g in grads])
            with _autocast_off(matrix.device):
                want = p_rows @ matrix @ p_cols.T
            dtype = coarsest(
                [*(state[n] for n in seg.names), *grads, *(torch.empty(0, dtype=d) for d in grad_dtypes[layer])]
            )
            found = _unsummed(hooked.sum(0), want, hooked.reshape(rows, -1), tokens[layer], dtype)
            if found is not None:  # judged again against the size before P's cancellation: float32 noise both sides
                gap = torch.linalg.vector_norm(hooked.sum(0).double() - want.double()).item()
                spread = torch.linalg.vector_norm(_uncancelled(p_rows, p_cols, matrix).double()).item()
                if gap > found[1] * spread:
                    missed[layer] = (gap / max(gap / found[0], spread), found[1])
        if not missed:
            return
        self.unsummed_batches += 1
        if self.unsummed_batches == 1:
            named = ", ".join(f"{m!r} (by {g:.1e} of its size, tolerance {t:.1e})" for m, (g, t) in missed.items())
            warnings.warn(
                f"projection with kronecker=True: the per-token rows of layer {named} do not sum to the projection "
                f"of the gradient of batch {self.batches}'s summed loss (counted from 1 over the export's batches, "
                "checkpoint after checkpoint): its weight is also used outside the layer's forward for some examples "
                "(a functional call such as F.linear(x, layer.weight), a forward hook), which the hooks do not see. "
                "Such a batch's rows of the layer are computed from its full per-example gradients (vmap) and "
                "projected by the same factors, exact but slower; this warning is not repeated for later batches",
                UserWarning,
                stacklevel=5,
            )
        key = tuple(missed)
        if key not in self._exact:
            names = [n for m in key for n in factors[m][0].names]
            self._exact[key] = self._without_hooks(names)  # its hooks would miss the same use
        totals.update(self._from_full(list(key), self._exact[key], state, inputs, targets, rows))

    def _by_full_gradients(self, layers: dict[str, tuple[int, ...]]) -> None:
        """Embeddings `layers` (with the shape of their ids), called on ids without a batch dimension, projected
        from full per-example gradients from now on (one warning, with the ids' shapes and the gradients' size)."""
        if not layers:
            return
        for layer in layers:
            names = next(s.names for s in self.kron if s.module == layer)
            self._unbatched[layer] = PerExampleGradients(self.model, names, self.loss_fn)
        shapes = " and ".join(str(shape) for shape in layers.values())
        sizes = " and ".join(f"batch x {' x '.join(map(str, self._modules[m].weight.shape))}" for m in layers)
        warnings.warn(
            f"projection with kronecker=True: {list(layers)} are called on ids without a batch dimension (of shape "
            f"{shapes}), not one row per example: shared by the batch, as wpe(arange(T)) or T5's "
            "relative_attention_bias on a (q_len, k_len) grid of buckets, or flattened, as wte(ids.view(-1)); their "
            f"full per-example gradients are computed (vmap, holding {sizes} numbers) and projected by the same "
            "factors, exact but slower and larger: called on ids of shape (B, T), or (1, T) whose output the model "
            "broadcasts over the batch, wpe(pos[None]), they are projected per token",
            UserWarning,
            stacklevel=5,
        )

    def _plain(self, state, inputs: Tree, targets: Tree, out: torch.Tensor) -> None:
        """The plain segments: full per-example gradients, preconditioned on the host, projected flat."""
        full = self._plain_rows(state, inputs, targets).detach().to("cpu", torch.float32).numpy()
        if self._plain_adam is not None:
            full = self._plain_adam.apply(full, self._checkpoint, 0)
        col = 0
        for seg in self.plain:  # an example whose gradient is not finite: NaN, as in the mapped blocks
            part = np.ascontiguousarray(full[:, col : col + seg.layer])
            projected = keeping_nonfinite(
                lambda rows, seg=seg: (self.projection.project_segment(rows, seg.index, seg.layer, seg.dim),), part
            )[0]
            out[:, seg.start : seg.start + seg.dim] = torch.from_numpy(projected)
            col += seg.layer

    def _moments(self, checkpoint: int, names: list[str]) -> list[AdamMoments]:
        return self.checkpoints[checkpoint].optimizer.moments([(n, self._shapes[n]) for n in names])


def _ids_without_batch(
    model: nn.Module, names: Sequence[str], state: Mapping[str, torch.Tensor], inputs: Tree
) -> set[str]:
    """The embeddings `names` called on ids whose first dimension is not one row per example: those whose
    first dimension does not grow from a forward pass (capture.ids_alone_and_twice) of example 0 alone to one of
    example 0 twice (wpe(arange(T)): (T,) both times; T5's relative_attention_bias: (q_len, k_len) both
    times), where ids of shape (B,), (B, T) or flattened (B * T,) grow; and those called on a 0-d id. The
    same example twice, not two examples: a model trimming the batch's padding gives both passes the same
    T, whatever the other rows' lengths (T or q_len may equal the rows of a batch by chance). Ids of shape
    (1, T, ...) both times are the batch's too (capture.stream expands them: wpe(pos[None])). A module whose
    calls differ in number between the two is taken as shared (its full per-example gradients are exact
    either way)."""
    alone, twice = ids_alone_and_twice(model, names, state, inputs)

    def shared(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] == 0 or b[0] == 0 or (a[1] == b[1] and not (a[0] > 1 and a[1] == 1))

    return {
        n
        for n in names
        if len(alone[n]) != len(twice[n]) or any(shared(a, b) for a, b in zip(alone[n], twice[n], strict=True))
    }


def _kind(module: nn.Module) -> str | None:
    """ "dense" (y = x W^T + c or HF Conv1D y = x W + c), "embedding", or None (not per-token projectable)."""
    if not covers(module):
        return None
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return "dense"
    return "embedding" if isinstance(module, nn.Embedding) else None


def _plan(model: nn.Module, names: list[str]) -> list[tuple[list[str], LayerMatrix | int, tuple[tuple[str, str], ...]]]:
    """The segments in row order: (parameter names, LayerMatrix or plain width, (module, kind) of each module
    holding a Kronecker segment's weight; () for a plain segment). A weight tied between modules (an
    nn.Embedding and an nn.Linear head: rows and columns alike) is one Kronecker segment of all its uses."""
    modules, params, owners = dict(model.named_modules()), dict(model.named_parameters()), parameter_owners(model)
    read_by_parent = _read_by_parent(modules)
    plan, i, demoted, tied = [], 0, [], []
    while i < len(names):
        name = names[i]
        holders = owners[id(params[name])]
        module_name, _ = holders[0]
        module = modules[module_name]
        uses = tuple((m, _kind(modules[m]) if leaf == "weight" else None) for m, leaf in holders)
        tied_conv = len(holders) > 1 and any(type(modules[m]).__name__ == "Conv1D" for m, _ in holders)
        if any(kind is None for _, kind in uses) or tied_conv:  # Conv1D's weight is transposed: not tied by rows
            uses = ()
        elif any(m in read_by_parent for m, _ in uses):
            demoted += [m for m, _ in uses if m in read_by_parent]
            uses = ()
        if not uses and len(holders) > 1:
            tied.append(f"{name} (held by {[m for m, _ in holders]}, {params[name].numel()} numbers per example)")
        if not uses:
            plan.append(([name], params[name].numel(), ()))
            i += 1
            continue
        kind = uses[0][1]
        bias_param = getattr(module, "bias", None) if kind == "dense" else None
        bias_name = qualified(module_name, "bias")
        bias = (
            isinstance(bias_param, torch.Tensor)
            and i + 1 < len(names)
            and names[i + 1] == bias_name
            and len(owners[id(bias_param)]) == 1
            and len(uses) == 1
        )
        w = params[name]
        if isinstance(module, nn.Linear) or kind == "embedding":
            layer = LayerMatrix(w.shape[0], w.shape[1], bias=bias)
        else:  # Conv1D: weight (in, out)
            layer = LayerMatrix(w.shape[1], w.shape[0], bias=bias, transposed=True)
        plan.append(([name, bias_name] if bias else [name], layer, uses))
        i += 2 if bias else 1
    if demoted:
        warnings.warn(
            f"projection with kronecker=True: {demoted} are read by their nn.MultiheadAttention without running "
            "their own forward; their gradients are computed in full and projected as plain segments",
            UserWarning,
            stacklevel=5,
        )
    if tied:
        warnings.warn(
            f"projection with kronecker=True: {'; '.join(tied)}: tied between modules that are not all "
            "nn.Embedding / nn.Linear (a Conv1D holds its weight transposed); their full per-example gradients are "
            "computed and projected as plain segments",
            UserWarning,
            stacklevel=5,
        )
    return plan


def _read_by_parent(modules: Mapping[str, nn.Module]) -> set[str]:
    """Names of the modules whose weights their parent uses without calling them: the out_proj of an
    nn.MultiheadAttention (its forward passes out_proj.weight to F.multi_head_attention_forward)."""
    return {qualified(name, "out_proj") for name, m in modules.items() if isinstance(m, nn.MultiheadAttention)}


def _token_product(
    kind: str,
    layer: LayerMatrix,
    a: torch.Tensor,
    b: torch.Tensor,
    p_rows: torch.Tensor,
    p_cols: torch.Tensor,
    module: nn.Module,
    dtype: torch.dtype,
) -> torch.Tensor:
    """sum_t (P_rows x_t)(P_cols y_t)^T of one call in token form, (B, k_rows, k_cols): for a dense layer
    x = b (output gradient), y = [a, 1]; for an embedding x = one-hot ids (a gather), y = b. `kind`: the
    module's ("dense" or "embedding"), `layer`: its segment's matrix."""
    b = b.to(dtype)
    with _autocast_off(b.device):  # in `dtype`, not the caller's autocast dtype (an embedding's are float32)
        if kind == "embedding":
            left = p_rows.T[a]  # (B, T, k_rows)
            if module.padding_idx is not None:
                left = left * (a != module.padding_idx).unsqueeze(-1).to(dtype)
            right = b @ p_cols.T
        else:
            left = b @ p_rows.T
            right = a.to(dtype) @ p_cols[:, : layer.cols].T
            if layer.bias:
                right = right + p_cols[:, layer.cols]
        return left.transpose(1, 2) @ right


def _uncancelled(p_rows: torch.Tensor, p_cols: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sqrt(P_rows^2 M^2 P_cols^2^T), (k_rows, k_cols): the standard deviation of each of P_rows M P_cols^T had M
    random signs, its size before any cancellation (non-finite entries of M as 0; M scaled by its largest |entry|
    first: no overflow), outside the caller's autocast."""
    m = m.nan_to_num(0, 0, 0)  # a copy: scaled in place
    size = m.abs().max().item() if m.numel() else 0.0
    if size == 0:
        return torch.zeros((p_rows.shape[0], p_cols.shape[0]), dtype=m.dtype, device=m.device)
    with _autocast_off(m.device):
        return size * (p_rows.square() @ m.div_(size).square_() @ p_cols.square().T).sqrt()


def _layer_matrix(seg: _Segment, grads: list[torch.Tensor]) -> torch.Tensor:
    """The rows x (cols [+ 1]) gradient of a Kronecker segment from its parameters' gradients."""
    w = grads[0].T if seg.layer.transposed else grads[0]
    return torch.cat([w, grads[1][:, None]], dim=1) if seg.layer.bias else w


def _layer_matrices(seg: _Segment, grads: list[torch.Tensor]) -> torch.Tensor:
    """_layer_matrix of each example: (batch, rows, cols [+ 1]) from its parameters' (batch, ...) gradients."""
    w = grads[0].transpose(1, 2) if seg.layer.transposed else grads[0]
    return torch.cat([w, grads[1][:, :, None]], dim=2) if seg.layer.bias else w


def _layer_scales(
    moments: list[AdamMoments],
    layer: LayerMatrix,
    name: str | None = None,
    checkpoint: int | None = None,
    warn: bool = True,
    padding_row: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(row scales (rows,), column scales (cols [+ 1],)) of the rank-one Adam factorisation (with `warn`, its
    warnings about zero v naming the weight `name` and `checkpoint`, an embedding's padding_idx row
    `padding_row` left out of them: _token_product masks it)."""
    weight = moments[0]
    if layer.transposed:  # Conv1D: v stored (in, out); the factorisation wants (out, in)
        v = np.asarray(weight.v).reshape(layer.cols, layer.rows).T.reshape(-1)
        weight = replace(weight, v=v)
    return _scales([weight, *moments[1:]], 0, layer.bias, layer.rows, name, checkpoint, warn, padding_row)


def _spec(layer: LayerMatrix | int) -> Any:
    return layer.to_dict() if isinstance(layer, LayerMatrix) else layer
