"""Factored per-example gradients of nn.Linear layers y = W x + b.

Example i's gradient w.r.t. [W | b] is the outer product dL_i/dy_i (x) [x_i, 1]: the left factor
(batch, out) and the right factor (batch, in + 1) (no trailing 1 when the layer has no bias).
Exact for each layer; one ordinary backward pass per batch gives all rows (capture).
mode="last_layer" factors one layer, mode="factored" every chosen layer (TracIn then sums the
per-layer products (L_t . L_i)(R_t . R_i), far fewer operations than the materialised gradients).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .capture import NotCaptured, capture, fails_without_hooks, one_at_a_time
from .data import Tree, batch_rows, slice_rows, tree_map
from .first_rows_check import (
    DIRECTIONS,
    _autocast_dtype,
    active_autocast,
    as_float64,
    autocast_note,
    checked_rows,
    directions,
    directions_agree,
    float64_room,
    one_row_error,
    tolerances,
)
from .hook_gradients import recorded_losses, recording
from .layer_rules import token_form
from .layers import qualified, tied_first_names
from .losses import LossFn, losses_of, random_forward

SUM_SIGMAS = 4.0  # a mismatch along a Gaussian pair is ~ its Frobenius norm: room for rounding's tail


class LinearFactors:
    """Per nn.Linear module of `names` (in order), (left (batch, out), right (batch, in [+1]))."""

    def __init__(self, model: nn.Module, names: list[str], loss_fn: LossFn, mode: str):
        self.model, self.names, self.loss_fn, self.mode = model, names, loss_fn, mode
        modules = dict(model.named_modules())
        self.layers = [modules[n] for n in names]
        self.tied = tied_first_names(model)  # {second name: first name}
        # every name of each layer (a module shared as self.b = self.a is one layer under two names)
        self.aliases = [
            [n for n, m in model.named_modules(remove_duplicate=False) if m is layer] for layer in self.layers
        ]
        self.checked = False
        self.batches = 0  # calls so far, for the error naming a batch
        # the last pass's per-example losses ((rows,), detached, on the device; None when unknown), for the export's
        # warning about a NaN or infinite loss (_export.loss_watch)
        self.losses: torch.Tensor | None = None
        # per layer, state names of its weight and bias: autograd's gradients of the batch's summed loss (_captured)
        self._summed: dict[str, torch.Tensor | None] = {}
        self._refuse_parametrized()

    def _refuse_parametrized(self) -> None:
        """ValueError for a chosen layer whose weight or bias is parametrized (torch.nn.utils.parametrizations
        weight_norm, spectral_norm, orthogonal, parametrize.register_parametrization): the forward computes it from
        other parameters (parametrizations.weight.original0, ...), whose gradients are not the outer product."""
        for name, layer in zip(self.names, self.layers, strict=True):
            if parametrize.is_parametrized(layer):
                held = [n for n, _ in layer.named_parameters(prefix=name) if ".parametrizations." in f".{n}"]
                computed = ", ".join(layer.parametrizations.keys())
                where = repr(name) if name else f"the model ({type(layer).__name__})"
                raise ValueError(
                    f"mode={self.mode!r}: layer {where} is parametrized (torch.nn.utils.parametrizations weight_norm, "
                    f"spectral_norm or parametrize.register_parametrization): its {computed} is computed from "
                    f"parameters {', '.join(held)}, whose per-example gradients the factors do not give. "
                    f"Use mode='full' with layers={self._full_layers()!r}."
                )

    @property
    def dims(self) -> list[tuple[int, int]]:
        return [(m.out_features, m.in_features + int(m.bias is not None)) for m in self.layers]

    def __call__(
        self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        try:
            factors = self._row_factors(state, inputs, targets)
        except NotCaptured as e:
            raise ValueError(f"mode={self.mode!r}: {e}. Use mode='full' with layers={self._full_layers()!r}.") from None
        self.batches += 1
        summed, losses = self._summed, self.losses  # this pass's (the first-rows check below runs passes of its own)
        if not self.checked:
            self._check(state, inputs, targets, factors)
            self.checked = True
        self._check_sums(factors, summed)
        self.losses = losses
        return factors

    def _check_sums(
        self, factors: list[tuple[torch.Tensor, torch.Tensor]], summed: dict[str, torch.Tensor | None]
    ) -> None:
        """ValueError naming the layers whose factors summed over the batch, left^T right (out, in [+1]), differ
        from autograd's gradient G = [dW | db] of the batch's summed loss (taken in the same backward pass:
        _captured): a weight also used outside its layer's forward for examples past the first batch's checked
        rows, which the factors cannot hold (such a gradient is not one outer product). Compared along the
        DIRECTIONS fixed Gaussian pairs (u, v) of first_rows_check.directions, (left u) . (right v) against
        u^T G v (whose square is ||G||_F^2 on average), each within SUM_SIGMAS times rtol + atol of the weight's
        dtype (first_rows_check.tolerances) times the larger of ||G||_F and the rows' Frobenius norm
        (sqrt(sum_i |left_i|^2 |right_i|^2)), plus one subnormal step of the dtype per element (16-bit
        gradients underflow). Every batch: matrix-vector products, no (out, in) copy."""
        bad = []
        for name, layer, (left, right) in zip(self.names, self.layers, factors, strict=True):
            weight, bias = summed.get(qualified(name, "weight")), summed.get(qualified(name, "bias"))
            if weight is None and bias is None and not summed:
                continue  # the pass did not reach the backward (no losses needing gradients)
            u, v = directions(left.shape[1], right.shape[1], left.device)
            l64, r64 = left.double(), right.double()
            got = ((l64 @ u.double().T) * (r64 @ v.double().T)).sum(0)
            want = torch.zeros_like(got)
            size = 0.0
            for grad, columns in ((weight, v[:, : layer.in_features]), (bias, v[:, -1:])):
                if grad is not None:
                    g = grad.float().reshape(len(u[0]), -1)
                    want += ((u @ g) * columns).sum(1).double()
                    size = math.hypot(size, torch.linalg.vector_norm(g).item())
            rows = torch.linalg.vector_norm(l64, dim=1) * torch.linalg.vector_norm(r64, dim=1)
            scale = max(size, torch.linalg.vector_norm(rows).item())
            gap = torch.max(torch.abs(got - want)).item()
            tolerance = sum(tolerances(left.dtype))
            floor = (
                math.sqrt(left.shape[1] * right.shape[1]) * torch.finfo(left.dtype).tiny * torch.finfo(left.dtype).eps
            )
            if math.isfinite(gap) and math.isfinite(scale) and gap > SUM_SIGMAS * (tolerance * scale + floor):
                bad.append(f"{name!r} (by {gap / scale:.1e} of its size, tolerance {tolerance:.1e})")
        if bad:
            raise ValueError(
                f"mode={self.mode!r}: the factors of {', '.join(bad)} do not sum to the gradient of batch "
                f"{self.batches}'s summed loss: a weight also used outside its layer's forward (a functional call "
                "such as F.linear(x, layer.weight), a forward hook) for some examples past the first rows checked, "
                "whose gradient is then not one outer product. "
                f"Use mode='full' with layers={self._full_layers()!r}."
            )

    def _check(self, state, inputs: Tree, targets: Tree, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The factors of the first rows against per-example autograd along random directions (no dense
        per-example gradient): for each layer and Gaussian pair (u, v), d/dt loss_i(W + t u v^T) at t = 0,
        the weight itself perturbed (its bias as the last column; a tied weight apart from its other
        names), must equal (u . left_i)(right_i . v). ValueError naming the layers that disagree (a
        weight also used outside its forward, a hook changing the output, examples mixed). A forward
        drawing random numbers (dropout with training=True) is checked row by row instead, each row's
        factors and derivatives under one RNG state (examples mixed then go unseen). Half-precision
        layers that disagree are checked again in float32, and layers that still disagree there (or in a
        float32 model) again in float64 (_verdict_widened), outside torch.autocast (whose rounding the
        exported factors carry: refused)."""
        head_inputs, head_targets, rows = checked_rows(inputs, targets, batch_rows(targets, "targets"))
        heads = [(left[:rows], right[:rows]) for left, right in factors]
        bad, random = self._verdict(state, head_inputs, head_targets, rows, heads)
        if bad and any(t.dtype in _HALF for t in state.values()):
            bad, random = self._verdict_widened(state, head_inputs, head_targets, rows, _upcast) or (bad, random)
        skipped = None  # why the float64 look was not made
        narrower = any(t.dtype != torch.float64 for t in state.values() if t.is_floating_point())
        if bad and narrower and not active_autocast():
            skipped = float64_room(state)
            if skipped is None:
                bad, random = self._verdict_widened(state, head_inputs, head_targets, rows, as_float64) or (bad, random)
        if bad:
            raise ValueError(
                f"mode={self.mode!r}: the factors of {bad} disagree with per-example autograd on the first rows: "
                "a weight also used outside its layer's forward (in the model, or in loss_fn), a forward hook "
                "changing a layer's output, or a layer or loss_fn mixing the examples of a batch"
                + (" (the forward draws random numbers, e.g. dropout with training=True)" if random else "")
                + autocast_note()
                + (f" ({skipped})" if skipped else "")
                + f". Use mode='full' with layers={self._full_layers()!r}."
            )

    def _verdict(self, state, inputs: Tree, targets: Tree, rows: int, heads) -> tuple[list[str], bool]:
        """(the layers whose factors `heads` disagree on these rows, whether the forward is random)."""
        apart = {**state, **{n: state[f] for n, f in self.tied.items()}}
        bad = self._disagreeing(state, apart, inputs, targets, rows, heads)
        random = bool(bad) and random_forward(self.model, state, self.loss_fn, inputs, targets)
        if random:
            bad = self._disagreeing(state, apart, inputs, targets, rows, None)
        return bad, random

    def _verdict_widened(
        self, state, inputs: Tree, targets: Tree, rows: int, widen: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[list[str], bool] | None:
        """_verdict on copies of the state and inputs `widen`ed (_upcast: 16-bit to float32; as_float64: every
        floating tensor to float64; a tied tensor's names share one copy), the factors recomputed on these rows.
        Why: float16 and bfloat16 backward passes round per-row weight gradients to subnormals or zero (a depth-8
        MLP: every entry, 1e-2 off float64), and a well-fit float32 regression's left factor, its residual
        (output - target ~1e-4 of outputs ~1), differs batched vs alone by float32 rounding of the outputs beyond
        rtol; so their derivatives are no reference, while a weight used outside its forward, a hook or examples
        mixed disagree when widened too (float64 rounds ~2e-9 times as much as float32). A forward that cannot
        run widened (a hard-coded cast) gives None: the verdict stands."""
        copies = {id(t): widen(t) for t in state.values()}
        up = {n: copies[id(t)] for n, t in state.items()}
        inputs, targets = tree_map(widen, inputs), tree_map(widen, targets)
        try:
            return self._verdict(up, inputs, targets, rows, self._row_factors(up, inputs, targets))
        except (RuntimeError, NotCaptured):
            return None

    def _disagreeing(self, state, apart, inputs: Tree, targets: Tree, rows: int, factors) -> list[str]:
        """The layers whose factors (`factors`' first rows; None: each row's own, under the RNG state of
        its derivatives) disagree with the derivatives of each row's loss along DIRECTIONS pairs."""
        dirs = [
            directions(out, cols, apart[qualified(name, "weight")].device)
            for name, (out, cols) in zip(self.names, self.dims, strict=True)
        ]
        got, want, scale = ([[] for _ in self.layers] for _ in range(3))
        for i in range(rows):
            x, y = slice_rows(inputs, i, i + 1), slice_rows(targets, i, i + 1)
            with _same_rng(dirs[0][0].device) as reseed, _one_row_explained(self.model, state, self.loss_fn, x, y):
                row = [(left[i], right[i]) for left, right in factors] if factors is not None else None
                if row is None:
                    row = [(left[0], right[0]) for left, right in self._row_factors(state, x, y)]
                    reseed()
                derivatives = self._derivatives(apart, x, y, dirs)
            for k, ((left, right), (u, v), d) in enumerate(zip(row, dirs, derivatives, strict=True)):
                left, right, u, v = left.double(), right.double(), u.double(), v.double()
                got[k].append((u @ left) * (v @ right))
                want[k].append(d)
                size = u.norm(dim=1) * v.norm(dim=1) / math.sqrt(u.shape[1] * v.shape[1])
                scale[k].append(size * left.norm() * right.norm())
        return [
            name
            for name, g, w, s in zip(self.names, got, want, scale, strict=True)
            if not directions_agree(
                torch.cat(g), torch.cat(w), torch.cat(s), _judged_dtype(apart[qualified(name, "weight")])
            )
        ]

    def _derivatives(self, apart, inputs: Tree, targets: Tree, dirs) -> list[torch.Tensor]:
        """Per layer, the (DIRECTIONS,) float64 derivatives d/dt_j loss(W + sum_j t_j u_j v_j^T) at t = 0 of
        one example's loss (bias b + sum_j t_j u_j v_j[-1]), by one backward pass, on the directions'
        device (compared there with the factors); `apart` has every name of a tied tensor
        (tie_weights=False: only this layer's uses of its weight are perturbed)."""
        ts, perturbed = [], {}
        for name, layer, aliases, (u, v) in zip(self.names, self.layers, self.aliases, dirs, strict=True):
            t = torch.zeros(DIRECTIONS, device=u.device, requires_grad=True)
            ut = (u * t[:, None]).T  # (out, DIRECTIONS)
            weight = apart[qualified(name, "weight")]
            weight = weight + (ut @ v[:, : layer.in_features]).to(weight.dtype)
            bias = None if layer.bias is None else apart[qualified(name, "bias")]
            bias = None if bias is None else bias + (ut @ v[:, -1]).to(bias.dtype)
            for alias in aliases:  # the module under each of its names: all its calls perturbed
                perturbed[qualified(alias, "weight")] = weight
                if bias is not None:
                    perturbed[qualified(alias, "bias")] = bias
            ts.append(t)
        with torch.enable_grad():
            loss = losses_of(self.model, {**apart, **perturbed}, self.loss_fn, inputs, targets, False).sum()
            grads = torch.autograd.grad(loss, ts, allow_unused=True)
        return [
            torch.zeros(DIRECTIONS, dtype=torch.float64, device=t.device) if g is None else g.double()
            for g, t in zip(grads, ts, strict=True)
        ]

    def _row_factors(self, state, inputs: Tree, targets: Tree) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(left (batch, out), right (batch, in [+ 1])) per layer; NotCaptured as _captured."""
        return [
            (left, torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if layer.bias is not None else x)
            for (x, left), layer in zip(self._captured(state, inputs, targets), self.layers, strict=True)
        ]

    def _full_layers(self) -> list[str]:
        """The layers= of mode="full" for the same parameters: a module name, or the parameter names
        when its weight is tied (mode="full" takes a tied weight under its first name) or the layer is the
        model itself (a bare nn.Linear, named "": layers= takes "weight", "bias")."""
        chosen = []
        for name, layer in zip(self.names, self.layers, strict=True):
            params = [n for n, _ in layer.named_parameters(prefix=name, remove_duplicate=False)]
            whole = name and not any(n in self.tied for n in params)
            chosen += [name] if whole else [self.tied.get(n, n) for n in params]
        return chosen

    def _captured(self, state, inputs, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(x (batch, in), dL/dy (batch, out)) per layer; NotCaptured unless each ran once on (batch, in)."""
        expanded: set[str] = set()
        rows = batch_rows(targets, "targets")
        names = [
            qualified(n, leaf)
            for n, layer in zip(self.names, self.layers, strict=True)
            for leaf in ("weight", "bias")
            if getattr(layer, leaf) is not None
        ]
        self._summed = dict.fromkeys(n for n in names if n in state)
        self.losses, losses = None, []
        try:
            loss_fn = recording(self.loss_fn, losses)
            calls = capture(self.model, self.names, state, loss_fn, inputs, targets, expanded, self._summed)
        except Exception as e:  # KeyboardInterrupt and other BaseExceptions pass
            if not expanded or isinstance(e, NotCaptured):
                raise
            if fails_without_hooks(self.model, state, self.loss_fn, inputs, targets):
                raise  # a shared call expanded by the hooks, and an error of the batch's own
            raise NotCaptured(
                f"the hooked pass failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                + one_at_a_time(expanded, rows)
            ) from e
        pairs = []
        for name, layer in zip(self.names, self.layers, strict=True):
            if len(calls[name]) != 1:
                raise NotCaptured(
                    f"layer {name!r} ran {len(calls[name])} times in one forward pass; its gradient "
                    "is then not one outer product"
                )
            x, dy = token_form(layer, calls[name][0], rows)
            if x.shape[1] != 1:
                raise NotCaptured(
                    f"layer {name!r} got input of shape {tuple(calls[name][0].input.shape)}; the "
                    f"outer-product form needs (batch, in_features) = ({rows}, {layer.in_features})"
                )
            pairs.append((x[:, 0], dy[:, 0]))
        self.losses = recorded_losses(losses, rows)
        return pairs


_HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _one_row_explained(model: nn.Module, state, loss_fn: LossFn, inputs: Tree, targets: Tree) -> Iterator[None]:
    """Raises an error of the model or loss on this one-row batch with first_rows_check.one_row_error's
    note when they run on two rows (an output squeezed to 0-d at one row); others as they are."""
    try:
        yield
    except NotCaptured:
        raise
    except Exception as e:
        explained = one_row_error(e, model, state, loss_fn, inputs, targets)
        if explained is None:
            raise
        raise explained from e


def _judged_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype whose tolerance judges a layer's factors: its weight's, or torch.autocast's on the weight's
    device where that is coarser (autocast runs the layer, and the factors and derivatives carry its rounding:
    as hook_gradients judges the hooked rows)."""
    device = weight.device.type
    autocast = _autocast_dtype(device) if device in ("cpu", "cuda") else None
    if autocast is None or torch.finfo(autocast).eps <= torch.finfo(weight.dtype).eps:
        return weight.dtype
    return autocast


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """A float16 or bfloat16 tensor as float32; any other tensor as it is."""
    return t.float() if t.dtype in _HALF else t


@contextlib.contextmanager
def _same_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """A fixed RNG state of the CPU and `device` inside (the caller's restored after; other GPUs'
    generators are left alone); the callable sets it again."""

    def reseed() -> None:
        torch.default_generator.manual_seed(0)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(0)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        reseed()
        yield reseed
