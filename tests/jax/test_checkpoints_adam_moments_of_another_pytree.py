"""Adam moments of another pytree than the checkpoint's Flax linen variables are named by their own paths: a
moment at 'c' where the variables hold params/a (and batch statistics) is 'c', not 'params/c' (the "params/"
lookup is taken, or used to name the paths missing there, only when it explains more of the moments)."""

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from tracin.jax import export_gradients  # noqa: E402


def _loss(p, inputs, targets):
    return jnp.sum((inputs @ p["params"]["a"] - targets) ** 2, axis=1)


def test_moments_at_a_path_neither_the_variables_nor_their_params_collection_have_are_named_as_they_are():
    w = np.ones((3, 2), np.float32)
    variables = {"params": {"a": w}, "batch_stats": {"m": np.zeros(2, np.float32)}}
    adam, *rest = optax.adam(0.1).init({"c": w})
    state = (adam._replace(count=jnp.asarray(1, jnp.int32)), *rest)
    x, y = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(ValueError) as raised:
        export_gradients(_loss, [(variables, 0.1, state)], (x, y), preconditioner="adam", progress=False)
    text = str(raised.value)
    assert re.match(
        r"checkpoints\[0\]\[2\] \(optimizer state\): the Adam moments have leaves the params do not: \['c'\]; ", text
    ), text  # mutant r362 C9 named ['params/c'], a path the moments do not have
