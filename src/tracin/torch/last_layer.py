"""Factored per-example gradients of nn.Linear layers y = W x + b.

Example i's gradient w.r.t. [W | b] is the outer product dL_i/dy_i (x) [x_i, 1]: the left factor
(batch, out) and the right factor (batch, in + 1) (no trailing 1 when the layer has no bias).
Exact for each layer; one ordinary backward pass per batch gives all rows (capture).
mode="last_layer" factors one layer, mode="factored" every chosen layer (TracIn then sums the
per-layer products (L_t . L_i)(R_t . R_i), far fewer operations than the materialised gradients).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .capture import NotCaptured, capture
from .data import Tree, batch_rows
from .first_rows_check import agrees, checked_rows, example_gradients
from .layer_rules import token_form
from .layers import tied_first_names
from .losses import LossFn


class LinearFactors:
    """Per nn.Linear module of `names` (in order), (left (batch, out), right (batch, in [+1]))."""

    def __init__(self, model: nn.Module, names: list[str], loss_fn: LossFn, mode: str):
        self.model, self.names, self.loss_fn, self.mode = model, names, loss_fn, mode
        modules = dict(model.named_modules())
        self.layers = [modules[n] for n in names]
        self.checked = False

    @property
    def dims(self) -> list[tuple[int, int]]:
        return [(m.out_features, m.in_features + int(m.bias is not None)) for m in self.layers]

    def __call__(
        self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        try:
            captured = self._captured(state, inputs, targets)
        except NotCaptured as e:
            raise ValueError(f"mode={self.mode!r}: {e}. Use mode='full' with layers={self._full_layers()!r}.") from None
        factors = [
            (left, torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if layer.bias is not None else x)
            for (x, left), layer in zip(captured, self.layers, strict=True)
        ]
        if not self.checked:
            self._check(state, inputs, targets, factors)
            self.checked = True
        return factors

    def _check(self, state, inputs: Tree, targets: Tree, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The factors of the first rows against per-example autograd of each layer's parameters as its
        forward uses them (a tied weight apart from its other names); ValueError naming the layers that
        disagree (a weight also used outside its forward, a hook changing the output, examples mixed)."""
        head_inputs, head_targets, rows = checked_rows(inputs, targets, batch_rows(targets, "targets"))
        first = tied_first_names(self.model)
        names = [
            [n for n, _ in layer.named_parameters(prefix=name, remove_duplicate=False)]
            for name, layer in zip(self.names, self.layers, strict=True)
        ]
        apart = {n: state[first[n]] for group in names for n in group if n in first}
        flat = [n for group in names for n in group]
        wants = list(
            example_gradients(
                self.model, {**state, **apart}, flat, self.loss_fn, head_inputs, head_targets, rows, False
            )
        )
        bad = []
        for k, (name, group, (left, right)) in enumerate(zip(self.names, names, factors, strict=True)):
            offset = sum(len(g) for g in names[:k])
            want_weight = torch.stack([w[offset] for w in wants])
            weight_cols = want_weight.shape[2]
            pairs = [(left[:rows, :, None] * right[:rows, None, :weight_cols], want_weight)]
            if len(group) > 1:
                pairs.append((left[:rows], torch.stack([w[offset + 1] for w in wants])))
            if not agrees(pairs):
                bad.append(name)
        if bad:
            raise ValueError(
                f"mode={self.mode!r}: the factors of {bad} disagree with per-example autograd on the first rows: "
                "a weight also used outside its layer's forward, a forward hook changing a layer's output, or "
                f"a layer mixing the examples of a batch. Use mode='full' with layers={self._full_layers()!r}."
            )

    def _full_layers(self) -> list[str]:
        """The layers= of mode="full" for the same parameters: a module name, or the parameter names
        when its weight is tied (mode="full" takes a tied weight under its first name)."""
        first = tied_first_names(self.model)
        chosen = []
        for name, layer in zip(self.names, self.layers, strict=True):
            params = [n for n, _ in layer.named_parameters(prefix=name, remove_duplicate=False)]
            chosen += [first.get(n, n) for n in params] if any(n in first for n in params) else [name]
        return chosen

    def _captured(self, state, inputs, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(x (batch, in), dL/dy (batch, out)) per layer; NotCaptured unless each ran once on (batch, in)."""
        calls = capture(self.model, self.names, state, self.loss_fn, inputs, targets)
        rows = batch_rows(targets, "targets")
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
        return pairs
