"""tracin.jax.export_gradients: arguments refused up front with the message naming them, and a store resumed
with the same inputs but other targets (labels) refused rather than mixing rows of two label sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tracin.jax import export_gradients


def test_a_layer_input_that_is_not_callable_is_refused_naming_its_type(mlp, data):
    calls = []

    def loss(p, x, y):
        calls.append(1)
        return mlp.loss_fn(p, x, y)

    with pytest.raises(TypeError, match=r"^layer_input must be callable, got int$"):
        export_gradients(
            loss, [(mlp.params[0], 1.0)], data, mode="last_layer", layers=["l2"], layer_input=3, progress=False
        )
    assert calls == []  # refused before the loss is traced


def test_a_store_resumed_with_other_targets_alone_is_refused(mlp, data, tmp_path):
    """The inputs unchanged, one label changed: the data fingerprint covers the targets, so the resume is refused
    (rows of the new labels would otherwise be appended to, or taken for, those of the old ones)."""
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    path = tmp_path / "g"
    export_gradients(mlp.loss_fn, ckpts, (x, y), store=path, progress=False)
    relabelled = y.copy()
    relabelled[5] = (relabelled[5] + 1) % 3
    with pytest.raises(ValueError, match=r"holds gradients exported from other inputs: the data \(inputs or targets\)"):
        export_gradients(mlp.loss_fn, ckpts, (x, relabelled), store=path, progress=False)
    assert export_gradients(mlp.loss_fn, ckpts, (x, y), store=path, progress=False).complete


def test_one_train_state_keeps_its_int_step_for_a_loss_branching_on_it_in_python(mlp, data):
    """Docstring: over several checkpoints a TrainState's Python-int step is read as an array; one checkpoint keeps
    the int, so a loss may branch on it in Python: rows twice the float64 reference gradients (step 3 > 1)."""
    optax = pytest.importorskip("optax")
    train_state = pytest.importorskip("flax.training.train_state")
    x, y = data
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.sgd(1e-2)).replace(step=3)

    def loss(s, a, b):
        return mlp.loss_fn(s.params, a, b) * (2.0 if s.step > 1 else 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the TrainState's opt_state left out
        got = export_gradients(loss, [(state, 0.5)], (x[:20], y[:20]), progress=False)
    ref = mlp.reference_rows(
        mlp.reference_grads(mlp.weights[0], x[:20], y[:20]), ["b1", "w1", "b2", "w2"], {"w1", "w2"}
    )
    np.testing.assert_allclose(np.asarray(got.matrices[0], np.float64), 2.0 * ref, rtol=1e-5, atol=1e-6)
    assert got.weights.tolist() == [0.5]


def test_a_loss_failing_on_a_later_checkpoints_params_names_that_checkpoint_and_the_rows(mlp, data):
    """Checkpoint 1 saved with a float16 kernel (the same structure and shapes): jax.jit traces the loss again
    there, and a loss that cannot run on it fails; the error names checkpoint 1 and the batch's rows."""
    x, y = data
    half = {**mlp.params[1], "l1": {**mlp.params[1]["l1"], "kernel": mlp.params[1]["l1"]["kernel"].astype(np.float16)}}

    def loss(p, a, b):
        if p["l1"]["kernel"].dtype != np.float32:
            raise TypeError("this loss takes float32 weights only")
        return mlp.loss_fn(p, a, b)

    with pytest.raises(ValueError) as info:
        export_gradients(loss, [(mlp.params[0], 1.0), (half, 1.0)], (x, y), batch_size=16, progress=False)
    assert str(info.value) == (
        "loss_fn(params, inputs, targets) failed on a batch of 16 (rows 0 to 15 of the data, at checkpoint 1): "
        "TypeError: this loss takes float32 weights only"
    )


def test_a_bias_free_last_layer_of_data_yielding_no_batches_is_refused_as_no_rows(mlp):
    """A bias-free head's (p, q) are read off the first batch, read ahead: a one-shot iterator or an empty list
    with no batch at all is 'data has no rows', as for any other export."""
    params = [{"l1": p["l1"], "l2": {"kernel": p["l2"]["kernel"]}} for p in mlp.params]

    def loss(p, x, y):
        return mlp.cross_entropy(mlp.hidden(p, x) @ p["l2"]["kernel"], y)

    kw = dict(mode="last_layer", layers=["l2"], layer_input=mlp.hidden, progress=False)
    for data in (iter([]), []):
        with pytest.raises(ValueError, match=r"^data has no rows$"):
            export_gradients(loss, [(params[0], 1.0)], data, **kw)
