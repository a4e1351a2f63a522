"""fr357: a bfloat16 bias on a float32 kernel widens only the checks its gradient enters (the bias gradient as
dL/dy, the kernel's gradient against dL/dy (x) layer_input), not layer_input's own check against the input the
kernel's dot_general gets: a 1% wrong layer_input is refused as with a float32 bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients
from tracin.jax.per_example import LayerInputError


def _model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    params = {
        "l1": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)},
        "head": {
            "kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
        },
    }

    def features(p, inputs):
        return jnp.tanh(inputs @ p["l1"]["kernel"])

    def loss(p, inputs, targets):
        z = features(p, inputs) @ p["head"]["kernel"] + p["head"]["bias"].astype(jnp.float32)
        return -jax.nn.log_softmax(z)[jnp.arange(targets.shape[0]), targets]

    return x, y, params, features, loss


def test_a_bfloat16_bias_on_a_float32_kernel_exports_its_factors():
    x, y, params, features, loss = _model()
    got = export_gradients(
        loss, [(params, 1.0)], (x, y), mode="last_layer", layers=["head"], layer_input=features, progress=False
    )
    w1, k = (np.asarray(params[n]["kernel"], np.float64) for n in ("l1", "head"))
    b = np.asarray(params["head"]["bias"].astype(jnp.float32), np.float64)
    h = np.tanh(x.astype(np.float64) @ w1)  # float64 reference
    z = h @ k + b
    p = np.exp(z - z.max(1, keepdims=True))
    delta = p / p.sum(1, keepdims=True) - np.eye(5)[y]
    np.testing.assert_allclose(np.asarray(got.left[0], np.float64), delta, atol=1e-2)  # bfloat16 bias gradient
    np.testing.assert_allclose(np.asarray(got.right[0], np.float64)[:, :-1], h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [1.01, 1.05])
def test_a_wrong_layer_input_is_refused_though_the_bias_is_bfloat16(factor):
    x, y, params, features, loss = _model()
    with pytest.raises(LayerInputError, match=r"differs from the input its dot_general gets by .*allowed: 0\.000"):
        export_gradients(
            loss,
            [(params, 1.0)],
            (x, y),
            mode="last_layer",
            layers=["head"],
            layer_input=lambda p, i: features(p, i) * factor,
            progress=False,
        )
