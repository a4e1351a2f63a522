"""The loss function: checked up front, run on a model with a checkpoint's tensors swapped in, and
its output checked (one loss per example, depending on the parameters)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .data import Tree, call_model

LossFn = Callable[[object, Tree], torch.Tensor]


def check_loss_fn(loss_fn: object) -> None:
    """Refuses non-callables and loss modules with a reduction other than 'none', up front."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction != "none":
        raise ValueError(
            f"loss_fn has reduction={reduction!r}; TracIn needs one loss per example: build it with "
            f"reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
        )


def check_losses(losses: object, rows: int) -> None:
    """Refuses a loss_fn whose output on a batch of `rows` is not a (rows,) tensor of losses."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor of per-example losses, got {type(losses).__name__}")
    if losses.shape != (rows,):
        hint = (
            (
                " It looks mean- or sum-reduced: a reduced loss mixes the examples of a batch, so "
                "per-example gradients cannot be taken from it. Return one loss per example "
                "(reduction='none')."
            )
            if losses.dim() == 0
            else ""
        )
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({rows},) for a batch of "
            f"{rows}; got shape {tuple(losses.shape)}.{hint}"
        )


def model_caller(
    model: nn.Module, state: Mapping[str, torch.Tensor], tie_weights: bool = True
) -> Callable[..., object]:
    """A callable running `model` with the tensors of `state` in place of its own (tie_weights=False:
    each name of a tied tensor takes its own entry of `state`, as torch.func.functional_call)."""
    return lambda *args, **kwargs: functional_call(model, dict(state), args, kwargs, tie_weights=tie_weights)


def losses_of(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    tie_weights: bool = True,
) -> torch.Tensor:
    """loss_fn(model(inputs) with `state`'s tensors, targets)."""
    return loss_fn(call_model(model_caller(model, state, tie_weights), inputs), targets)


def check_loss_on(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: list[str],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    rows: int,
) -> None:
    """Runs loss_fn once on a batch of `rows` and refuses it unless it gives (rows,) losses that
    depend on the chosen parameters `names` (a constant or detached loss has no gradient to trace)."""
    leaves = {n: state[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        losses = losses_of(model, {**state, **leaves}, loss_fn, inputs, targets)
    check_losses(losses, rows)
    if not losses.requires_grad:
        raise ValueError(
            f"loss_fn's losses do not depend on the chosen parameters ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}): they are constant or detached from the model's outputs "
            "(.detach(), .item(), a NumPy round trip, torch.no_grad()), so every gradient would be zero. "
            "Compute the losses from the outputs with torch operations"
        )
