"""A whole training checkpoint passed as params (a pickled {"variables": ..., "opt_state": ..., "step": ...})
makes a Flax loss fail: the refusal says to pass ckpt["variables"] (params.bundle_hint), not that the checkpoint
is of another model version; a loss that reads such a dict itself is exported as before, with no word."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import optax
import pytest

from tracin.jax import export_gradients

nn = pytest.importorskip("flax.linen")

MODEL = nn.Dense(2)
X = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
Y = np.array([0, 1, 0, 1, 1, 0])


def _bundle() -> dict:
    variables = MODEL.init(jax.random.PRNGKey(0), X[:1])
    saved = {"variables": variables, "opt_state": optax.adam(1e-3).init(variables["params"]), "step": 3}
    return pickle.loads(pickle.dumps(saved))


def test_a_loss_failing_on_a_whole_checkpoint_is_told_which_entry_to_pass():
    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply(params, x), y)

    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed") as caught:
        export_gradients(loss, [(_bundle(), 0.1)], (X, Y), progress=False)
    text = str(caught.value)
    assert "params look like a whole training checkpoint (entries 'opt_state', 'step', 'variables')" in text, text
    assert "pass ckpt['variables'] as the checkpoint's params" in text, text
    assert "another model version" not in text, text
    # as the hint says: the same loss on ckpt["variables"] exports, matching float64 NumPy gradients of W, b
    got = export_gradients(loss, [(_bundle()["variables"], 0.1)], (X, Y), progress=False)
    kernel = np.asarray(_bundle()["variables"]["params"]["kernel"], np.float64)
    bias = np.asarray(_bundle()["variables"]["params"]["bias"], np.float64)
    z = X.astype(np.float64) @ kernel + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p - np.eye(2)[Y]
    want = {"bias": dz, "kernel": np.einsum("ni,nj->nij", X.astype(np.float64), dz).reshape(6, -1)}
    rows = np.asarray(got.matrices[0], np.float64)
    np.testing.assert_allclose(rows, np.concatenate([want["bias"], want["kernel"]], axis=1), rtol=1e-5, atol=1e-6)


def test_a_loss_that_reads_the_bundle_itself_is_exported():
    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply(params["variables"], x), y)

    got = export_gradients(loss, [(_bundle(), 0.1)], (X, Y), layers=["variables/*"], progress=False)
    assert got.n_rows == 6 and got.dims == (8,)
