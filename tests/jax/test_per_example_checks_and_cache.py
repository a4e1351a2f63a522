"""tracin.jax.per_example's edges that the other tests leave open: the shared compilations' cache
(least recently used, bounded), the eager coupling check's tolerances (relative to the losses' scale,
1e-4 on a CPU, NaN losses equal, skipped on one row), the lookup hint's cut at 8 names, a (losses, aux)
list, float64 NaN gradients not taken for values beyond float32's range, and layer_input's 1e-4
tolerance. References: float64 NumPy or hand-worked values."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients, per_example


def _fresh_loss(mlp):
    return lambda params, inputs, targets: mlp.loss_fn(params, inputs, targets)


def _holds(loss) -> bool:
    return any(any(h.ref() is loss for h in held) for held, _ in per_example._shared)


def test_the_shared_cache_keeps_the_most_recently_used_compilations_and_at_most_its_size(mlp, data):
    """An export reusing a loss refreshes its entry (least recently used goes first), and the cache never
    holds more than _CACHE_SIZE entries however many live losses were exported."""
    x, y = data
    x, y = x[:4], y[:4]
    first = _fresh_loss(mlp)
    others = [_fresh_loss(mlp) for _ in range(per_example._CACHE_SIZE + 2)]  # kept alive: entries stay
    export_gradients(first, [(mlp.params[0], 1.0)], (x, y), progress=False)
    for loss in others[: per_example._CACHE_SIZE - 1]:
        export_gradients(loss, [(mlp.params[0], 1.0)], (x, y), progress=False)
    export_gradients(first, [(mlp.params[0], 1.0)], (x, y), progress=False)  # used again: the newest
    export_gradients(others[per_example._CACHE_SIZE - 1], [(mlp.params[0], 1.0)], (x, y), progress=False)
    assert _holds(first), "the loss used second to last was evicted (first in, first out instead of LRU)"
    assert not _holds(others[0]), "the least recently used entry was kept"
    for loss in others[per_example._CACHE_SIZE :]:
        export_gradients(loss, [(mlp.params[0], 1.0)], (x, y), progress=False)
    assert len(per_example._shared) <= per_example._CACHE_SIZE


def test_a_failed_lookup_lists_the_first_8_top_level_paths_and_their_count():
    params = {f"k{i}": np.ones(2, np.float32) for i in range(10)}
    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError) as caught:
        export_gradients(lambda p, a, b: (a * p["w"]).sum(1), [(params, 1.0)], (x, None), progress=False)
    shown = ", ".join(f"'k{i}'" for i in range(8))
    assert str(caught.value).endswith(
        f"; the params' top-level paths are {shown}, ... (10 in all) (a checkpoint of another model version than "
        "the loss reads?)"
    ), str(caught.value)


def test_a_losses_and_aux_list_is_refused_as_a_pair(mlp, data):
    x, y = data
    with pytest.raises(ValueError, match=r"got a list of 2 \(a \(losses, aux\) pair, as for has_aux=True\?\)"):
        export_gradients(
            lambda p, a, b: [mlp.loss_fn(p, a, b), a.sum()], [(mlp.params[0], 1.0)], (x, y), progress=False
        )


def test_data_of_one_row_skips_the_coupling_check(mlp, data):
    """One example cannot be coupled to others; the eager check would run the loss on 0 rows, where
    flattening by reshape(n, -1) fails."""
    x, y = data

    def flattened(params, inputs, targets):
        return mlp.loss_fn(params, inputs.reshape(inputs.shape[0], -1), targets)

    got = export_gradients(flattened, [(mlp.params[0], 1.0)], (x[:1], y[:1]), progress=False)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x[:1], y[:1]), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    np.testing.assert_allclose(np.asarray(got.matrices[0], np.float64), ref, rtol=1e-4, atol=1e-6)


def test_a_coupled_loss_of_small_scale_is_refused(mlp, data):
    """The tolerance is relative to the largest loss: losses of 1e-6 shifted by 2% of their batch mean
    are coupled as those of 1 are (an absolute 1e-4 would take them)."""
    x, y = data

    def coupled(params, inputs, targets):
        ce = mlp.loss_fn(params, inputs, targets)
        return 1e-6 * (ce - 0.02 * ce.mean())

    with pytest.raises(ValueError, match="loss_fn couples the examples of a batch"):
        export_gradients(coupled, [(mlp.params[0], 1.0)], (x, y), progress=False)


def test_a_loss_coupled_by_4e_4_is_refused_on_a_cpu(mlp, data):
    """uncoupled_rtol: on a CPU batches of 4 and 2 round alike, so 1e-4 (float32 losses) is allowed."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU tolerance")
    x, y = data

    def rescaled(params, inputs, targets):
        return mlp.loss_fn(params, inputs, targets) * (1 + 4e-4 * (inputs.shape[0] == 2))

    with pytest.raises(ValueError, match="loss_fn couples the examples of a batch"):
        export_gradients(rescaled, [(mlp.params[0], 1.0)], (x[:8], y[:8]), batch_size=4, progress=False)
    assert per_example.uncoupled_rtol(float(jnp.finfo(jnp.float32).eps), jnp.float32) == 1e-4


def test_a_nan_loss_in_the_first_rows_is_not_taken_for_coupling(mlp, data):
    """Label -100 in row 0 gives a NaN loss in both eager batches (4 and 2 rows): the check compares it as
    equal; the export warns naming row 0 and stores its gradient as jax.grad gives it (0 here)."""
    x, y = data
    x, y = x[:6], y[:6].copy()
    y[0] = -100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], (x, y), progress=False)
    assert any("NaN or infinite loss for row 0 of the data" in str(w.message) for w in caught)
    rows = np.asarray(got.matrices[0], np.float64)
    np.testing.assert_array_equal(rows[0], 0.0)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x[1:], y[1:]), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    np.testing.assert_allclose(rows[1:], ref, rtol=1e-4, atol=1e-6)


def test_a_nan_float64_gradient_is_not_taken_for_one_beyond_the_float32_range():
    """x64 params, a NaN input in row 1: its float64 gradient is NaN, not a finite value past float32's
    largest, so it is no NonFiniteRowError; the NaN loss is warned about and the other rows are exact:
    loss sum_j (x.w_j)^2 with w all ones gives d/db_j = 2s and d/dw_ij = 2s x_i, s = sum_i x_i."""
    x = np.random.default_rng(0).normal(size=(5, 3))
    x[1, 0] = np.nan

    def loss(p, inputs, targets):
        return ((inputs @ p["w"] + p["b"]) ** 2).sum(-1)

    params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    with jax.enable_x64(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = export_gradients(loss, [(params, 1.0)], (x, None), progress=False)
    assert any("NaN or infinite loss for row 1 of the data" in str(w.message) for w in caught)
    rows = np.asarray(got.matrices[0], np.float64)
    s = x.sum(1)
    expected = np.concatenate([np.repeat(2 * s[:, None], 2, 1), np.repeat(2 * s[:, None] * x, 2, 1)], axis=1)
    assert np.isnan(rows[1]).all()
    keep = [0, 2, 3, 4]
    np.testing.assert_allclose(rows[keep], expected[keep], rtol=1e-6)


def test_a_layer_input_off_by_3e_5_is_within_the_1e_4_tolerance(mlp, data):
    """check_layer_input: to 1e-4 relative for float32 (8 eps is 9.5e-7): a layer_input rounding 3e-5 off
    the tapped input is accepted, and the factors hold its values."""
    x, y = data
    x, y = x[:8], y[:8]
    got = export_gradients(
        mlp.loss_fn,
        [(mlp.params[0], 1.0)],
        (x, y),
        mode="last_layer",
        layers=["l2"],
        layer_input=lambda p, i: mlp.hidden(p, i) * (1 + 3e-5),
        progress=False,
    )
    ref = mlp.reference_grads(mlp.weights[0], x, y)
    np.testing.assert_allclose(np.asarray(got.left[0], np.float64), ref["b2"], rtol=1e-4, atol=1e-6)
    right = np.concatenate([ref["hidden"] * (1 + 3e-5), np.ones((8, 1))], axis=1)
    np.testing.assert_allclose(np.asarray(got.right[0], np.float64), right, rtol=1e-5, atol=1e-6)


def test_float8_losses_coupled_by_the_batch_size_are_refused_on_a_cpu(mlp, data):
    """uncoupled_rtol is capped at 8 eps of bfloat16 (0.0625) on a CPU too: float8 losses (8 eps = 1.0) shifted
    by 0.25 per row of their batch (0.5 apart between batches of 4 and 2, over 10% of them) are coupled."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU tolerance")
    x, y = data

    def shifted(params, inputs, targets):
        return (mlp.loss_fn(params, inputs, targets) + 0.25 * inputs.shape[0]).astype(jnp.float8_e4m3fn)

    with pytest.raises(ValueError, match="loss_fn couples the examples of a batch"):
        export_gradients(shifted, [(mlp.params[0], 1.0)], (x[:8], y[:8]), progress=False)
    assert per_example.uncoupled_rtol(float(jnp.finfo(jnp.float32).eps), jnp.float8_e4m3fn) == 0.0625


@pytest.mark.parametrize("backend, rounded", [("gpu", 2.0**-10), ("tpu", 2.0**-7)])
def test_compute_eps_rounds_only_float32_products_at_the_default_precision(monkeypatch, backend, rounded):
    """TF32 / bfloat16 rounding applies to float32 matrix products: a float64 product (x64) rounds nothing
    (the floor, float32's eps), nor does a float32 one under jax_default_matmul_precision 'highest'."""
    from tracin.jax.per_example import compute_eps

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    f32 = float(np.finfo(np.float32).eps)
    assert compute_eps(jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((4, 3)), jnp.ones((3, 2)))) == rounded
    with jax.enable_x64(True):
        wide = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((4, 3), jnp.float64), jnp.ones((3, 2), jnp.float64))
        assert compute_eps(wide) == f32
    with jax.default_matmul_precision("highest"):
        assert compute_eps(jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((4, 3)), jnp.ones((3, 2)))) == f32


def _kernel_dtype_case(mlp, data, case):
    x, y = data
    x, y = x[:16], y[:16]
    params = mlp.params[0]
    if case == "bf16_kernel":
        params = {**params, "l2": {**params["l2"], "kernel": params["l2"]["kernel"].astype(jnp.bfloat16)}}
    else:  # an unused bfloat16 leaf beside a float32 model
        params = {**params, "ema": jnp.ones(3, jnp.bfloat16)}

    def loss(p, inputs, targets):
        return mlp.loss_fn({k: p[k] for k in ("l1", "l2")}, inputs, targets)

    kw = dict(mode="last_layer", layers=["l2"], batch_size=8, progress=False)
    return loss, params, x, y, kw


def test_a_bfloat16_kernel_of_a_float32_model_is_checked_to_its_own_precision(mlp, data):
    """The kernel's gradient is stored in bfloat16, so it differs from dL/dy (x) layer_input by bfloat16's
    rounding (~2**-9): the tolerance counts the kernel's dtype. It was refused (the tolerance counted every
    leaf but the kernel). The factors are the float64 NumPy ones (the bias gradient and [h, 1])."""
    loss, params, x, y, kw = _kernel_dtype_case(mlp, data, "bf16_kernel")
    got = export_gradients(loss, [(params, 1.0)], (x, y), layer_input=mlp.hidden, **kw)
    w = {**mlp.weights[0], "w2": np.asarray(params["l2"]["kernel"], np.float64).T}
    ref = mlp.reference_grads(w, x, y)
    np.testing.assert_allclose(np.asarray(got.left[0], np.float64), ref["b2"], rtol=1e-4, atol=1e-5)
    right = np.concatenate([ref["hidden"], np.ones((16, 1))], axis=1)
    np.testing.assert_allclose(np.asarray(got.right[0], np.float64), right, rtol=1e-5, atol=1e-6)


def test_an_unused_bfloat16_leaf_does_not_loosen_the_layer_input_check(mlp, data):
    """A layer_input 1% off the kernel's input is refused beside an unused bfloat16 leaf as without it
    (float32 kernel and compute: 1e-4). It was accepted: the leaf's eps made the tolerance 0.0625."""
    loss, params, x, y, kw = _kernel_dtype_case(mlp, data, "unused_bf16")
    with pytest.raises(ValueError, match=r"does not return the input of l2/kernel .*\(allowed: 0\.0001\)"):
        export_gradients(loss, [(params, 1.0)], (x, y), layer_input=lambda p, i: mlp.hidden(p, i) * 1.01, **kw)


def test_a_bfloat16_bias_of_a_float32_model_is_checked_to_its_own_precision(mlp, data):
    """dL/db is stored in the bias's bfloat16, so it differs from the float32 dL/d(output) at the kernel's
    dot_general by bfloat16 rounding: the bias check allows 8 eps of its dtype, not the kernel's 1e-4."""
    x, y = data
    x, y = x[:16], y[:16]
    params = mlp.params[0]
    params = {**params, "l2": {**params["l2"], "bias": params["l2"]["bias"].astype(jnp.bfloat16)}}
    got = export_gradients(
        mlp.loss_fn,
        [(params, 1.0)],
        (x, y),
        mode="last_layer",
        layers=["l2"],
        layer_input=mlp.hidden,
        batch_size=8,
        progress=False,
    )
    w = {**mlp.weights[0], "b2": np.asarray(params["l2"]["bias"], np.float64)}
    ref = mlp.reference_grads(w, x, y)
    np.testing.assert_allclose(np.asarray(got.left[0], np.float64), ref["b2"], rtol=2**-7, atol=2**-9)


def test_last_layer_refuses_one_kernel_with_two_biases(mlp, data):
    """One kernel and two 1-D leaves is no dense layer (the second bias was dropped unseen)."""
    x, y = data
    with pytest.raises(
        ValueError, match=r"must name one dense layer.*got \['l1/bias \[8\]', 'l2/bias \[3\]', 'l2/kernel \[8, 3\]'\]"
    ):
        export_gradients(
            mlp.loss_fn,
            [(mlp.params[0], 1.0)],
            (x, y),
            mode="last_layer",
            layers=["l2", "l1/bias"],
            layer_input=mlp.hidden,
            progress=False,
        )


def test_a_bound_method_loss_keeps_its_compilation_while_its_object_lives(mlp, data):
    """model.loss is a new bound method on each access: its entry is held by the object and the function
    (WeakMethod), so it outlives the export and a later export of model.loss shares it; it goes with the
    object."""
    import gc

    x, y = data

    class Model:
        def loss(self, params, inputs, targets):
            return mlp.loss_fn(params, inputs, targets)

    model = Model()

    def entries(obj):
        return [k for k in per_example._shared if any(getattr(h.ref(), "__self__", None) is obj for h in k[0])]

    export_gradients(model.loss, [(mlp.params[0], 1.0)], (x[:4], y[:4]), progress=False)
    gc.collect()
    kept = entries(model)
    assert len(kept) == 1, "the bound method's compilation went when the export's bound method object did"
    export_gradients(model.loss, [(mlp.params[0], 1.0)], (x[:4], y[:4]), progress=False)
    assert entries(model) == kept
    del model, kept
    gc.collect()
    assert not any(h.ref() is None for k in per_example._shared for h in k[0])


def _train_state():
    import optax
    from flax.training.train_state import TrainState

    params = {"w": jnp.ones((3, 2), jnp.float32)}
    return TrainState.create(apply_fn=lambda p, x: x @ p["w"], params=params, tx=optax.sgd(0.1))


def test_a_loss_failing_on_a_train_state_checkpoint_is_told_to_read_state_params():
    """A Flax TrainState given as the checkpoint and a loss reading it as the params dict: the error says that
    loss_fn gets the checkpoint as given and to read state.params (r350)."""
    pytest.importorskip("flax")
    state = _train_state()
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)

    def loss(params, x, y):
        return (((x @ params["w"]) - y) ** 2).sum(-1)

    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed") as caught:
        export_gradients(loss, [(state, 0.1)], (x, y), progress=False)
    assert "here a TrainState" in str(caught.value) and "state.params" in str(caught.value), caught.value


def test_a_loss_failing_on_a_plain_dict_checkpoint_gets_no_container_hint():
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)

    def loss(params, x, y):
        return (((x @ params["v"]) - y) ** 2).sum(-1)

    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed") as caught:
        export_gradients(loss, [({"w": np.ones((3, 2), np.float32)}, 0.1)], (x, y), progress=False)
    assert "as given" not in str(caught.value), caught.value


def _sixteen_bit_squares(shift_per_row: float):
    """float16 squared residuals: row 2 (x 30000: 9e8 > 65504) is an infinite loss, its gradient finite; plus
    shift_per_row times the batch size (a loss coupled by the batch it is in, when not 0)."""
    params = {"w": jnp.ones(3, jnp.float32)}
    x = np.ones((4, 3), np.float32)
    x[2] *= 30000
    y = np.zeros(4, np.float32)

    def loss(p, x, y):
        return ((x @ p["w"]) - y + shift_per_row * x.shape[0]).astype(jnp.float16) ** 2

    return loss, params, x, y


def test_an_infinite_loss_in_the_first_rows_sets_no_tolerance_and_leaks_no_numpy_warning():
    """r360 F4: the coupling check's atol was rtol times the largest loss, inf for a float16 overflow: NumPy's
    "One of rtol or atol is not valid" RuntimeWarning leaked, and the check was off for that batch."""
    loss, params, x, y = _sixteen_bit_squares(0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(loss, [(params, 1.0)], (x, y), progress=False)
    said = [str(w.message) for w in caught]
    assert not [s for s in said if "rtol or atol" in s], said
    assert [s for s in said if s.startswith("loss_fn gives a NaN or infinite loss for row 2 of the data")], said


def test_a_coupled_loss_with_an_infinite_loss_in_the_first_rows_is_still_refused():
    loss, params, x, y = _sixteen_bit_squares(0.5)  # rows 0, 1: (3 + 1)**2 = 16 in a batch of 2, 25 in one of 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the infinite loss's own warning
        with pytest.raises(ValueError, match="loss_fn couples the examples of a batch"):
            export_gradients(loss, [(params, 1.0)], (x, y), progress=False)


def test_a_loss_indexing_a_train_state_gets_the_train_state_hint_alone():
    """r360 F5: a loss indexing the TrainState given as the checkpoint (params["params"]["w"]) was also asked
    whether the checkpoint was of another model version, listing the state's fields: only the TrainState hint
    is given."""
    pytest.importorskip("flax")
    state = _train_state()
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)

    def loss(params, x, y):
        return (((x @ params["params"]["w"]) - y) ** 2).sum(-1)

    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed") as caught:
        export_gradients(loss, [(state, 0.1)], (x, y), progress=False)
    message = str(caught.value)
    assert "here a TrainState" in message and "state.params" in message, message
    assert "another model version" not in message and "top-level paths" not in message, message
