"""A list of two dicts with other keys, [inputs, targets] ({"image": x}, {"label": y}), is one (inputs, targets)
dataset by PAIR_RULE and looks like one: no warning (the warning is for two dicts with the same keys, which look
like two batches of a loader), and the rows are the float64 gradients of the whole dataset."""

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import tracin.jax  # noqa: E402


def _loss(params, inputs, targets):
    logits = inputs["image"] @ params["w"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets["label"][:, None], axis=1)[:, 0]


def test_a_list_of_an_inputs_dict_and_a_targets_dict_is_one_dataset_without_warning():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3), dtype=np.float32)
    y = rng.integers(0, 2, 5)
    params = {"w": rng.standard_normal((3, 2), dtype=np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "two dicts with the same keys" UserWarning
        got = tracin.jax.export_gradients(_loss, [(params, 0.1)], [{"image": x}, {"label": y}], progress=False)
    x64 = x.astype(np.float64)
    logits = x64 @ params["w"].astype(np.float64)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.einsum("ni,nj->nij", x64, p - np.eye(2)[y]).reshape(5, -1)  # d(-log softmax)/dW per example
    np.testing.assert_allclose(np.asarray(got.matrices[0]), want, rtol=1e-5, atol=1e-6)
