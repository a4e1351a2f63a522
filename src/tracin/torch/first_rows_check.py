"""The first-batch check shared by the batched gradient paths (hooks, per-token Kronecker projections):
their rows on the first rows of the first batch against per-example autograd, one example at a time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .capture import probe_forward
from .data import Tree, slice_rows, tree_map
from .losses import LossFn, losses_of

CHECKED_ROWS = 2  # rows of the first batch recomputed one by one (>= 2 sees a layer mixing the examples)
# |got - want| <= rtol |want| + atol * (largest |want| of the compared columns). float32 and float64:
# RTOL and ATOL. A bfloat16 / float16 model's batched rows round as its dtype does, so the reference is
# taken in float32: the 16-bit state (and floating inputs) widened for the reference pass only (the
# user's model untouched), a few 1e-7 off float64; atol is then 2 eps of the coarsest dtype whatever the
# tokens. bfloat16 Embedding-Linear-LayerNorm-Linear, max gap / largest |want|: 2.4-7.0e-3 clean (width
# 32 and 128, T = 64 and 1024; 2 eps = 1.6e-2), 1.7-3.4e-2 with a layer mixing the examples by 5% of a
# batch mean (float16: 3.7-6.5e-4 clean, 2 eps = 2e-3, 1.7-3.4e-2 mixing). A model that cannot run
# widened (a cast to bfloat16 inside its forward meets a float32 weight) is checked against its own
# dtype, whose one-example sums round too: atol eps / 4 * sqrt(T), T capped at _CAPPED_TOKENS (that
# reference's own error, bfloat16: 4e-3 at T = 64, 1.5e-2 at 1024, 5.8e-2 at 2048)
RTOL, ATOL = 1e-4, 1e-5
_CAPPED_TOKENS = 256


def tolerances(dtype: torch.dtype, tokens: int = 1, widened: bool = True) -> tuple[float, float]:
    """(rtol, atol) of the check for gradients computed in `dtype`, each summed over `tokens` positions,
    against a reference `widened` to float32 (else one in `dtype` itself)."""
    eps = torch.finfo(dtype).eps
    if widened or eps <= torch.finfo(torch.float32).eps:
        return max(RTOL, eps), max(ATOL, 2 * eps)
    return eps, eps / 4 * math.sqrt(min(max(tokens, 1), _CAPPED_TOKENS))


def coarsest(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype of `tensors` with the largest eps (float32 when none is floating)."""
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def tokens_of_one(model: nn.Module, layers: Sequence[str], state: Mapping[str, torch.Tensor], one: Tree) -> int:
    """The most positions (tokens) a gradient of one of `layers` sums over for one example: per layer,
    its calls' output elements over the last (feature) dimension, summed over calls; from a forward
    pass without gradients (capture.probe_forward) of `one`, the inputs of one example (batch size 1)."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(layers, 0)

    def counter(name: str):
        def count(module, args, output):
            if isinstance(output, torch.Tensor):
                counts[name] += output.numel() // output.shape[-1] if output.dim() > 1 and output.shape[-1] else 1

        return count

    handles = [modules[n].register_forward_hook(counter(n)) for n in layers]
    try:
        probe_forward(model, state, one, lambda: counts.update(dict.fromkeys(layers, 0)))
    finally:
        for h in handles:
            h.remove()
    return max(counts.values(), default=1)


DIRECTIONS = 3  # random (u, v) pairs a factored layer is checked along
_DIRECTION_SEED = 0


def directions(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """DIRECTIONS standard Gaussian float32 pairs (u, v) for a (rows, cols) matrix, as U (DIRECTIONS,
    rows) and V (DIRECTIONS, cols): the same on every call and device (a fixed-seed CPU generator)."""
    generator = torch.Generator().manual_seed(_DIRECTION_SEED)
    u = torch.randn(DIRECTIONS, rows, generator=generator)
    return u.to(device), torch.randn(DIRECTIONS, cols, generator=generator).to(device)


def directions_agree(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every directional derivative `got` (factors) is within rtol (|want| + scale) of `want`
    (autograd), rtol of the check for `dtype`, `scale` the size a derivative along Gaussian directions
    typically has (||u|| ||v|| ||left|| ||right|| / sqrt(len(u) len(v))); or both hold the same
    non-finite value. All float64 tensors of one shape."""
    return bool(_excess(got, want, tolerances(dtype)[0], scale).max().item() <= 0)  # False for NaN


def checked_rows(inputs: Tree, targets: Tree, batch: int) -> tuple[Tree, Tree, int]:
    """The first min(CHECKED_ROWS, batch) rows of a batch: (inputs, targets, their count)."""
    rows = min(CHECKED_ROWS, batch)
    return slice_rows(inputs, 0, rows), slice_rows(targets, 0, rows), rows


def example_gradients(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    rows: int,
) -> Iterator[list[torch.Tensor]]:
    """For example i = 0 .. rows - 1 in turn, the dense gradients of its loss w.r.t. `names` (in that
    order, zeros for an unused parameter), by torch.autograd.grad on that example alone."""
    leaves = {n: state[n].detach().requires_grad_(True) for n in names}
    for i in range(rows):
        x, y = slice_rows(inputs, i, i + 1), slice_rows(targets, i, i + 1)
        with torch.enable_grad():
            loss = losses_of(model, {**state, **leaves}, loss_fn, x, y).sum()
            parts = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        # nn.Embedding(sparse=True) gives a sparse gradient
        yield [_dense(g, leaves[n]) for n, g in zip(names, parts, strict=True)]


def reference_gradients(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    rows: int,
) -> tuple[list[list[torch.Tensor]], bool]:
    """The check's reference: example_gradients of the first `rows` examples with the 16-bit floating
    tensors of `state`, `inputs` and `targets` widened to float32 (copies), and True; when the model
    cannot run so (a RuntimeError: a cast inside its forward meets a widened weight, or the device has
    no room for the widened copy), in its own dtypes and False."""
    if any(_narrow(t) for t in state.values()):
        try:
            return _widened_gradients(model, state, names, loss_fn, inputs, targets, rows), True
        except RuntimeError:  # torch.cuda.OutOfMemoryError included; the widened copy is freed by now
            pass
    return list(example_gradients(model, state, names, loss_fn, inputs, targets, rows)), False


def _widened_gradients(model, state, names, loss_fn, inputs, targets, rows) -> list[list[torch.Tensor]]:
    wide = {n: t.float() if _narrow(t) else t for n, t in state.items()}
    x, y = (tree_map(lambda t: t.float() if _narrow(t) else t, tree) for tree in (inputs, targets))
    return list(example_gradients(model, wide, names, loss_fn, x, y, rows))


def _narrow(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() < 4


def _dense(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient as a dense tensor: zeros when unused, densified when sparse."""
    if g is None:
        return torch.zeros_like(like)
    return g.to_dense() if g.is_sparse else g


def agrees(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype | None = None,
    tokens: int = 1,
    widened: bool = True,
) -> bool:
    """True when every `got` is within rtol |want| + atol * scale of its `want` (pairs of same-shape
    tensors, scale the largest finite |want| of all pairs), or holds the same non-finite value; compared
    pair by pair: no gathered copy. Tolerances of `dtype` (the coarsest dtype the gradients were computed
    in; default want's) for gradients summed over `tokens` positions against a reference `widened` or not
    (tolerances)."""
    rtol, atol = tolerances(dtype or pairs[0][1].dtype, tokens, widened)
    scale = torch.stack([want.abs().nan_to_num(0, 0, 0).max().double() for _, want in pairs]).max().item()
    excess = torch.stack([_excess(got.to(want.dtype), want, rtol).max() for got, want in pairs])
    return bool(excess.double().max().item() <= atol * max(scale, 1e-30))  # False for NaN


def _excess(got: torch.Tensor, want: torch.Tensor, rtol: float, scale: Any = 0) -> torch.Tensor:
    """|got - want| - rtol (|want| + scale), 0 where both hold the same non-finite value (an example whose
    loss or gradient is NaN or infinite: its row is exported as it is, and scoring names it), NaN where
    only one side is not finite."""
    same = (got == want) | (got.isnan() & want.isnan())
    return ((got - want).abs() - rtol * (want.abs() + scale)).masked_fill(same, 0)
