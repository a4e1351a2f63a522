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
    if set(state) != {"params", "opt_state"}:  # the dict as given: no "step" entry made up
        raise KeyError(f"loss_fn got entries {sorted(state)}")
    return jnp.sum((inputs @ state["params"]["w"] - targets) ** 2, axis=1)


def test_train_state_dicts_without_a_step_export_their_params_alone():
    """Two checkpoints (step_as_array reads an int step as an array only when there are several)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = rng.standard_normal((5, 2)).astype(np.float32)
    weights = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(2)]
    states = [{"params": {"w": w}, "opt_state": optax.adam(1e-2).init({"w": w})} for w in weights]
    assert step_as_array(states[0]) is states[0]  # nothing to turn into an array: the dict as given
    with pytest.warns(UserWarning, match=r"leaving out \['opt_state'\]"):
        g = export_gradients(_loss, [(states[0], 1.0), (states[1], 0.5)], (x, y), progress=False)
    assert [q["name"] for q in g.metadata["params"]] == ["params/w"]
    for w, rows in zip(weights, g.matrices, strict=True):
        x64 = x.astype(np.float64)
        residual = x64 @ w.astype(np.float64) - y  # d/dw sum((x w - y)^2) = 2 x^T r, per example, row-major
        want = 2.0 * np.einsum("ni,nj->nij", x64, residual).reshape(5, -1)
        np.testing.assert_allclose(np.asarray(rows, np.float64), want, rtol=1e-5, atol=1e-5)
