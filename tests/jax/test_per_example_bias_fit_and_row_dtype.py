"""tracin.jax.per_example's edges the other tests leave open (killer tests of hand mutants): mode='last_layer'
refusing a bias whose length is neither side of the kernel, a NaN input row stored rather than refused as a wrong
layer_input, a bfloat16 bias held to 8 eps of bfloat16; FullRows giving its rows in the dtype it is built for;
compute_eps skipping a cast to a dtype of the same precision; the coupling check's tolerance relative to the
largest loss and its 1e-3 floor on a GPU. References: documented messages and values, float64 NumPy gradients."""

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


def test_compute_eps_skips_a_cast_of_an_input_to_a_dtype_of_the_same_precision():
    """float8 e4m3fn inputs cast to e4m3fnuz (the same 3-bit mantissa, eps 0.125: every e4m3fn value up to
    fnuz's largest, 240, is kept exactly) and then to float32 round nothing: the function computes in float32
    (its eps, 2**-23), as for a cast to a finer dtype; a float8 product would give 0.125."""
    import jax

    from tracin.jax.per_example import compute_eps

    fn = lambda w, x: x.astype(jnp.float8_e4m3fnuz).astype(jnp.float32) @ w  # noqa: E731
    closed = jax.make_jaxpr(fn)(jnp.ones(8), jnp.ones((4, 8), jnp.float8_e4m3fn))
    assert [e.primitive.name for e in closed.jaxpr.eqns][0] == "convert_element_type"
    assert compute_eps(closed) == 2.0**-23


@pytest.mark.parametrize("bias", [True, False])
def test_a_nan_input_row_in_last_layer_mode_is_stored_not_refused_as_a_wrong_layer_input(mlp, data, bias):
    """x[1] holds a NaN: layer_input and the input the head's dot_general gets are NaN alike on that row, which
    is no evidence that layer_input is wrong (the loss is NaN, warned about by the export); the other rows are
    the float64 reference factors dL/dz and [h, 1] (h without a bias)."""
    import warnings

    x, y = data
    x, y = x[:6].copy(), y[:6]
    x[1, 0] = np.nan
    params = mlp.params[0] if bias else {"l1": mlp.params[0]["l1"], "l2": {"kernel": mlp.params[0]["l2"]["kernel"]}}

    def loss(p, inputs, targets):
        return mlp.cross_entropy(mlp.hidden(p, inputs) @ p["l2"]["kernel"] + p["l2"].get("bias", 0.0), targets)

    weights = dict(mlp.weights[0]) if bias else {**mlp.weights[0], "b2": np.zeros(3)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = export_gradients(
            loss, [(params, 1.0)], (x, y), mode="last_layer", layers=["l2"], layer_input=mlp.hidden, progress=False
        )
    assert any("NaN or infinite loss for row 1 of the data" in str(w.message) for w in caught)
    keep = [0, 2, 3, 4, 5]
    ref = mlp.reference_grads(weights, x[keep], y[keep])
    right = np.hstack([ref["hidden"], np.ones((5, 1))]) if bias else ref["hidden"]
    np.testing.assert_allclose(np.asarray(got.left[0], np.float64)[keep], ref["b2"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got.right[0], np.float64)[keep], right, rtol=1e-5, atol=1e-7)


def test_a_zero_loss_off_by_a_rounding_of_the_largest_loss_is_not_taken_for_coupling():
    """check_uncoupled's tolerance is relative to the largest loss, not to each loss: a loss that is exactly 0 on
    row 0 (a zero input) and 1e-6 more in the eager batch of 2 than in that of 4 (1e-6 of the O(1) losses, as
    another summation order rounds) is accepted, and the rows are the float64 gradients 2 x_i (x_i . w)."""
    x = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
    x[0] = 0.0
    w = np.random.default_rng(6).normal(size=(3, 2)).astype(np.float32)

    def loss(p, inputs, targets):
        return ((inputs @ p["w"]) ** 2).sum(-1) + 1e-6 * (inputs.shape[0] == 2)

    with pytest.warns(UserWarning, match="all-0 gradients for row 0 of the data"):  # the zero input's row
        got = export_gradients(loss, [({"w": jnp.asarray(w)}, 1.0)], (x, None), progress=False)
    x64 = x.astype(np.float64)
    expected = 2 * np.einsum("ni,nk->nik", x64, x64 @ w.astype(np.float64)).reshape(6, -1)
    np.testing.assert_allclose(np.asarray(got.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)


def test_the_coupling_tolerance_on_a_gpu_is_at_least_1e_3_though_the_loss_computes_in_float32(monkeypatch):
    """uncoupled_rtol on a GPU (its docstring): 1e-3, or 8 eps of the coarsest dtype computed in (TF32's 2**-10:
    0.0078125), or 8 eps of the losses' dtype, at most 8 eps of bfloat16 (0.0625). A float32 loss without a
    default-precision product (eps 2**-23) gets the 1e-3 floor, not a CPU's 1e-4."""
    import jax

    from tracin.jax import per_example

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    f32 = float(jnp.finfo(jnp.float32).eps)
    assert per_example.uncoupled_rtol(f32, jnp.float32) == 1e-3
    assert per_example.uncoupled_rtol(2.0**-10, jnp.float32) == 0.0078125
    assert per_example.uncoupled_rtol(f32, jnp.float8_e4m3fn) == 0.0625


def test_a_bfloat16_bias_used_scaled_is_refused_to_8_eps_of_bfloat16():
    """A float32 head with a bfloat16 bias whose loss uses 1.25 b: dL/db = 1.25 dL/dy, 25% off the kernel's
    dL/dy, beyond the bias's widened tolerance 8 eps of bfloat16 (0.0625): refused naming it."""
    import jax

    from tracin.jax.per_example import LayerInputError

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 5, 8)
    params = {
        "kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
    }

    def loss(p, inputs, targets):
        z = inputs @ p["kernel"] + 1.25 * p["bias"].astype(jnp.float32)
        return -jax.nn.log_softmax(z)[jnp.arange(targets.shape[0]), targets]

    with pytest.raises(LayerInputError, match=r"allowed: 0\.0625\)"):
        export_gradients(
            loss,
            [(params, 1.0)],
            (x, y),
            mode="last_layer",
            layers=["kernel", "bias"],
            layer_input=lambda p, inputs: inputs,
            progress=False,
        )


def test_a_small_penalty_on_the_kernel_is_refused_by_the_probe_check():
    """loss_i + lam |K|^2: the kernel's per-example gradient is dL/dy (x) x + 2 lam K, off dL/dy (x) x by 2 lam |K|,
    set (float64 NumPy forward pass) to 0.3% of |dL/dy| |x| on the probed rows 0 and 7: past the check's 1e-4 of
    the gradient + 1e-6 of the product, so refused as a use of the kernel outside y = x K + b."""
    import jax

    from tracin.jax.per_example import LayerInputError

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 6)), rng.integers(0, 5, 8)
    k, b = rng.standard_normal((6, 5)), rng.standard_normal(5)
    z = x @ k + b
    p = np.exp(z - z.max(1, keepdims=True))
    dy = p / p.sum(1, keepdims=True) - np.eye(5)[y]
    onorm = np.linalg.norm(dy, axis=1) * np.linalg.norm(x, axis=1)
    lam = 0.003 * min(onorm[0], onorm[7]) / (2 * np.linalg.norm(k))
    params = {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}

    def loss(p, inputs, targets):
        z = inputs @ p["kernel"] + p["bias"]
        return -jax.nn.log_softmax(z)[jnp.arange(targets.shape[0]), targets] + lam * (p["kernel"] ** 2).sum()

    with pytest.raises(LayerInputError, match="differs from the kernel's per-example gradient by"):
        export_gradients(
            loss,
            [(params, 1.0)],
            (x.astype(np.float32), y),
            mode="last_layer",
            layers=["kernel", "bias"],
            layer_input=lambda p, inputs: inputs,
            progress=False,
        )
