"""An array of strings or Python objects among the data (example ids, raw texts kept in the batch dict) is
refused up front by tracin.jax, naming its path and dtype and what to do, not left to fail inside JAX's
tracing of the per-example check with a message about a jit-wrapped function."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import tracin.jax  # noqa: E402


def _loss(params, batch, y):
    logits = batch["x"] @ params["w"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3), dtype=np.float32)
    y = rng.integers(0, 2, 6)
    params = {"w": rng.standard_normal((3, 2), dtype=np.float32)}
    return params, x, y


@pytest.mark.parametrize(
    "extra, dtype_text",
    [
        (np.array([f"id{i}" for i in range(6)]), "<U3"),
        (np.array([b"a", b"b", b"c", b"d", b"e", b"f"]), "|S1"),
        (np.array([object()] * 6, dtype=object), "object"),
    ],
)
def test_non_numeric_leaf_is_named(setup, extra, dtype_text):
    params, x, y = setup
    with pytest.raises(ValueError) as caught:
        tracin.jax.export_gradients(_loss, [(params, 0.1)], ({"x": x, "id": extra}, y), progress=False)
    text = str(caught.value)
    assert "inputs['id']" in text, text
    assert dtype_text in text, text
    assert "jit-wrapped" not in text, text
    assert "loss_fn" in text and "row" in text, text


def test_non_numeric_leaf_in_a_batch_list(setup):
    params, x, y = setup
    batches = [({"x": x[:3], "text": np.array(["a", "b", "c"])}, y[:3])]
    with pytest.raises(ValueError, match=r"data\[0\] inputs\['text'\]"):
        tracin.jax.export_gradients(_loss, [(params, 0.1)], batches, progress=False)


def test_numeric_leaves_still_taken(setup):
    """bool, int, uint, bfloat16 (ml_dtypes, numpy kind 'V') and float leaves are data as before."""
    params, x, y = setup
    extra = {
        "mask": np.ones(6, bool),
        "n": np.arange(6, dtype=np.uint8),
        "b": np.zeros(6, jnp.bfloat16),
        "id": np.arange(6, dtype=np.int64),
    }
    got = tracin.jax.export_gradients(_loss, [(params, 0.1)], ({"x": x, **extra}, y), progress=False)
    want = tracin.jax.export_gradients(_loss, [(params, 0.1)], ({"x": x}, y), progress=False)
    np.testing.assert_array_equal(np.asarray(got.matrices[0]), np.asarray(want.matrices[0]))


def test_an_object_array_of_numbers_is_told_to_be_converted(setup):
    """fr353: an object array holding only numbers (a DataFrame's .values of mixed columns) is told to be
    converted to a numeric dtype, not to be kept out of the data as ids or texts."""
    params, x, y = setup
    with pytest.raises(ValueError, match=r"data inputs\['x'\]: an array of dtype object") as caught:
        tracin.jax.export_gradients(_loss, [(params, 0.1)], ({"x": x.astype(object)}, y), progress=False)
    assert "np.asarray(leaf, dtype=np.float32)" in str(caught.value) and "texts" not in str(caught.value)
