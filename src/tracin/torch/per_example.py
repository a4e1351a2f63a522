"""Per-example gradients of chosen parameters: torch.func vmap(grad) with a per-example fallback."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .data import Tree, batch_rows, call_model, tree_map

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
        hint = (" It looks mean- or sum-reduced: a reduced loss mixes the examples of a batch, so "
                "per-example gradients cannot be taken from it. Return one loss per example "
                "(reduction='none').") if losses.dim() == 0 else ""
        raise ValueError(f"loss_fn must return per-example losses of shape ({rows},) for a batch of "
                         f"{rows}; got shape {tuple(losses.shape)}.{hint}")


def model_caller(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Callable[..., object]:
    """A callable running `model` with the tensors of `state` in place of its own."""
    return lambda *args, **kwargs: functional_call(model, dict(state), args, kwargs)


def losses_of(model: nn.Module, state: Mapping[str, torch.Tensor], loss_fn: LossFn,
              inputs: Tree, targets: Tree) -> torch.Tensor:
    return loss_fn(call_model(model_caller(model, state), inputs), targets)


class PerExampleGradients:
    """(batch, d) gradients of the per-example losses w.r.t. the chosen parameters, flattened and
    concatenated in `names` order, in the parameters' dtype on their device.

    The vectorised torch.func path is tried first; if vmap cannot run the model (in-place ops,
    custom autograd functions, data-dependent control flow), a warning is given and examples are
    then processed one at a time with torch.autograd.grad.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss_fn: LossFn):
        self.model, self.names, self.loss_fn = model, list(names), loss_fn
        self.vectorised = True
        self._vmapped = vmap(grad(self._loss_of_one), in_dims=(None, None, 0, 0))

    def _split(self, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        chosen = {n: state[n] for n in self.names}
        rest = {n: t for n, t in state.items() if n not in chosen}
        return chosen, rest

    def _loss_of_one(self, chosen: dict, rest: dict, x: Tree, y: Tree) -> torch.Tensor:
        one = (tree_map(lambda t: t.unsqueeze(0), x), tree_map(lambda t: t.unsqueeze(0), y))
        return losses_of(self.model, {**rest, **chosen}, self.loss_fn, *one).sum()

    def __call__(self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree) -> torch.Tensor:
        chosen, rest = self._split(state)
        if self.vectorised:
            try:
                grads = self._vmapped(chosen, rest, inputs, targets)
                return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.names], dim=1)
            except (RuntimeError, NotImplementedError) as e:
                warnings.warn(
                    f"torch.func.vmap cannot run this model ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    "falling back to a slower per-example loop", RuntimeWarning, stacklevel=3)
                self.vectorised = False
        return self._one_at_a_time(chosen, rest, inputs, targets)

    def _one_at_a_time(self, chosen: dict, rest: dict, inputs: Tree, targets: Tree) -> torch.Tensor:
        rows = batch_rows(targets, "targets")
        leaves = {n: t.detach().requires_grad_(True) for n, t in chosen.items()}
        width = sum(t.numel() for t in leaves.values())
        first = next(iter(leaves.values()))
        out = torch.empty((rows, width), dtype=first.dtype, device=first.device)
        for i in range(rows):
            x = tree_map(lambda t: t[i:i + 1], inputs)
            y = tree_map(lambda t: t[i:i + 1], targets)
            with torch.enable_grad():
                loss = losses_of(self.model, {**rest, **leaves}, self.loss_fn, x, y).sum()
                parts = torch.autograd.grad(loss, [leaves[n] for n in self.names], allow_unused=True)
            out[i] = torch.cat([(g if g is not None else torch.zeros_like(leaves[n])).reshape(-1)
                                for n, g in zip(self.names, parts)])
        return out
