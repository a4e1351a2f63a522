"""tracin.jax.per_example's edges the other tests leave open: mode='last_layer' refusing a bias whose length
is neither side of the kernel (named with both shapes, before anything is traced), and FullRows giving its
rows in the dtype it is built for (its docstring's contract; the export builds it for float32). References:
the documented message, float64 NumPy gradients of the shared MLP (conftest)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients
from tracin.jax.batches import Batch
from tracin.jax.params import layout_of
from tracin.jax.per_example import FullRows


@pytest.mark.parametrize("bias", [5, 2])
def test_a_bias_fitting_neither_side_of_the_kernel_is_refused_naming_both(bias):
    """kernel (4, 3) with a bias of 5 (or 2): neither its p = 4 (torch layout) nor 3 (Flax layout)."""
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    params = {"k": jnp.ones((4, 3)), "b": jnp.zeros(bias)}

    def loss(p, inputs, targets):
        return ((inputs @ p["k"]) ** 2).sum(-1) + p["b"].sum()

    message = rf"^mode='last_layer': kernel k \[4, 3\] does not fit bias b \({bias},\)$"
    with pytest.raises(ValueError, match=message):
        export_gradients(
            loss,
            [(params, 1.0)],
            (x, None),
            mode="last_layer",
            layers=["k", "b"],
            layer_input=lambda p, inputs: inputs,
            progress=False,
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_full_rows_are_given_in_the_dtype_they_are_built_for(mlp, data, dtype):
    """FullRows(..., dtype) returns (batch, d) rows of `dtype`: the per-example gradients of the MLP, equal
    to the float64 reference to that dtype's rounding."""
    x, y = data
    x, y = x[:6], y[:6]
    layout = layout_of(mlp.params[0], None)
    selected, arrays = layout.split(mlp.params[0])
    rows = FullRows(mlp.loss_fn, layout, dtype)(selected, arrays, Batch(0, 6, jnp.asarray(x), jnp.asarray(y)))
    assert rows.dtype == jnp.dtype(dtype) and rows.shape == (6, layout.dim)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(rows, np.float64), ref, rtol=eps, atol=1e-3 * eps)
