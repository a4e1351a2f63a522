"""One batched forward and backward pass recording, for chosen modules, every call's input and the
gradient of the summed per-example losses w.r.t. that call's output.

When no layer mixes the examples of a batch, row i of an output gradient is dL_i/dy_i, so the
per-example gradient of a parameter used only inside these modules' forward follows from the
(input, output gradient) pairs alone (layer_rules), without per-example autograd. Shared by the
full-gradient hook path (per_example), the factored modes (last_layer) and per-token projections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import Tree, batch_rows
from .losses import LossFn, check_losses, losses_of


class NotCaptured(ValueError):
    """A module ran in a way the capture cannot use (output not one tensor, no tensor input)."""


@dataclass
class Call:
    """One forward call of a captured module: its first input (detached) and the gradient of
    sum_i L_i w.r.t. its output (same shape as the output; zeros where the loss does not use it)."""

    input: torch.Tensor
    grad: torch.Tensor


def capture(
    model: nn.Module,
    names: Sequence[str],
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
) -> dict[str, list[Call]]:
    """{module name: its calls, in order} for the modules `names`, from one forward pass of the model
    with `state`'s tensors and one backward pass of the summed (batch,) losses. A call whose input and
    output have batch size 1 in a batch of more rows (shared by all, broadcast later) is recorded
    expanded to the batch, its output replaced by the expanded tensor."""
    modules = dict(model.named_modules())
    rows = batch_rows(targets, "targets")
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}

    def hook_for(name):
        def record(module, args, kwargs, output):
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(first, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise NotCaptured(f"layer {name!r} must take a tensor and return one tensor to be captured")
            x = first.detach()
            if rows > 1 and x.dim() and output.dim() and x.shape[0] == 1 and output.shape[0] == 1:
                # shared by the batch and broadcast later (position embeddings): one copy per example
                # keeps each example's output gradient apart
                x, output = x.expand(rows, *x.shape[1:]), output.expand(rows, *output.shape[1:])
            # dL/dy needs y in the graph; where nothing upstream needs gradients, start the graph here
            y = output if output.requires_grad else output.detach().requires_grad_(True)
            seen[name].append((x, y))
            return y

        return record

    handles = [modules[n].register_forward_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        with torch.enable_grad():
            losses = losses_of(model, state, loss_fn, inputs, targets)
    finally:
        for h in handles:
            h.remove()
    check_losses(losses, rows)
    outputs = [y for calls in seen.values() for _, y in calls]
    needed = outputs and losses.requires_grad
    grads = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if needed else [None] * len(outputs))
    result: dict[str, list[Call]] = {}
    for name, calls in seen.items():
        result[name] = []
        for x, y in calls:
            g = next(grads)
            result[name].append(Call(x, torch.zeros_like(y) if g is None else g))
    return result
