"""Per-example gradients of the chosen parameters that layer_rules covers, from one batched forward
and backward pass (capture), written straight into their columns of the (batch, d) output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .capture import capture
from .data import Tree, batch_rows
from .layer_rules import covers, per_example_grad, token_form
from .losses import LossFn


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """{id(parameter): [(module name, attribute), ...]}: every module holding it directly (tied
    parameters have several)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, leaf))
    return owners


class HookGradients:
    """The chosen parameters every holder of which is a covered layer (`plan`: parameter name ->
    its holders), their gradients from the captured calls of those layers (summed over calls and
    holders: a layer run twice, or a weight tied between an Embedding and a Linear)."""

    def __init__(self, model: nn.Module, names: Sequence[str], loss_fn: LossFn):
        self.model, self.loss_fn = model, loss_fn
        modules = dict(model.named_modules())
        owners = parameter_owners(model)
        params = dict(model.named_parameters())
        self.plan = {n: owners[id(params[n])] for n in names
                     if all(covers(modules[m]) for m, _ in owners[id(params[n])])}
        self._modules = modules

    @property
    def layers(self) -> list[str]:
        """Names of the modules whose calls are captured, in first-use order."""
        return list(dict.fromkeys(m for holders in self.plan.values() for m, _ in holders))

    def drop(self, layers: Sequence[str]) -> list[str]:
        """Removes the parameters held by any of `layers` from the plan; returns their names."""
        gone = [n for n, holders in self.plan.items() if any(m in layers for m, _ in holders)]
        for n in gone:
            del self.plan[n]
        return gone

    def __call__(self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree, out: torch.Tensor,
                 columns: Mapping[str, tuple[int, int]]) -> list[str]:
        """Writes each planned parameter's (batch, width) gradients into out[:, offset:offset + width]
        (columns: name -> (offset, width)); returns the captured layers that did not run (their
        parameters' columns are zero)."""
        calls = capture(self.model, self.layers, state, self.loss_fn, inputs, targets)
        rows = batch_rows(targets, "targets")
        tokens = {m: [token_form(self._modules[m], c, rows) for c in cs] for m, cs in calls.items()}
        for name, holders in self.plan.items():
            offset, width = columns[name]
            dest = out[:, offset:offset + width]
            written = False
            for m, leaf in holders:
                for a, b in tokens[m]:
                    part = per_example_grad(self._modules[m], leaf, a, b).reshape(rows, width)
                    if written:
                        dest.add_(part)
                    else:
                        dest.copy_(part)
                    written = True
            if not written:
                dest.zero_()
        return [m for m, cs in calls.items() if not cs]
