"""tracin.jax.export_gradients' glue around the driver: what its store records to refuse a resume that
would mix two setups, and which rows of which checkpoint land where."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracin
from tracin.jax import export_gradients
from tracin.jax.batches import BatchPlan


def test_a_last_layer_store_resumed_with_another_layer_input_is_refused(mlp, data, tmp_path):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    kw = dict(mode="last_layer", layers=["l2"], progress=False, store=tmp_path / "s")
    stored = export_gradients(mlp.loss_fn, ckpts, (x, y), layer_input=mlp.hidden, **kw)
    assert "hidden" in stored.metadata["fingerprints"]["layer_input"]

    def other_hidden(params, inputs):  # the same values from another function
        return mlp.hidden(params, inputs)

    with pytest.raises(ValueError, match="layer_input differs"):
        export_gradients(mlp.loss_fn, ckpts, (x, y), layer_input=other_hidden, **kw)


def test_the_data_fingerprint_digests_the_real_rows_of_a_padded_batch_alone(mlp, data):
    """70 rows at batch_size 32: the last batch of 6 rows runs padded to 32; its digest is of the 6 rows (the
    padding repeats row 69: digesting it would make the data fingerprint depend on the padding)."""
    from tracin._export.fingerprint import _hasher, digest_arrays

    x, y = data
    got = export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], (x, y), batch_size=32, progress=False)
    whole = _hasher()
    for start in (0, 32, 64):
        inputs, targets = x[start : start + 32], y[start : start + 32]
        whole.update(digest_arrays([inputs]).encode() + digest_arrays([targets]).encode())
    assert got.metadata["fingerprints"]["data"] == whole.hexdigest()


def test_an_error_raised_while_handling_the_step_branchs_error_gets_the_array_step_note(mlp, data):
    """The loss turns JAX's TracerBoolConversionError into its own error inside `except` (no `from`): JAX's
    error is that error's __context__, not its __cause__; the note is still added."""
    optax = pytest.importorskip("optax")
    train_state = pytest.importorskip("flax.training.train_state")
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.sgd(1e-2))
    checkpoints = [(state.replace(params=p, step=s), 0.5) for p, s in zip(mlp.params, (2, 3), strict=True)]

    def loss(s, a, b):
        try:
            late = bool(s.step > 1)
        except jax.errors.ConcretizationTypeError:
            raise RuntimeError("the schedule needs a concrete step")  # noqa: B904 - JAX's error its __context__
        return mlp.loss_fn(s.params, a, b) * (2.0 if late else 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the TrainState's opt_state left out
        with pytest.raises(ValueError, match="the schedule needs a concrete step") as info:
            export_gradients(loss, checkpoints, data, progress=False)
    assert "Python-int step as an array over several checkpoints" in str(info.value)


@pytest.mark.parametrize("as_list", [False, True])
def test_inputs_holding_no_arrays_are_refused_naming_them(as_list):
    """Targets alone are no dataset: loss_fn would get inputs without rows (None, {})."""
    y = np.arange(6)
    data, where = ([({}, y)], r"data\[0\]") if as_list else ((None, y), "data")
    with pytest.raises(ValueError, match=rf"^{where} inputs holds no arrays$"):
        BatchPlan(data, None)


def test_a_checkpoint_file_with_one_leaf_at_a_value_key_is_not_taken_for_a_saved_nnx_state(mlp, data, tmp_path):
    """Only a file whose every leaf is at a 'value' key looks like a saved NNX State: a plain dict holding a
    'value' entry among others exports without that warning."""
    from flax import serialization

    params = {**mlp.params[0], "temperature": {"value": np.full(1, 2.0, np.float32)}}
    path = tmp_path / "params.msgpack"
    path.write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))

    def loss(p, x, y):
        return mlp.loss_fn(p, x, y) / p["temperature"]["value"][0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = export_gradients(loss, [(str(path), 1.0)], data, progress=False)
    assert [p["name"] for p in got.metadata["params"]][-1] == "temperature/value"


def test_a_last_layers_metadata_lists_its_kernel_and_its_bias(mlp, data):
    """metadata["params"] of mode="last_layer": the kernel, then the bias the right factor's 1 stands for."""
    kw = dict(mode="last_layer", layers=["l2"], layer_input=mlp.hidden, progress=False)
    got = export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], data, **kw)
    assert got.metadata["params"] == [{"name": "l2/kernel", "shape": [8, 3]}, {"name": "l2/bias", "shape": [3]}]
    assert got.dims == ((3, 9),)


def test_an_empty_leaf_under_a_per_layer_projection_is_refused_by_its_name_before_any_work(mlp, data):
    params = {**mlp.params[0], "pad": np.zeros(0, np.float32)}
    calls = []

    def loss(p, x, y):
        calls.append(1)
        return mlp.loss_fn(p, x, y)

    projection = tracin.Projection(16, seed=0, per_layer=True)
    with pytest.raises(ValueError, match=r"parameter 'pad' has no elements"):
        export_gradients(loss, [(params, 1.0)], data, projection=projection, progress=False)
    assert calls == []


def test_a_weight_cast_and_transposed_before_its_matmul_is_a_per_token_site():
    """A bfloat16 matmul of a float32 weight (convert_element_type, then transpose): the views keep it the same
    matrix, so it is mapped (not projected flat with a warning), met on its columns by the activation."""
    from tracin.jax.jaxpr_taps import find_sites

    acts = jnp.ones((5, 3), jnp.bfloat16)
    closed = jax.make_jaxpr(lambda w: acts @ w.astype(jnp.bfloat16).T)(jnp.zeros((4, 3), jnp.float32))
    names = [e.primitive.name for e in closed.jaxpr.eqns]
    assert names == ["convert_element_type", "transpose", "dot_general"]
    sites, reasons = find_sites(closed, {0: "w"})
    assert reasons == {}
    site = sites["w"]
    assert (site.lookup, site.weight_operand, site.contract, site.split) == (False, 1, 1, 1)
    assert (site.act_axes, site.out_axes, site.out_shape) == ((1,), (1,), (5, 4))


def test_a_3d_weight_transposed_by_a_cycle_keeps_its_leaf_axes():
    """w (2, 3, 4) transposed to (4, 2, 3) and contracted on its first axis there: that is the leaf's last axis,
    so w is a (2 * 3) x 4 matrix met on its columns; the output's axes 1, 2 are the leaf's axes 0, 1."""
    from tracin.jax.jaxpr_taps import find_sites

    acts = jnp.ones((5, 4), jnp.float32)
    closed = jax.make_jaxpr(lambda w: jnp.tensordot(acts, jnp.transpose(w, (2, 0, 1)), axes=1))(jnp.zeros((2, 3, 4)))
    assert [e.primitive.name for e in closed.jaxpr.eqns] == ["transpose", "dot_general"]
    sites, reasons = find_sites(closed, {0: "w"})
    assert reasons == {}
    site = sites["w"]
    assert (site.weight_operand, site.contract, site.split, site.act_axes, site.out_axes) == (1, 1, 2, (1,), (1, 2))


def test_rows_whose_loss_turns_infinite_at_a_later_checkpoint_are_named_with_that_checkpoint(mlp, data):
    """gate 1 at checkpoint 0 (log 1 = 0), 0 at checkpoint 1 (log 0 = -inf) for the rows with x[:, 0] > 0.6: the
    one warning comes at the end of checkpoint 1's pass and names that checkpoint and those rows."""
    x, y = data
    x, y = x[:12], y[:12]
    assert np.flatnonzero(x[:, 0] > 0.6).tolist() == [3, 10, 11]

    def loss(p, a, b):
        return mlp.loss_fn(p["mlp"], a, b) + jnp.where(a[:, 0] > 0.6, jnp.log(p["gate"][0]), 0.0)

    checkpoints = [({"mlp": mlp.params[c], "gate": np.full(1, 1.0 - c, np.float32)}, 1.0) for c in (0, 1)]
    with pytest.warns(RuntimeWarning, match="NaN or infinite loss") as caught:
        export_gradients(loss, checkpoints, (x, y), batch_size=8, progress=False)
    ours = [str(w.message) for w in caught if "NaN or infinite loss" in str(w.message)]
    assert len(ours) == 1 and "loss for 3 rows (3, 10, 11) of the data at checkpoint 1: " in ours[0]


def test_a_weight_also_returned_by_a_nested_call_is_not_mapped_at_its_other_use():
    """w used once directly and once through jax.jit(lambda v: v.T) whose result is used outside the call: its
    gradient has two terms, so the direct dot_general alone must not be its site."""
    from tracin.jax.jaxpr_taps import find_sites

    acts, other = jnp.ones((5, 4), jnp.float32), jnp.ones((5, 3), jnp.float32)
    transposed = jax.jit(lambda v: v.T)
    closed = jax.make_jaxpr(lambda w: (acts @ w).sum() + (other @ transposed(w)).sum())(jnp.zeros((4, 3)))
    sites, reasons = find_sites(closed, {0: "w"})
    assert sites == {} and reasons == {"w": "returned by a nested call"}
