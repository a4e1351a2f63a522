"""Rows that are not finite under a projection, in tracin.torch and tracin.jax exports.

An example whose gradient holds NaN or Inf is kept in memory (a row of NaN), as exports without a
projection keep it as it is, and scoring names it; a gradient store refuses it, naming the row in the
data's numbering; a finite gradient whose projection overflows float32 fails the export, naming the
row in the data's numbering (not the batch's) and the checkpoint. Both warn (RuntimeWarning) once
about an example whose loss is NaN, naming its row (tracin.jax's warning is tested here, tracin.torch's in
tests/torch/test_nan_losses.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import tracin
import tracin.jax as tj
import tracin.torch as tt
from tracin._export.projection import keeping_nonfinite, project
from tracin.projection import NonFiniteRowError

N, NAN_ROW, OVERFLOW_ROW, BATCH = 80, 70, 71, 64  # both rows in the second batch, rows [64, 80)
PROJECTIONS = [tracin.Projection(8, seed=3), tracin.Projection(8, seed=3, per_layer=True)]


def _data() -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(0)
    x = r.normal(size=(N, 4)).astype(np.float32)
    x[NAN_ROW, 0] = np.nan
    return x, r.integers(0, 3, N)


def _softmax_gradients(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-example gradients of cross-entropy(x @ w.T + b) by hand: dW (n, 3, 4) and db (n, 3)."""
    logits = x.astype(np.float64) @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return p[:, :, None] * x[:, None, :], p


def _matrix(projection: tracin.Projection, segments: list[int]) -> np.ndarray:
    """(d, dim) float64: row i the projection of the unit vector e_i (the projection is linear)."""
    d = sum(segments)
    kwargs = {"segments": segments} if projection.per_layer else {}
    return projection.apply(np.eye(d, dtype=np.float32), **kwargs).astype(np.float64)


def _check_rows(rows: np.ndarray, reference: np.ndarray, projection: tracin.Projection, segments: list[int]) -> None:
    """The NaN example's row is NaN in every column; the others are the float64 reference projected."""
    assert np.isnan(rows[NAN_ROW]).all()
    finite = np.delete(np.arange(N), NAN_ROW)
    assert np.isfinite(rows[finite]).all()
    expected = np.delete(reference, NAN_ROW, 0) @ _matrix(projection, segments)
    np.testing.assert_allclose(rows[finite], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["flat", "per_layer"])
def test_torch_keeps_the_row_of_an_example_whose_gradient_is_not_finite(projection, tmp_path):
    torch.manual_seed(0)
    model, (x, y) = nn.Linear(4, 3), _data()
    data = (torch.from_numpy(x), torch.from_numpy(y))
    kwargs = {"projection": projection, "batch_size": BATCH, "progress": False}
    states, loss = [(model.state_dict(), 1.0)], nn.CrossEntropyLoss(reduction="none")
    g = tt.export_gradients(model, states, data, loss, **kwargs)
    dw, db = _softmax_gradients(x, y, model.weight.detach().double().numpy(), model.bias.detach().double().numpy())
    _check_rows(np.array(g.matrices[0]), np.hstack([dw.reshape(N, -1), db]), projection, [12, 3])
    named = rf"train checkpoint 0 contains NaN or Inf values, first in rows \[{NAN_ROW}\]"
    with pytest.raises(ValueError, match=named):
        tracin.self_influence(g)
    with pytest.raises(ValueError, match=rf"^row {NAN_ROW} of checkpoint 0 holds NaN or Inf gradient values"):
        tt.export_gradients(model, states, data, loss, store=tmp_path / "g", **kwargs)
    assert tracin.GradientStore.open(tmp_path / "g", allow_partial=True).info()["rows_written"] == [BATCH]


# tracin.jax's warning about an example whose loss is not finite, naming it in the data's numbering
NAN_LOSS = rf"loss_fn gives a NaN or infinite loss for row {NAN_ROW} of the data at checkpoint 0"


def _jax_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return -jax.nn.log_softmax(x @ p["w"] + p["b"])[jnp.arange(len(y)), y]


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["flat", "per_layer"])
def test_jax_stores_the_row_of_an_example_whose_gradient_is_not_finite(projection):
    r, (x, y) = np.random.default_rng(1), _data()
    w, b = r.normal(size=(3, 4)), r.normal(size=3)
    params = {"w": jnp.asarray(w.T, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    with pytest.warns(RuntimeWarning, match=NAN_LOSS) as caught:
        g = tj.export_gradients(
            _jax_loss, [(params, 1.0)], (x, y), projection=projection, batch_size=BATCH, progress=False
        )
    assert sum(issubclass(w.category, RuntimeWarning) for w in caught) == 1  # once, for the one NaN row
    w32, b32 = np.asarray(params["w"], np.float64).T, np.asarray(params["b"], np.float64)
    dw, db = _softmax_gradients(x, y, w32, b32)
    # leaves in key order: b (3,), then w (4, 3) (in, out) row-major
    _check_rows(np.asarray(g.matrices[0]), np.hstack([db, dw.transpose(0, 2, 1).reshape(N, -1)]), projection, [3, 12])


def _overflowing_row(d: int) -> np.ndarray:
    """(d,) float32 of +-3e38 with the signs of Projection(1, seed=5)'s first d entries: its projection
    (d x 3e38, a column's entry does not depend on the row's width) is beyond float32, not only the
    kernel's running sums (a balanced row of 3e38 projects to a finite value, which is returned)."""
    return np.where(tracin.Projection(1, seed=5).apply(np.eye(d, dtype=np.float32))[:, 0] < 0, -3e38, 3e38).astype(
        np.float32
    )


def _overflowing_data() -> tuple[np.ndarray, np.ndarray]:
    """Rows whose gradient at the second checkpoint (w2 = 1) is x (then a w2 gradient of about 2e36):
    finite, +-3e38 in every column of OVERFLOW_ROW (whose projection overflows float32); NAN_ROW, before
    it in its batch, is NaN."""
    x = np.random.default_rng(2).normal(size=(N, 8)).astype(np.float32)
    x[OVERFLOW_ROW], x[NAN_ROW, 0] = _overflowing_row(8), np.nan
    return x, np.ones(N, np.float32)


OVERFLOW = (
    rf"checkpoint 1: the projection of row {OVERFLOW_ROW} is not finite: "
    r"the input holds NaN or Inf, or its values overflow float32"
)


def test_torch_names_the_row_whose_projection_overflows_in_the_data():
    x, y = _overflowing_data()
    model = nn.Sequential(nn.Linear(8, 1, bias=False), nn.Linear(1, 1, bias=False))
    nn.init.constant_(model[0].weight, 1e-3)
    states = []
    for w2 in (0.0, 1.0):  # at checkpoint 0 the first layer's gradient is 0 (w2 = 0)
        nn.init.constant_(model[1].weight, w2)
        states.append(({k: v.clone() for k, v in model.state_dict().items()}, 1.0))
    with pytest.raises(ValueError, match=OVERFLOW):
        tt.export_gradients(
            model,
            states,
            (torch.from_numpy(x), torch.from_numpy(y)),
            lambda out, t: out[:, 0] * t,
            projection=tracin.Projection(1, seed=5),
            batch_size=BATCH,
            progress=False,
        )


def test_jax_names_the_row_whose_projection_overflows_in_the_data():
    x, y = _overflowing_data()
    states = [({"w1": jnp.full(8, 1e-3, jnp.float32), "w2": jnp.float32(w2)}, 1.0) for w2 in (0.0, 1.0)]

    def loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return (x @ p["w1"]) * p["w2"] * y

    # the NaN row's loss (NaN x 0 at checkpoint 0) is warned about once, before checkpoint 1 fails
    with pytest.warns(RuntimeWarning, match=NAN_LOSS) as caught, pytest.raises(ValueError, match=OVERFLOW):
        tj.export_gradients(
            loss, states, (x, y), projection=tracin.Projection(1, seed=5), batch_size=BATCH, progress=False
        )
    assert sum(issubclass(w.category, RuntimeWarning) for w in caught) == 1


def test_a_projected_block_keeps_nonfinite_rows_as_nan():
    r = np.random.default_rng(3)
    left, right = r.normal(size=(5, 6)).astype(np.float32), r.normal(size=(5, 4)).astype(np.float32)
    left[1, 2], right[3, 0] = np.nan, np.inf
    p = tracin.Projection(6, seed=1)
    out_l, out_r = project(p, (left, right), None)
    assert np.isnan(out_l[[1, 3]]).all() and np.isnan(out_r[[1, 3]]).all()
    kept_l, kept_r = p.apply_factored(left[[0, 2, 4]], right[[0, 2, 4]])
    assert np.array_equal(out_l[[0, 2, 4]], kept_l) and np.array_equal(out_r[[0, 2, 4]], kept_r)
    full = np.hstack([left, right])
    out = project(tracin.Projection(6, seed=1, per_layer=True), full, [6, 4])
    assert np.isnan(out[[1, 3]]).all()
    expected = tracin.Projection(6, seed=1, per_layer=True).apply(full[[0, 2, 4]], segments=[6, 4])
    assert np.array_equal(out[[0, 2, 4]], expected)


def test_an_overflow_after_a_nonfinite_row_is_numbered_in_the_block():
    block = np.random.default_rng(4).normal(size=(4, 8)).astype(np.float32)
    block[1, 0], block[2] = np.nan, _overflowing_row(8)
    with pytest.raises(NonFiniteRowError, match="the projection of row 2 is not finite") as caught:
        keeping_nonfinite(lambda rows: (tracin.Projection(1, seed=5).apply(rows),), block)
    assert caught.value.row == 2
    with pytest.raises(NonFiniteRowError, match="the projection of row 1 is not finite"):  # the public apply: unchanged
        tracin.Projection(1, seed=5).apply(block)
