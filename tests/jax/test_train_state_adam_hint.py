"""A Flax TrainState given as (state, learning_rate) with preconditioner="adam": the missing optimizer
state's error names the TrainState's own opt_state as the third item to give; that call then works."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

optax = pytest.importorskip("optax")
train_state = pytest.importorskip("flax.training.train_state")

from tracin.jax import export_gradients  # noqa: E402

LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8


def _loss(params, x, y):
    return 0.5 * (x @ params["w"] - y) ** 2


def _state_loss(state, x, y):
    return _loss(state.params, x, y)


def _data():
    r = np.random.default_rng(3)
    return r.normal(size=(6, 3)).astype(np.float32), r.normal(size=6).astype(np.float32)


def _stepped_state(x, y):
    """A TrainState with optax.adam after one apply_gradients step."""
    params = {"w": jnp.asarray([0.3, -0.2, 0.5], jnp.float32)}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(LR, b1=B1, b2=B2, eps=EPS))
    grads = jax.grad(lambda p: _loss(p, x, y).mean())(state.params)
    return state.apply_gradients(grads=grads)


def test_train_state_without_third_item_names_its_opt_state():
    x, y = _data()
    state = _stepped_state(x, y)
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state.*state\.opt_state"):
        export_gradients(_state_loss, [(state, LR)], (x, y), preconditioner="adam", progress=False)


def test_restored_train_state_dict_names_its_opt_state_entry():
    x, y = _data()
    state = _stepped_state(x, y)
    restored = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    with pytest.raises(ValueError, match=r"state\['opt_state'\]"):
        export_gradients(_loss, [(restored, LR)], (x, y), preconditioner="adam", progress=False)


def test_plain_params_keep_the_old_message():
    x, y = _data()
    state = _stepped_state(x, y)
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state") as err:
        export_gradients(_loss, [(state.params, LR)], (x, y), preconditioner="adam", progress=False)
    assert "opt_state" not in str(err.value) and "TrainState" not in str(err.value)


def test_the_named_call_gives_adam_preconditioned_rows():
    x, y = _data()
    state = _stepped_state(x, y)
    with pytest.warns(UserWarning, match="only 'params' is exported"):  # the TrainState's opt_state left out
        g = export_gradients(
            _state_loss,
            [(state, LR, state.opt_state)],
            (x, y),
            preconditioner="adam",
            preconditioner_options={"b1": B1, "b2": B2, "eps": EPS},
            progress=False,
        )
    # float64 reference: per-example gradient (x.w - y) x over sqrt(bias-corrected nu) + eps
    w = np.asarray(state.params["w"], np.float64)
    xs, ys = x.astype(np.float64), y.astype(np.float64)
    rows = (xs @ w - ys)[:, None] * xs
    (adam,) = [s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState)]
    t = float(adam.count)
    nu = np.asarray(adam.nu["w"], np.float64)
    expected = rows / (np.sqrt(nu / (1 - B2**t)) + EPS)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=2e-5, atol=1e-6)
