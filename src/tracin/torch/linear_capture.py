"""One batched forward/backward that captures, for chosen nn.Linear modules, each example's layer
input x_i and output gradient dL_i/dy_i.

For y = W x + b and per-example losses that do not mix examples (eval mode), example i's gradient
w.r.t. W is the outer product dL_i/dy_i (x) x_i and w.r.t. b is dL_i/dy_i: both come from one
ordinary backward of sum_i L_i, without per-example autograd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .data import Tree, batch_rows
from .losses import LossFn, check_losses, losses_of


class NotRankOne(ValueError):
    """A captured layer ran more or less than once, or on inputs that are not (batch, in)."""


def capture_linear(model: nn.Module, names: Sequence[str], state: Mapping[str, torch.Tensor], loss_fn: LossFn,
                   inputs: Tree, targets: Tree) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (x (batch, in), dL/dy (batch, out))} for the nn.Linear modules `names`."""
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}

    def hook_for(name):
        def capture(module, args, output):
            # y must be in the graph for dL/dy; where nothing upstream needs gradients, start it here
            y = output if output.requires_grad else output.detach().requires_grad_(True)
            seen[name].append((args[0].detach(), y))
            return y
        return capture

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.enable_grad():
            losses = losses_of(model, state, loss_fn, inputs, targets)
    finally:
        for h in handles:
            h.remove()
    rows = batch_rows(targets, "targets")
    check_losses(losses, rows)
    for name, calls in seen.items():
        if len(calls) != 1:
            raise NotRankOne(f"layer {name!r} ran {len(calls)} times in one forward pass; its gradient is "
                             "then not one outer product")
        x = calls[0][0]
        if x.dim() != 2 or x.shape[0] != rows:
            raise NotRankOne(f"layer {name!r} got input of shape {tuple(x.shape)}; the outer-product form "
                             f"needs (batch, in_features) = ({rows}, {modules[name].in_features})")
    ys = [seen[n][0][1] for n in names]
    out_grads = torch.autograd.grad(losses.sum(), ys, allow_unused=True)
    return {n: (seen[n][0][0], torch.zeros_like(y) if g is None else g)
            for n, y, g in zip(names, ys, out_grads, strict=True)}
