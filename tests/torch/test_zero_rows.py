"""fx352: an example whose gradient row is all 0 at every checkpoint (a loss of exactly 0: labels all ignored
under a summed loss) scores 0 with everything and cosine takes it as 0, silently; the export warns once at its
end naming such rows (in memory and into a store, full, factored and projected rows). A row 0 at only one of
the checkpoints, or no zero row, gives no warning. Rows are checked against float64 NumPy gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from tracin._export.sinks import ZERO_STARTS
from tracin.torch import export_gradients

W = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]  # the two checkpoints' weights (Linear(2, 1), no bias)
X = np.array([[2.0, 1.0], [1.0, 2.0], [0.5, 3.0], [1.0, 1.0], [3.0, 1.0]], dtype=np.float32)
BOTH, ONE = 3, 1  # row 3: w . x == y at both checkpoints; row 1: at checkpoint 0 only


def _targets(zero_at_both: bool) -> np.ndarray:
    y = np.array([0.0, 1.0, 0.0, 1.0 if zero_at_both else 0.0, 0.0], dtype=np.float32)
    return y[:, None]


def _reference(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 per-example gradients of (w . x - y)^2 with respect to w: 2 (w . x - y) x."""
    x = X.astype(np.float64)
    return 2 * (x @ w.T - y.astype(np.float64)) * x


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).squeeze(-1)


def _export(y: np.ndarray, checkpoints: list[int], **kwargs) -> tuple:
    model = nn.Linear(2, 1, bias=False)
    ckpts = [({"weight": torch.tensor(W[c], dtype=torch.float32)}, 1.0) for c in checkpoints]
    data = (torch.from_numpy(X), torch.from_numpy(y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = export_gradients(model, ckpts, data, _loss, batch_size=2, progress=False, **kwargs)
    return grads, [w for w in caught if str(w.message).startswith(ZERO_STARTS)]


SETTINGS = {
    "memory": {},
    "store": {"store": True},
    "last_layer": {"mode": "last_layer"},
    "projected": {"projection": tracin.Projection(4, seed=0)},
    "float16": {"dtype": "float16"},
}


def _kwargs(name: str, tmp_path) -> dict:
    kwargs = dict(SETTINGS[name])
    if kwargs.pop("store", False):
        kwargs["store"] = tmp_path / "store"
    return kwargs


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_row_zero_at_every_checkpoint_is_named_once(name, tmp_path):
    y = _targets(zero_at_both=True)
    for c in (0, 1):  # the independent reference: row 3 is 0 at both, row 1 at checkpoint 0 only
        ref = _reference(W[c], y)
        assert not ref[BOTH].any() and ref[ONE].any() == (c == 1)
        assert all(ref[r].any() for r in (0, 2, 4))
    grads, caught = _export(y, [0, 1], **_kwargs(name, tmp_path))
    if name == "memory":
        for c in (0, 1):
            np.testing.assert_allclose(np.asarray(grads.matrices[c]), _reference(W[c], y), rtol=1e-6)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{ZERO_STARTS}row {BOTH} of the data:"), message
    assert "every score with it is 0 and cosine treats it as 0" in message and "-100" in message
    assert caught[0].category is UserWarning
    assert caught[0].filename == __file__  # at the user's call


@pytest.mark.parametrize("name", ["memory", "store"])
def test_a_row_zero_at_one_checkpoint_only_is_not_named(name, tmp_path):
    y = _targets(zero_at_both=False)
    assert not _reference(W[0], y)[ONE].any() and _reference(W[1], y)[ONE].any()
    _, caught = _export(y, [0, 1], **_kwargs(name, tmp_path))
    assert caught == []


@pytest.mark.parametrize("name", ["memory", "store"])
def test_no_zero_row_no_warning(name, tmp_path):
    y = _targets(zero_at_both=False)
    assert _reference(W[1], y).any(1).all()
    _, caught = _export(y, [1], **_kwargs(name, tmp_path))
    assert caught == []


def test_several_rows_counted_and_listed(tmp_path):
    y = _targets(zero_at_both=True)
    _, caught = _export(y, [0], store=tmp_path / "s")  # one checkpoint: rows 1 and 3 are 0 at every one
    assert len(caught) == 1
    assert str(caught[0].message).startswith(f"{ZERO_STARTS}2 rows (1, 3) of the data: their gradient is 0")
