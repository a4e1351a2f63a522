"""Data as a dict of arrays, the batches tfds.as_numpy / Hugging Face datasets / grain give (one dict or an
iterable of them), is refused by tracin.jax with the two ways to pass it: (batch, None) with loss_fn reading
the labels from the batch, or split into (inputs, targets); the advised (batch, None) route then works."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import tracin.jax  # noqa: E402


def _loss(params, batch, targets):
    logits = batch["image"] @ params["w"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=1)[:, 0]


def _setup():
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((6, 3), dtype=np.float32), "label": rng.integers(0, 2, 6)}
    return {"w": rng.standard_normal((3, 2), dtype=np.float32)}, batch


def _message(data) -> str:
    params, _ = _setup()
    with pytest.raises(TypeError) as caught:
        tracin.jax.export_gradients(_loss, [(params, 0.1)], data, progress=False)
    return str(caught.value)


def test_one_dict():
    text = _message(_setup()[1])
    assert "'image', 'label'" in text, text
    assert "(data, None)" in text and "(data['image'], data['label'])" in text, text


def test_iterable_of_dicts():
    _, batch = _setup()
    text = _message([batch, batch, batch])  # (two would be read as one (inputs, targets) pair: PAIR_RULE)
    assert "data[0]" in text and "'image', 'label'" in text, text
    assert "(batch, None)" in text and "(batch['image'], batch['label'])" in text, text


def test_no_label_key():
    text = _message({"a": np.ones((2, 3)), "b": np.ones(2)})
    assert "(data[<inputs>], data[<labels>])" in text, text


def test_advised_route_works():
    params, batch = _setup()
    got = tracin.jax.export_gradients(_loss, [(params, 0.1)], (batch, None), progress=False)
    listed = tracin.jax.export_gradients(_loss, [(params, 0.1)], [(batch, None)], progress=False)
    x = batch["image"].astype(np.float64)
    p = np.exp(x @ params["w"]) / np.exp(x @ params["w"]).sum(1, keepdims=True)
    onehot = np.eye(2)[batch["label"]]
    want = np.einsum("ni,nj->nij", x, p - onehot).reshape(6, -1)  # d(-log softmax)/dW, float64
    np.testing.assert_allclose(np.asarray(got.matrices[0]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(listed.matrices[0]), np.asarray(got.matrices[0]))


def test_list_of_two_dict_batches_warns():
    """[batch, batch] of two dicts with the same keys is read by PAIR_RULE as one (inputs, targets) dataset
    (inputs the first batch, targets the second), silently dropping the second batch's rows for a loss that
    reads its labels from the batch: a UserWarning says so and how to pass either reading."""
    params, batch = _setup()
    with pytest.warns(UserWarning, match=r"two dicts with the same keys \('image', 'label'\)") as caught:
        got = tracin.jax.export_gradients(_loss, [(params, 0.1)], [batch, batch], progress=False)
    text = str(caught[0].message)
    assert "[(batch, None) for batch in batches]" in text and "tuple" in text, text
    assert got.matrices[0].shape[0] == 6  # read as one dataset, as PAIR_RULE says


def test_tuple_of_two_dicts_is_one_dataset_without_warning():
    import warnings

    params, batch = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.jax.export_gradients(_loss, [(params, 0.1)], (batch, batch), progress=False)


def test_a_dict_with_keys_that_are_not_strings_names_them():
    """fr353: {0: x, 1: y} was named as '(keys , ...)'."""
    params, batch = _setup()
    text = _message({0: batch["image"], 1: batch["label"]})
    assert "(keys 0, 1)" in text, text
