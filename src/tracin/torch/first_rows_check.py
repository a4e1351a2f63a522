"""The first-batch check shared by the batched gradient paths (hooks, per-token Kronecker projections):
their rows on the first rows of the first batch against per-example autograd, one example at a time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .data import Tree, slice_rows
from .losses import LossFn, losses_of

CHECKED_ROWS = 2  # rows of the first batch recomputed one by one (>= 2 sees a layer mixing the examples)
RTOL, ATOL = 1e-4, 1e-5  # |got - want| <= RTOL |want| + ATOL * (largest |want| of the compared columns)


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
    tie_weights: bool = True,
) -> Iterator[list[torch.Tensor]]:
    """For example i = 0 .. rows - 1 in turn, the gradients of its loss w.r.t. `names` (in that order,
    zeros for an unused parameter), by torch.autograd.grad on that example alone. tie_weights=False:
    a tied tensor's names are apart (each in `state`), the gradient of one name its uses under it."""
    leaves = {n: state[n].detach().requires_grad_(True) for n in names}
    for i in range(rows):
        x, y = slice_rows(inputs, i, i + 1), slice_rows(targets, i, i + 1)
        with torch.enable_grad():
            loss = losses_of(model, {**state, **leaves}, loss_fn, x, y, tie_weights).sum()
            parts = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        yield [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, parts, strict=True)]


def agrees(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """True when every `got` is within RTOL |want| + ATOL * scale of its `want` (pairs of same-shape
    tensors, scale the largest |want| of all pairs), compared pair by pair: no gathered copy."""
    scale = torch.stack([want.abs().max().double() for _, want in pairs]).max().item()
    excess = torch.stack([((got.to(want.dtype) - want).abs() - RTOL * want.abs()).max() for got, want in pairs])
    return bool(excess.double().max().item() <= ATOL * max(scale, 1e-30))  # False for NaN
