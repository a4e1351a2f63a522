"""Factored per-example gradients of one nn.Linear layer y = W x + b.

Example i's gradient w.r.t. [W | b] is the outer product dL_i/dy_i (x) [x_i, 1]: the left factor
(batch, out) and the right factor (batch, in + 1) (no trailing 1 when the layer has no bias).
Exact for that layer, and one ordinary backward pass per batch gives all rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .data import Tree, batch_rows
from .per_example import LossFn, check_losses, losses_of


class LastLayerFactors:
    """(left (batch, out), right (batch, in [+1])) for the Linear module `name` of `model`."""

    def __init__(self, model: nn.Module, name: str, loss_fn: LossFn):
        self.model, self.name, self.loss_fn = model, name, loss_fn
        self.layer = dict(model.named_modules())[name]
        self.bias = self.layer.bias is not None

    @property
    def dims(self) -> tuple[int, int]:
        return self.layer.out_features, self.layer.in_features + int(self.bias)

    def __call__(self, state: Mapping[str, torch.Tensor], inputs: Tree,
                 targets: Tree) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(module, args, output):
            x = args[0].detach()
            y = output.detach().requires_grad_(True)  # cut the graph: only dL/dy is needed
            seen.append((x, y))
            return y

        handle = self.layer.register_forward_hook(capture)
        try:
            with torch.enable_grad():
                losses = losses_of(self.model, state, self.loss_fn, inputs, targets)
        finally:
            handle.remove()
        rows = batch_rows(targets, "targets")
        check_losses(losses, rows)
        if len(seen) != 1:
            raise ValueError(f"mode='last_layer': layer {self.name!r} ran {len(seen)} times in one forward "
                             "pass; its gradient is then not one outer product. Use mode='full'.")
        x, y = seen[0]
        if x.dim() != 2 or x.shape[0] != rows:
            raise ValueError(
                f"mode='last_layer': layer {self.name!r} got input of shape {tuple(x.shape)}; the factored "
                f"form needs (batch, in_features) = ({rows}, {self.layer.in_features}). For layers applied "
                f"per token use mode='full' with layers=[{self.name!r}].")
        (left,) = torch.autograd.grad(losses.sum(), y, allow_unused=True)
        if left is None:
            left = torch.zeros_like(y)
        right = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if self.bias else x
        return left.detach(), right
