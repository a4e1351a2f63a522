"""preconditioner="adam" on a model whose chosen parameters are partly 16-bit (float32 master weights computed
in bfloat16 next to a bfloat16 parameter): the rounding check runs as soon as any chosen parameter is 16-bit,
and the autocast warning speaks of Adam's division for "adam" alone."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import torch
from torch import nn

from tracin.torch import export_gradients

D, C, N = 6, 4, 16  # features, classes, examples
WARNED = re.compile(r"preconditioner='adam': the 16-bit gradients of (.+) are near their rounding")
DIVIDES = "divides it by sqrt(v_hat) + eps"


class Head(nn.Module):
    """A float32 weight used in bfloat16, and a bfloat16 shift added to every logit (softmax is shift-invariant:
    the shift's gradient is 0 in exact arithmetic, bfloat16 rounding in practice)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, C))
        self.shift = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.bfloat16() @ self.weight.bfloat16() + self.shift


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), y, reduction="none")


def _setup() -> tuple:
    """(model, checkpoints with Adam states whose shift v is 1e-18, data)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((N, D)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, C, N))
    torch.manual_seed(0)
    model = nn.Sequential(Head())
    assert [p.dtype for p in model.parameters()] == [torch.float32, torch.bfloat16]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        _loss(model(x), y).mean().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["state"][1]["exp_avg_sq"].fill_(1e-18)  # the shift's: training saw its gradient as rounding only
    return model, [({k: t.detach().clone() for k, t in model.state_dict().items()}, 0.05, state)], (x, y)


def test_adam_warns_about_the_rounding_of_a_bfloat16_parameter_beside_a_float32_one():
    model, checkpoints, data = _setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_gradients(model, checkpoints, data, _loss, preconditioner="adam", batch_size=8, progress=False)
    messages = [str(w.message) for w in caught if WARNED.search(str(w.message))]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert WARNED.search(messages[0]).group(1).startswith("'0.shift' (bfloat16, ")
    rows = np.asarray(out.matrices[0], np.float64)
    assert np.mean(rows[:, -1] ** 2 / (rows**2).sum(1)) > 0.3  # the noise it names does dominate the rows


def _autocast_warning(preconditioner: str | None) -> str:
    model, checkpoints, data = _setup()
    if preconditioner is None:
        checkpoints = [c[:2] for c in checkpoints]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            export_gradients(
                model, checkpoints, data, _loss, preconditioner=preconditioner, batch_size=8, progress=False
            )
    (said,) = [str(w.message) for w in caught if "called under torch.autocast" in str(w.message)]
    return said


def test_the_autocast_warning_speaks_of_adams_division_for_adam_alone():
    assert DIVIDES in _autocast_warning("adam")
    assert DIVIDES not in _autocast_warning("adam_update")
    assert DIVIDES not in _autocast_warning(None)
