"""preconditioner="adam" under torch.autocast with float32 params: the gradients come out of 16-bit compute, so
the rounding check runs as for 16-bit params. A shift added to every logit (softmax is shift-invariant: its
gradient is 0 in exact arithmetic) in bfloat16, with the tiny second moment v of float32 training, is warned
about, and its rows are that rounding noise divided by ~eps."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from tracin.torch import export_gradients  # noqa: E402

D, C, N = 6, 4, 16  # features, classes, examples
WARNED = re.compile(r"preconditioner='adam': the 16-bit gradients of (.+) are near their rounding")


class Head(nn.Module):
    """x @ weight, then one shift added to every logit in the logits' dtype (bfloat16 under autocast)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, C))
        self.shift = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.weight
        return z + self.shift.to(z.dtype)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), y, reduction="none")


def _export(autocast: bool) -> tuple:
    """(exported rows of checkpoint 0, texts of the rounding warnings) of a float32 model trained with Adam in
    float32, the shift's v set to 1e-18 (a gradient float32 training saw as rounding only)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((N, D)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, C, N))
    torch.manual_seed(0)
    model = nn.Sequential(Head())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    checkpoints = []
    for _ in range(2):
        for _ in range(3):
            opt.zero_grad()
            _loss(model(x), y).mean().backward()
            opt.step()
        state = copy.deepcopy(opt.state_dict())
        state["state"][1]["exp_avg_sq"].fill_(1e-18)  # the shift's, the second parameter
        checkpoints.append(({k: t.detach().clone() for k, t in model.state_dict().items()}, 0.05, state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = export_gradients(
                model, checkpoints, (x, y), _loss, preconditioner="adam", batch_size=8, progress=False
            )
    return np.asarray(out.matrices[0], np.float64), [str(w.message) for w in caught if WARNED.search(str(w.message))]


def _shift_share(rows: np.ndarray) -> float:
    """Mean over rows of the shift's (the last column) share of the row's norm^2."""
    return float(np.mean(rows[:, -1] ** 2 / (rows**2).sum(1)))


def test_adam_under_autocast_warns_about_a_float32_params_bfloat16_rounding():
    rows, messages = _export(autocast=True)
    assert len(messages) == 1, messages  # once per export
    assert WARNED.search(messages[0]).group(1).startswith("'0.shift' (bfloat16, ")
    assert _shift_share(rows) > 0.3  # the noise it names does dominate the rows


def test_adam_outside_autocast_on_the_same_model_does_not_warn():
    rows, messages = _export(autocast=False)
    assert messages == []
    assert _shift_share(rows) < 0.1  # float32 rounding only
