"""Factored per-example gradients of one nn.Linear layer y = W x + b.

Example i's gradient w.r.t. [W | b] is the outer product dL_i/dy_i (x) [x_i, 1]: the left factor
(batch, out) and the right factor (batch, in + 1) (no trailing 1 when the layer has no bias).
Exact for that layer; one ordinary backward pass per batch gives all rows (linear_capture).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .data import Tree
from .linear_capture import NotRankOne, capture_linear
from .per_example import LossFn


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
        try:
            ((x, left),) = capture_linear(self.model, [self.name], state, self.loss_fn, inputs, targets).values()
        except NotRankOne as e:
            raise ValueError(f"mode='last_layer': {e}. Use mode='full' with layers=[{self.name!r}].") from None
        right = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if self.bias else x
        return left, right
