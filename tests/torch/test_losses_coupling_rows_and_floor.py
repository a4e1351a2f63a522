"""losses._refuse_coupled, two edges its docstring states that no other test pins (r363 mutation testing):
every one of the first _COUPLING_ROWS rows is compared alone and in its batch, not only row 0 (a loss coupling
later rows only is refused naming the row), and a gap is measured against at least 1e-3 of the rows' largest loss,
so a tiny coupling next to an example of (near) zero loss is not taken for a coupled loss."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch import export_gradients

CE = nn.CrossEntropyLoss(reduction="none")


def _cumulative(outputs, targets):
    """Each row's loss plus those of the rows before it in the batch: row 0's is its own, row 1's is not."""
    return CE(outputs, targets).cumsum(0)


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_a_loss_coupling_only_rows_after_the_first_is_refused_naming_row_1(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    with pytest.raises(ValueError, match="loss_fn's loss of one example depends on the other examples") as caught:
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), _cumulative, mode=mode, progress=False)
    said = re.search(r"row (\d+)'s loss is (\S+) in a batch of 6 rows and (\S+) alone", str(caught.value))
    assert said is not None, str(caught.value)
    # float64 NumPy cross-entropy of the model's logits: row 1's loss in the batch is ce0 + ce1, alone ce1
    with torch.no_grad():
        logits = model(x).double().numpy()
    ce = -_log_softmax64(logits)[np.arange(6), y.numpy()]
    assert said.group(1) == "1"
    np.testing.assert_allclose(float(said.group(2)), ce[0] + ce[1], rtol=1e-5)
    np.testing.assert_allclose(float(said.group(3)), ce[1], rtol=1e-5)


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x).squeeze(-1)


def _squared_error_and_a_millionth_of_the_batch_mean(outputs, targets):
    """Each example's squared error plus 1e-6 of the batch's mean output: a coupling a millionth of the losses."""
    return (outputs - targets) ** 2 + 1e-6 * outputs.mean()


def test_a_coupling_far_below_the_largest_loss_is_not_refused_next_to_a_zero_loss_row():
    torch.manual_seed(0)
    model = _Regression()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, generator=g)
    w, b = model.fc.weight.detach().double().numpy()[0], float(model.fc.bias.detach())
    fitted = x.double().numpy() @ w + b
    residual = np.array([0.0, 1.5, -2.0, 1.0, -1.2, 0.8])  # row 0 fits exactly: its own loss is 0
    y = torch.from_numpy(fitted + residual).float()
    got = export_gradients(
        model, [(model.state_dict(), 1.0)], (x, y), _squared_error_and_a_millionth_of_the_batch_mean, progress=False
    ).matrices[0]
    # float64 NumPy per-example gradients of (w.x + b - y)^2 w.r.t. [w, b]: 2 r [x, 1] (the 1e-6 term is far
    # below the tolerance)
    r = fitted - y.double().numpy()
    want = 2 * r[:, None] * np.concatenate([x.double().numpy(), np.ones((6, 1))], axis=1)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
