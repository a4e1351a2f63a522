"""An optax Adam state initialised on one part of a checkpoint's pytree (a TrainState in a tuple, the params in a
dict beside other entries): the refusal names the part where its moments lie and how to pass the checkpoint;
the advice, followed, gives rows equal to a float64 NumPy reference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracin.jax import export_gradients

B2, EPS = 0.999, 1e-8


def _loss(params, x, y):
    return (x @ params["w"] + params["b"] - y) ** 2


def _trained():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3), dtype=np.float32), rng.standard_normal(6).astype(np.float32)
    params = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    tx = optax.adam(0.05)
    state = tx.init(params)
    for _ in range(3):
        grads = jax.grad(lambda p: _loss(p, x, y).mean())(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return x, y, params, state


def test_moments_of_a_params_entry_nested_in_a_tuple_name_it_and_the_top_level_params_way():
    x, y, params, state = _trained()
    checkpoint = ({"params": params}, {"stats": jnp.ones(2)})
    with pytest.raises(ValueError, match=re.escape("They all lie under '0/params/' in the params")) as info:
        export_gradients(
            lambda c, x, y: _loss(c[0]["params"], x, y),
            [(checkpoint, 0.05, state)],
            (x, y),
            preconditioner="adam",
            progress=False,
        )
    assert "top-level 'params' entry" in str(info.value)


def test_moments_of_a_dict_entry_name_it_and_the_advice_followed_matches_numpy():
    x, y, params, state = _trained()
    with pytest.raises(ValueError, match=re.escape("They all lie under 'net/' in the params")) as info:
        export_gradients(
            lambda c, x, y: _loss(c["net"], x, y),
            [({"net": params, "scale": jnp.ones(2)}, 0.05, state)],
            (x, y),
            preconditioner="adam",
            progress=False,
        )
    assert "pass that part as the params" in str(info.value)
    # under two parts (two copies of the params): no part is named, the plain refusal stays
    with pytest.raises(ValueError, match=r"looked up by leaf path\)$"):
        export_gradients(
            lambda c, x, y: _loss(c["a"], x, y),
            [({"a": params, "c": params}, 0.05, state)],
            (x, y),
            preconditioner="adam",
            progress=False,
        )
    rows = export_gradients(_loss, [(params, 0.05, state)], (x, y), preconditioner="adam", progress=False)
    # float64 reference: per-example gradient of (x w + b - y)^2 over Adam's sqrt(v_hat) + eps; leaves in b, w order
    w, b = np.float64(params["w"]), np.float64(params["b"])
    r = 2 * (x.astype(np.float64) @ w + b - y)
    grads = np.concatenate([r[:, None], r[:, None] * x], axis=1)
    adam = state[0]
    count = int(adam.count)
    nu = np.concatenate([np.float64(adam.nu["b"]).reshape(1), np.float64(adam.nu["w"])])
    expected = grads / (np.sqrt(nu / (1 - B2**count)) + EPS)
    np.testing.assert_allclose(rows.matrices[0], expected, rtol=2e-5, atol=1e-6 * np.abs(expected).max())
