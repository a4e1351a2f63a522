"""A Flax TrainState restored as a dict without its "step" entry ({"params": ..., "opt_state": ...}, an orbax
item saved by hand) exports its "params" alone, as one with a step does: step_as_array turns only a Python-int
step into an array and adds no entry (a step made of None was an object array, which JAX cannot take)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from tracin.jax import export_gradients  # noqa: E402
from tracin.jax.params import step_as_array  # noqa: E402


def _loss(state, inputs, targets):
    return jnp.sum((inputs @ state["params"]["w"] - targets) ** 2, axis=1)


def test_a_train_state_dict_without_a_step_exports_its_params_alone():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = rng.standard_normal((5, 2)).astype(np.float32)
    params = {"w": rng.standard_normal((3, 2)).astype(np.float32)}
    state = {"params": params, "opt_state": optax.adam(1e-2).init(params)}
    assert step_as_array(state) is state  # nothing to turn into an array: the dict as given
    with pytest.warns(UserWarning, match=r"leaving out \['opt_state'\]"):
        g = export_gradients(_loss, [(state, 1.0)], (x, y), progress=False)
    assert [q["name"] for q in g.metadata["params"]] == ["params/w"]
    x64, w64 = x.astype(np.float64), params["w"].astype(np.float64)
    residual = x64 @ w64 - y  # d/dw sum((x w - y)^2) = 2 x^T r, per example, row-major (3, 2)
    want = 2.0 * np.einsum("ni,nj->nij", x64, residual).reshape(5, -1)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), want, rtol=1e-5, atol=1e-5)
