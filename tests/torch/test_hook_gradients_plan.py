"""HookGradients' plan (which parameters the hooks compute, from which layers), what dropping a layer removes, and
what one hooked pass records besides the rows (bytes_per_row), against hand-worked expectations and float64
autograd of each example alone."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from _models import SequenceFirstTokens
from torch import nn

from tracin.torch.checkpoints import tied_aliases
from tracin.torch.hook_gradients import HookGradients
from tracin.torch.per_example import PerExampleGradients

CE = nn.CrossEntropyLoss(reduction="none")


def _columns(model: nn.Module) -> tuple[dict[str, tuple[int, int]], int]:
    columns, offset = {}, 0
    for name, p in model.named_parameters():
        columns[name], offset = (offset, p.numel()), offset + p.numel()
    return columns, offset


def _autograd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Independent reference: float64 autograd of each example's loss alone, every parameter, (n, d)."""
    params = [p for _, p in model.named_parameters()]
    rows = []
    for i in range(len(y)):
        grads = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach().numpy()


class _Scaled(nn.Module):
    """Not a layer the rules cover (it holds `scale` besides its weight): F.linear of a weight it shares."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight, self.scale = weight, nn.Parameter(torch.tensor([1.5]))

    def forward(self, x):
        return nn.functional.linear(x, self.weight) * self.scale


class _TiedToUncovered(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.other = _Scaled(self.fc.weight)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + self.other(x))


def test_a_weight_tied_to_a_module_the_rules_do_not_cover_is_not_planned_and_its_rows_stay_exact():
    """Every holder of a planned parameter must be covered: fc.weight, also held by an uncovered module, is not
    planned (its use there unseen by the hooks: a plan taking it would miss that use and trip the sum check)."""
    model = _TiedToUncovered().double()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["fc.weight", "fc.bias", "other.scale", "head.weight", "head.bias"]
    hooks = HookGradients(model, names, CE)
    assert hooks.plan == {
        "fc.bias": [("fc", "bias")],
        "head.weight": [("head", "weight")],
        "head.bias": [("head", "bias")],
    }
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = {k: v for k, v in model.state_dict().items() if k not in tied_aliases(model)}  # as checkpoints load
        got = PerExampleGradients(model, names, CE)(state, x, y)
    assert not [str(w.message) for w in caught if "do not sum" in str(w.message)]
    want = _autograd_rows(model, x, y)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


class _Tied(nn.Module):
    """An Embedding whose weight the output Linear shares, and a Linear between them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix = nn.Embedding(7, 3), nn.Linear(3, 3)
        self.out = nn.Linear(3, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids)))).sum(1)


def test_dropping_one_holder_of_a_tied_weight_drops_the_weight_and_keeps_the_rest():
    """drop(layers) removes every parameter any of `layers` holds: a weight tied between `embed` and `out` goes
    when `out` alone is dropped (the hooks no longer see all its uses); layers lists the rest in the plan's order."""
    model = _Tied()
    hooks = HookGradients(model, [n for n, _ in model.named_parameters()], CE)
    assert hooks.layers == ["embed", "out", "mix"]  # the tied weight's holders first: the plan's order
    assert hooks.drop(["out"]) == ["embed.weight"]
    assert hooks.plan == {"mix.weight": [("mix", "weight")], "mix.bias": [("mix", "bias")]}
    assert hooks.layers == ["mix"]
    assert hooks.drop(["embed"]) == [] and hooks.drop(["mix"]) == ["mix.weight", "mix.bias"] and hooks.plan == {}


def test_bytes_per_row_are_the_captured_inputs_and_output_gradients_of_one_example():
    """bytes_per_row (sizes the batches a pass may take): each captured call's input and output gradient, summed
    over the calls and divided by the rows. Linear(4, 6) then Linear(6, 3) in float64 on 5 rows: (5 x 4 + 5 x 6)
    + (5 x 6 + 5 x 3) elements of 8 bytes = 760 bytes, 152 a row; `mid` run twice counts twice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    hooks = HookGradients(model, [n for n, _ in model.named_parameters()], CE)
    columns, width = _columns(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    hooks(model.state_dict(), x, y, torch.empty(5, width, dtype=torch.float64), columns)
    assert hooks.bytes_per_row == 152.0

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mid = nn.Linear(4, 4)

        def forward(self, x):
            return self.mid(torch.tanh(self.mid(x)))[:, :3]

    twice = Twice()  # float32: two calls of (5 x 4 + 5 x 4) elements of 4 bytes = 320 bytes, 64 a row
    hooks = HookGradients(twice, ["mid.weight", "mid.bias"], CE)
    columns, width = _columns(twice)
    hooks(twice.state_dict(), x.float(), y, torch.empty(5, width), columns)
    assert hooks.bytes_per_row == 64.0


def test_the_columns_of_a_layer_the_hooks_cannot_use_are_left_unwritten():
    """A layer run on tensors that are not batch-first is returned as unusable and its parameters' columns are left
    as they were (the caller computes them another way), not zeroed; the other layers' rows are exact."""
    model = SequenceFirstTokens().double()
    names = [n for n, _ in model.named_parameters()]
    hooks = HookGradients(model, names, CE)
    columns, width = _columns(model)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(6, 7, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    out = torch.full((6, width), 7.0, dtype=torch.float64)
    silent, unusable = hooks(model.state_dict(), x, y, out, columns)
    assert silent == [] and list(unusable) == ["token"]
    head = columns["head.weight"][0]
    assert (out[:, :head] == 7.0).all()
    want = _autograd_rows(model, x, y)[:, head:]
    np.testing.assert_allclose(out[:, head:].numpy(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
