"""Per-example gradients of chosen parameters: torch.func vmap(grad) with a per-example fallback."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from .data import Tree, batch_rows, slice_rows, tree_map
from .linear_capture import NotRankOne, capture_linear
from .losses import LossFn, losses_of


class PerExampleGradients:
    """(batch, d) gradients of the per-example losses w.r.t. the chosen parameters, flattened and
    concatenated in `names` order, in the parameters' dtype on their device.

    Three ways, fastest first:
    - all chosen parameters are weights/biases of nn.Linear layers applied once to (batch, in)
      inputs: one batched backward captures inputs and output gradients, and the outer products
      are written straight into the output (linear_capture). Checked once, on the first rows of
      the first batch, against the per-example loop; any disagreement turns it off.
    - torch.func vmap(grad) over the batch.
    - if vmap cannot run the model (in-place ops, custom autograd functions), a warning, then
      one example at a time with torch.autograd.grad.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss_fn: LossFn):
        self.model, self.names, self.loss_fn = model, list(names), loss_fn
        params = dict(model.named_parameters())
        self.widths = [params[n].numel() for n in self.names]
        self.width = sum(self.widths)
        self.dtype = params[self.names[0]].dtype
        self.linear_plan = _linear_plan(model, self.names, self.widths)
        self.linear_checked = False
        self.vectorised = True
        self._vmapped = vmap(grad(self._loss_of_one), in_dims=(None, None, 0, 0))

    def _split(self, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        chosen = {n: state[n] for n in self.names}
        rest = {n: t for n, t in state.items() if n not in chosen}
        return chosen, rest

    def _loss_of_one(self, chosen: dict, rest: dict, x: Tree, y: Tree) -> torch.Tensor:
        one = (tree_map(lambda t: t.unsqueeze(0), x), tree_map(lambda t: t.unsqueeze(0), y))
        return losses_of(self.model, {**rest, **chosen}, self.loss_fn, *one).sum()

    def __call__(self, state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Writes into `out` ((batch, d), the parameters' dtype and device) when given."""
        chosen, rest = self._split(state)
        if out is None:
            first = next(iter(chosen.values()))
            out = torch.empty((batch_rows(targets, "targets"), self.width), dtype=first.dtype, device=first.device)
        if self.linear_plan is not None and self._by_linear_capture(state, chosen, rest, inputs, targets, out):
            return out
        if self.vectorised:
            try:
                grads = self._vmapped(chosen, rest, inputs, targets)
            except (RuntimeError, NotImplementedError) as e:
                warnings.warn(
                    f"torch.func.vmap cannot run this model ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    "falling back to a slower per-example loop", RuntimeWarning, stacklevel=3)
                self.vectorised = False
            else:
                offset = 0
                for n, w in zip(self.names, self.widths, strict=True):
                    out[:, offset:offset + w].copy_(grads[n].reshape(out.shape[0], w))
                    offset += w
                return out
        self._one_at_a_time(chosen, rest, inputs, targets, out)
        return out

    def _by_linear_capture(self, state, chosen, rest, inputs, targets, out) -> bool:
        try:
            captured = capture_linear(self.model, list(self.linear_plan), state, self.loss_fn, inputs, targets)
        except NotRankOne:
            self.linear_plan = None
            return False
        for module, pieces in self.linear_plan.items():
            x, dy = captured[module]
            for kind, offset, width in pieces:
                dest = out[:, offset:offset + width]
                if kind == "weight":
                    torch.mul(dy[:, :, None], x[:, None, :], out=dest.view(-1, dy.shape[1], x.shape[1]))
                else:
                    dest.copy_(dy)
        if not self.linear_checked:
            rows = min(4, out.shape[0])
            reference = torch.empty_like(out[:rows])
            head = (slice_rows(inputs, 0, rows), slice_rows(targets, 0, rows))
            self._one_at_a_time(chosen, rest, *head, reference)
            scale = reference.abs().max().item()
            if not torch.allclose(out[:rows], reference, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
                self.linear_plan = None  # the layers are used in ways the hooks cannot see
                return False
            self.linear_checked = True
        return True

    def _one_at_a_time(self, chosen: dict, rest: dict, inputs: Tree, targets: Tree, out: torch.Tensor) -> None:
        leaves = {n: t.detach().requires_grad_(True) for n, t in chosen.items()}
        for i in range(out.shape[0]):
            x, y = slice_rows(inputs, i, i + 1), slice_rows(targets, i, i + 1)
            with torch.enable_grad():
                loss = losses_of(self.model, {**rest, **leaves}, self.loss_fn, x, y).sum()
                parts = torch.autograd.grad(loss, [leaves[n] for n in self.names], allow_unused=True)
            out[i] = torch.cat([(g if g is not None else torch.zeros_like(leaves[n])).reshape(-1)
                                for n, g in zip(self.names, parts, strict=True)])


def _linear_plan(model: nn.Module, names: Sequence[str], widths: Sequence[int]) -> dict | None:
    """{Linear module name: [("weight" | "bias", column offset, width), ...]} when every chosen
    parameter is an untied weight or bias of an nn.Linear; else None."""
    modules = dict(model.named_modules())
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    plan: dict[str, list] = {}
    offset = 0
    for name, width in zip(names, widths, strict=True):
        owner, _, kind = name.rpartition(".")
        module = modules.get(owner)
        if not isinstance(module, nn.Linear) or kind not in ("weight", "bias") or counts[id(getattr(module, kind))] > 1:
            return None
        plan.setdefault(owner, []).append((kind, offset, width))
        offset += width
    return plan
