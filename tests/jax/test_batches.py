"""BatchPlan: fixed-size padded batches from arrays or iterables, and bad data."""

from __future__ import annotations

import re
from collections import UserDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracin
from tracin.jax import export_gradients
from tracin.jax.batches import BatchPlan


def test_arrays_are_cut_and_the_last_batch_padded_with_its_last_row():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    plan = BatchPlan((x, y), batch_size=4)
    batches = list(plan)
    assert plan.n_rows == 10 and plan.size == 4 and not plan.one_shot
    assert [(b.start, b.count) for b in batches] == [(0, 4), (4, 4), (8, 2)]
    assert all(b.inputs.shape == (4, 2) and b.targets.shape == (4,) for b in batches)
    np.testing.assert_array_equal(batches[2].targets, [8, 9, 9, 9])
    np.testing.assert_array_equal(batches[2].inputs, x[[8, 9, 9, 9]])


def test_a_short_array_set_runs_as_one_batch_of_its_row_count():
    """Default 64 and batch_size=64 capped at n = 10 (memory of 10 rows, no padding): the batch shape
    depends on the data and batch_size alone, never on what ran before (tests/jax/test_export.py checks
    the bytes)."""
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    for batch_size in (None, 64, 10):
        small = BatchPlan((x, y), batch_size)
        assert small.size == 10 and small.batch_size == (batch_size or 64)
        batches = list(small)
        assert [(b.start, b.count, b.inputs.shape, b.targets.shape) for b in batches] == [(0, 10, (10, 2), (10,))]
        np.testing.assert_array_equal(batches[0].inputs, x)
    large = BatchPlan((x, y), 4)  # n above the batch size: cut into batches of 4
    assert large.size == 4 and [b.inputs.shape[0] for b in large] == [4, 4, 4]


def test_empty_batches_of_an_iterable_are_skipped_and_do_not_set_the_batch_size():
    """A batch of 0 rows (first or later) yields nothing and does not fix the size: the first non-empty one does."""
    x, y = np.arange(10.0)[:, None], np.arange(10)
    plan = BatchPlan([(x[:0], y[:0]), (x[:4], y[:4]), (x[4:4], y[4:4]), (x[4:10], y[4:10])], batch_size=None)
    batches = list(plan)
    assert plan.n_rows == 10 and plan.size == 4
    assert [(b.start, b.count) for b in batches] == [(0, 4), (4, 4), (8, 2)]
    np.testing.assert_array_equal(batches[2].targets, [8, 9, 9, 9])


def test_iterables_take_the_first_batch_size_and_cut_longer_batches():
    x, y = np.arange(10.0)[:, None], np.arange(10)
    plan = BatchPlan([(x[:3], y[:3]), (x[3:10], y[3:10])], batch_size=None)
    assert plan.n_rows == 10
    batches = list(plan)
    assert [(b.start, b.count) for b in batches] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    np.testing.assert_array_equal(batches[3].targets, [9, 9, 9])
    generator = BatchPlan(((x[i : i + 5], y[i : i + 5]) for i in (0, 5)), batch_size=None)
    assert generator.one_shot and generator.n_rows is None


def test_a_loader_with_only_len_and_getitem_is_iterated_as_python_does():
    """The old sequence protocol (no __iter__; iter() calls __getitem__(0, 1, ...) up to an IndexError)."""
    x, y = np.arange(10.0)[:, None], np.arange(10)

    class Loader:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            if i >= 2:
                raise IndexError(i)
            return x[5 * i : 5 * i + 5], y[5 * i : 5 * i + 5]

    plan = BatchPlan(Loader(), batch_size=None)
    assert not plan.one_shot
    batches = list(plan)
    assert [(b.start, b.count) for b in batches] == [(0, 5), (5, 5)]
    np.testing.assert_array_equal(np.concatenate([b.inputs for b in batches]), x)
    assert [(b.start, b.count) for b in plan] == [(0, 5), (5, 5)]  # re-iterable


@pytest.mark.parametrize(
    "data, batch_size, error, message",
    [
        ((np.zeros((4, 2)), np.zeros(3)), None, ValueError, "same number of rows"),
        ((np.zeros((0, 2)), np.zeros(0)), None, ValueError, "no rows"),
        (np.zeros((4, 2)), None, TypeError, "iterable of \\(inputs, targets\\) batches"),
        ("data", None, TypeError, "must be \\(inputs, targets\\) arrays"),
        ([np.zeros((4, 2))], None, TypeError, r"data\[0\]: each batch must be an \(inputs, targets\) pair"),
        ([(np.zeros((4, 2)), np.float32(1))], None, ValueError, "leading batch dimension"),
        ((np.zeros((4, 2)), np.zeros(4)), 0, ValueError, "batch_size must be a positive int"),
        ((np.zeros((4, 2)), np.zeros(4)), 2.5, TypeError, "batch_size must be a positive int"),
    ],
)
def test_bad_data(data, batch_size, error, message):
    with pytest.raises(error, match=message):
        list(BatchPlan(data, batch_size))


def _pytree_data_cases():
    """(name, data, loss): targets and inputs as pytrees, None targets, a list [x, y]; each loss is the
    weighted softmax cross-entropy of x @ w (or a target-free loss for None)."""
    r = np.random.default_rng(5)
    x = r.standard_normal((10, 4)).astype(np.float32)
    y, wt = r.integers(0, 3, 10), r.uniform(0.5, 2, 10).astype(np.float32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 10))  # raw uint32 keys, (10, 2)

    def ce(p, inputs, labels, weights):
        logits = inputs @ p["w"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0] * weights

    def masked(inputs):  # inputs (x, raw keys): a per-example dropout mask from each example's key
        mask = jax.vmap(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 0.5, (4,)))(inputs[1])
        return inputs[0] * mask

    return [
        ("targets dict", (x, {"label": y, "wt": wt}), lambda p, i, t: ce(p, i, t["label"], t["wt"])),
        ("targets tuple", (x, (y, wt)), lambda p, i, t: ce(p, i, t[0], t[1])),
        ("list [x, y]", [x, y], lambda p, i, t: ce(p, i, t, 1.0)),
        ("inputs tuple, targets array", ((x, keys), y), lambda p, i, t: ce(p, masked(i), t, 1.0)),
        ("targets None", (x, None), lambda p, i, t: jnp.sum((i @ p["w"]) ** 2, axis=1) * (t is None)),
        (
            "inputs and targets pairs, as a list of one batch",
            [((x, keys), (y, wt))],
            lambda p, i, t: ce(p, masked(i), *t),
        ),
    ]


@pytest.mark.parametrize("name, data, loss", _pytree_data_cases(), ids=[c[0] for c in _pytree_data_cases()])
def test_pytree_targets_none_targets_and_lists_are_one_dataset(name, data, loss, per_example_jax_grad):
    params = {"w": np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)}
    grads = export_gradients(loss, [(params, 1.0), ({"w": params["w"] * 2}, 0.5)], data, batch_size=4, progress=False)
    inputs, targets = data[0] if isinstance(data, list) and len(data) == 1 else data
    for c, scale in enumerate((1.0, 2.0)):
        ref = per_example_jax_grad(loss, {"w": params["w"] * scale}, inputs, targets)
        assert grads.matrices[c].shape == (10, 12) and np.abs(ref).max() > 0
        np.testing.assert_allclose(grads.matrices[c], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


class _Encoding(UserDict):
    """A Mapping JAX takes as a leaf, as transformers' BatchEncoding (what a tokenizer returns)."""


def test_inputs_in_a_mapping_jax_takes_as_a_leaf_are_a_dict(per_example_jax_grad):
    """(BatchEncoding, labels) was refused: 'each batch must be an (inputs, targets) pair, got BatchEncoding'."""
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    x = {"input_ids": rng.integers(0, 5, (6, 4)), "scale": rng.random((6, 1)).astype(np.float32)}
    y = rng.standard_normal((6, 3)).astype(np.float32)

    def loss(p, inputs, t):
        return (((p["w"][inputs["input_ids"]].sum(-2) * inputs["scale"]) - t) ** 2).sum(-1)

    ref = per_example_jax_grad(loss, params, x, y)
    assert np.abs(ref).max() > 0
    for data in [(_Encoding(x), y), [(_Encoding(x), y)], iter([(_Encoding(x), y)])]:
        grads = export_gradients(loss, [(params, 1.0)], data, batch_size=4, progress=False)
        np.testing.assert_allclose(grads.matrices[0], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_a_transformers_batch_encoding_is_taken_as_inputs():
    transformers = pytest.importorskip("transformers")
    x, y = np.arange(6.0).reshape(3, 2), np.arange(3)
    batches = list(BatchPlan((transformers.BatchEncoding({"input_ids": x}), y), batch_size=2))
    np.testing.assert_array_equal(batches[1].inputs["input_ids"], x[[2, 2]])


def test_two_pairs_are_two_batches_and_the_error_says_why():
    x, y = np.arange(8.0).reshape(4, 2), np.arange(4)
    plan = BatchPlan([(x, y), (x + 10, y)], batch_size=None)  # two batches of equal size: not one dataset
    assert plan.n_rows == 8 and [b.start for b in plan] == [0, 4]
    both = BatchPlan(((x, y), (x, y)), None)  # inputs and targets both pairs: read as two batches (PAIR_RULE)
    assert both.n_rows == 8 and [b.count for b in both] == [4, 4]
    assert BatchPlan([((x, y), (x, y))], None).n_rows == 4  # as a list of one batch: one (inputs, targets)
    with pytest.raises(ValueError, match=r"^data targets\[0\]: .*got an int in the Python list targets, .*np\.asarray"):
        list(BatchPlan((x, [0, 1, 2, 3]), None))  # a Python list: scalar leaves, not an array (nor two batches)
    with pytest.raises(TypeError, match=r"data\[0\]: each batch .*got ndarray.*unless both items are themselves"):
        list(BatchPlan([x, x, x], None))  # not two items: batches, none of them a pair


@pytest.mark.parametrize("projection", [None, tracin.Projection(8, seed=0, per_layer=True, kronecker=True)])
def test_a_loss_failing_on_two_pairs_read_as_two_batches_says_how_they_were_read(per_example_jax_grad, projection):
    """((x, mask), (y, w)) is two batches by PAIR_RULE: the loss fails on (x, mask) as one batch's
    (inputs, targets), and the error says so and how to pass it as one dataset; that form works."""
    r = np.random.default_rng(9)
    x, mask = r.standard_normal((6, 4)).astype(np.float32), np.ones((6, 4), np.float32)
    y, w = r.integers(0, 3, 6), r.uniform(0.5, 2, 6).astype(np.float32)
    params = {"w": r.standard_normal((4, 3)).astype(np.float32)}

    def loss(p, inputs, targets):
        (xs, ms), (ys, ws) = inputs, targets
        logits = (xs * ms) @ p["w"]
        return ws * -jnp.take_along_axis(jax.nn.log_softmax(logits), ys[:, None], axis=1)[:, 0]

    data = ((x, mask), (y, w))
    with pytest.raises(
        ValueError,
        match=r"failed on a batch of 6: .*data was read as two batches, \(inputs, "
        r"targets\) = data\[0\] then data\[1\].*as a list of one batch, \[\(\(x, k\), \(y, w\)\)\]",
    ):
        export_gradients(loss, [(params, 1.0)], data, projection=projection, progress=False)
    grads = export_gradients(loss, [(params, 1.0)], [data], progress=False)
    ref = per_example_jax_grad(loss, params, (x, mask), (y, w))
    np.testing.assert_allclose(np.asarray(grads.matrices[0]), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError, match=r"failed on a batch of 6: [^;]*$"):  # no note for an unambiguous pair
        export_gradients(loss, [(params, 1.0)], (x, y), progress=False)


def test_two_batches_of_different_sizes_get_no_note_about_one_dataset():
    """A list of two batches whose row counts differ cannot be one (inputs, targets) dataset: a loss failing
    on the second (float labels) says so without the 'pass it as a list of one batch' note (review126 F4)."""
    r = np.random.default_rng(4)
    params = {"w": r.standard_normal((4, 3)).astype(np.float32)}

    def loss(p, inputs, targets):
        logits = inputs["x"] @ p["w"]
        return targets["w"] * -jnp.take_along_axis(jax.nn.log_softmax(logits), targets["y"][:, None], axis=1)[:, 0]

    def batch(n, labels_dtype):
        x, w = r.standard_normal((n, 4)).astype(np.float32), np.ones(n, np.float32)
        return {"x": x}, {"y": r.integers(0, 3, n).astype(labels_dtype), "w": w}

    with pytest.raises(ValueError, match=r"failed on a batch of 10 .*must be of integer type") as caught:
        export_gradients(loss, [(params, 1.0)], [batch(10, np.int32), batch(13, np.float32)], progress=False)
    assert "read as two batches" not in str(caught.value) and "list of one batch" not in str(caught.value)


def test_typed_prng_keys_in_inputs_and_params(per_example_jax_grad, tmp_path):
    """New-style keys (jax.random.key, a key dtype NumPy cannot hold) in the inputs and in the params:
    fingerprinted by their key_data; rows vs the per-example jax.grad loop, with and without a store."""
    r = np.random.default_rng(8)
    x, y = r.standard_normal((6, 4)).astype(np.float32), r.integers(0, 3, 6)
    keys = jax.random.split(jax.random.key(0), 6)
    params = {"w": r.standard_normal((4, 3)).astype(np.float32), "key": jax.random.key(3)}

    def loss(p, inputs, targets):
        mask = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (4,)))(inputs[1])
        logits = (inputs[0] * mask) @ p["w"] * jax.random.uniform(p["key"], minval=0.5, maxval=2)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    ckpts = [(params, 1.0), ({**params, "key": jax.random.key(4)}, 1.0)]
    ref = [per_example_jax_grad(lambda w, i, t, p=p: loss({**p, "w": w}, i, t), p["w"], (x, keys), y) for p, _ in ckpts]
    grads = export_gradients(loss, ckpts, ((x, keys), y), batch_size=4, progress=False)
    assert [p["name"] for p in grads.metadata["params"]] == ["w"]
    assert len(set(grads.metadata["fingerprints"]["checkpoints"])) == 2  # the key leaves differ
    for ours, theirs in zip(grads.matrices, ref, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    stored = export_gradients(loss, ckpts, ((x, keys), y), batch_size=4, store=tmp_path / "g", progress=False)
    assert stored.metadata["fingerprints"] == grads.metadata["fingerprints"]
    np.testing.assert_array_equal(tracin.scores(grads, stored), tracin.scores(grads, grads))


@pytest.mark.parametrize(
    "data, where, got, setting",
    [  # a setting in the inputs dict of a pair (not read as two batches), as a list of one batch, in the targets
        (lambda x, y: ({"x": x, "temperature": 2.0}, y), "data inputs['temperature']", "a float", "temperature"),
        (lambda x, y: ({"x": x, "temperature": "2.0"}, y), "data inputs['temperature']", "a str", "temperature"),
        (lambda x, y: [({"x": x, "temperature": 2.0}, y)], "data[0] inputs['temperature']", "a float", "temperature"),
        (lambda x, y: ((x, np.float32(1)), y), r"data inputs\[1\]", "a NumPy float32 scalar; a setting", "setting"),
        (lambda x, y: ((x, 0.5), y), r"data inputs\[1\]", "a float; a setting shared", "setting"),
        (lambda x, y: ((x, np.asarray(0.5)), y), r"data inputs\[1\]", r"a 0-d array \(float64\); a setting", "setting"),
        (lambda x, y: (x, {"label": y, "weight": np.asarray(1.0)}), "data targets['weight']", "a 0-d array", "weight"),
    ],
)
def test_a_leaf_without_rows_is_named_with_its_path_and_functools_partial_suggested(data, where, got, setting):
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int32)
    message = re.escape(where) if "\\" not in where else where
    with pytest.raises(ValueError, match=rf"^{message}: expected an array with a leading batch dimension .*got {got}"):
        BatchPlan(data(x, y), None)
    with pytest.raises(ValueError, match=rf"functools\.partial\(loss_fn, {setting}=\.\.\.\)"):
        export_gradients(lambda p, i, t: jnp.zeros(8), [({"w": np.zeros(2, np.float32)}, 1.0)], data(x, y))
    with pytest.raises(ValueError) as caught:
        BatchPlan(data(x, y), None)
    assert "Python list" not in str(caught.value) and "of it" not in str(caught.value)  # review102 F1: not circular


@pytest.mark.parametrize(
    "data, path, column",
    [
        (lambda x, y: ((x, [0.5] * 8), y), "data inputs[1][0]", "inputs[1]"),
        (lambda x, y: ((x, [[0.5, 1.0]] * 8), y), "data inputs[1][0][0]", "inputs[1]"),
        (lambda x, y: (x, [int(v) for v in y]), "data targets[0]", "targets"),
        (lambda x, y: [(x, [int(v) for v in y])], "data[0] targets[0]", "targets"),
    ],
)
def test_numbers_in_a_python_list_of_values_point_at_an_array_of_the_list(data, path, column):
    """review102 F1: numbers in a Python list that is a column of values are told to make an array of the list,
    naming it, not where a setting goes (as tracin.torch says)."""
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int32)
    with pytest.raises(ValueError) as caught:
        BatchPlan(data(x, y), None)
    text = str(caught.value)
    assert text.startswith(f"{path}: expected an array with a leading batch dimension"), text
    assert text.endswith(
        f"in the Python list {column}, which JAX reads as a pytree of scalars, not an array: pass np.asarray(...) of "
        "the list"
    ), text


@pytest.mark.parametrize("wrap", [lambda e: e, _Encoding], ids=["dict", "mapping leaf"])
def test_numbers_in_the_python_lists_of_a_dict_point_at_return_tensors_np(wrap):
    """review102 F1: a tokenizer's output without return_tensors ({'input_ids': [[...], ...]}) was told to pass
    np.asarray(...) of the leaf inputs['input_ids'][0][0] (an int); it names the key and return_tensors="np", as
    tracin.torch names return_tensors="pt"."""
    data = (wrap({"input_ids": [[1, 2, 3], [4, 5, 6]]}), np.zeros(2, np.int32))
    with pytest.raises(ValueError) as caught:
        BatchPlan(data, None)
    text = str(caught.value)
    assert text.startswith("data inputs['input_ids'][0][0]: expected an array with a leading batch dimension"), text
    assert "got an int in the Python list of 'input_ids'" in text and 'return_tensors="np"' in text, text
    assert "np.asarray(...) of the list" in text and "setting" not in text, text


def test_a_short_leaf_is_named_with_its_row_count():
    x, y, w = np.zeros((8, 4), np.float32), np.zeros(8, np.int32), np.ones(5, np.float32)
    with pytest.raises(ValueError, match=r"sizes \[5, 8\] \(rows of each leaf, 5: targets\['weight'\]; 8: inputs, "):
        BatchPlan((x, {"label": y, "weight": w}), None)
    with pytest.raises(ValueError, match=r"^data\[1\]: .*got sizes \[5, 8\] .*5: targets\['weight'\]"):
        BatchPlan([(x, {"label": y, "weight": np.ones(8)}), (x, {"label": y, "weight": w})], None)


def test_a_short_batch_before_a_longer_one_keeps_every_later_row_in_place():
    """r304: batches of 4, 2 and 4 rows (a short batch not last): each batch starts where the rows before it
    end (the export writes its rows there), not one batch size on; rows against float64 NumPy."""
    x, y = np.arange(20.0).reshape(10, 2) / 10, np.linspace(-1.0, 1.0, 10)
    data = [(x[:4], y[:4]), (x[4:6], y[4:6]), (x[6:], y[6:])]
    plan = BatchPlan(data, None)
    assert plan.n_rows == 10 and [(b.start, b.count) for b in plan] == [(0, 4), (4, 2), (6, 4)]
    w = np.array([0.5, -1.0])
    g = export_gradients(lambda p, i, t: (i @ p["w"] - t) ** 2, [({"w": w}, 1.0)], data, progress=False)
    np.testing.assert_allclose(
        np.asarray(g.matrices[0], np.float64), 2 * (x @ w - y)[:, None] * x, rtol=1e-5, atol=1e-6
    )
