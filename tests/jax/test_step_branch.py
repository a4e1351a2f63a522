"""A loss branching in Python on a Flax TrainState's int step, over several checkpoints (review294 F5): tracin
reads that step as an array there, and an error it causes says so."""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export as jax_export
from tracin.jax import export_gradients

optax = pytest.importorskip("optax")
train_state = pytest.importorskip("flax.training.train_state")
NAMES = ["b1", "w1", "b2", "w2"]  # PARAM_ORDER of the mlp's params


def _states(mlp, steps):
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.sgd(1e-2))
    return [(state.replace(params=p, step=s), 0.5) for p, s in zip(mlp.params[:2], steps, strict=True)]


def _export(loss, checkpoints, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the TrainState's opt_state left out
        return export_gradients(loss, checkpoints, data, progress=False)


def test_a_python_branch_on_the_int_step_of_several_train_states_names_the_array_step(mlp, data):
    def loss(s, a, b):
        return mlp.loss_fn(s.params, a, b) * (2.0 if s.step > 1 else 1.0)

    with pytest.raises(ValueError, match=r"TracerBoolConversionError") as info:
        _export(loss, _states(mlp, [2, 3]), data)
    message = str(info.value)
    assert "Python-int step as an array over several checkpoints" in message
    assert "jnp.where or jax.lax.cond" in message
    assert isinstance(info.value.__cause__, ValueError)  # check_per_example's, from JAX's error


def test_the_branch_with_jnp_where_exports_the_scaled_rows(mlp, data):
    x, y = data

    def loss(s, a, b):
        return mlp.loss_fn(s.params, a, b) * jnp.where(s.step > 2, 2.0, 1.0)

    g = _export(loss, _states(mlp, [2, 3]), data)
    for matrix, weights, scale in zip(g.matrices, mlp.weights[:2], (1.0, 2.0), strict=True):
        ref = mlp.reference_rows(mlp.reference_grads(weights, x, y), NAMES, {"w1", "w2"})
        np.testing.assert_allclose(np.asarray(matrix, np.float64), scale * ref, rtol=1e-4, atol=1e-6)


def test_no_note_for_steps_that_were_arrays_or_errors_of_other_kinds(mlp, data):
    def branching(s, a, b):
        return mlp.loss_fn(s.params, a, b) * (2.0 if s.step > 1 else 1.0)

    def missing(s, a, b):
        return mlp.loss_fn(s.params["nope"], a, b)

    arrays = _states(mlp, [jnp.asarray(2), jnp.asarray(3)])  # a jitted step's: tracin changed nothing
    with pytest.raises(ValueError, match="TracerBoolConversionError") as info:
        _export(branching, arrays, data)
    assert "jnp.where" not in str(info.value)
    with pytest.raises(ValueError, match="KeyError") as info:
        _export(missing, _states(mlp, [2, 3]), data)
    assert "jnp.where" not in str(info.value)


def _concretization() -> jax.errors.ConcretizationTypeError:
    try:
        jax.jit(lambda v: 1.0 if v > 0 else 0.0)(1.0)
    except jax.errors.ConcretizationTypeError as e:
        return e
    raise AssertionError("no ConcretizationTypeError")


def test_the_note_keeps_the_error_type_where_it_is_built_from_a_message():
    changed = types.SimpleNamespace(step_read_as_array=True)
    cause = _concretization()
    with pytest.raises(TypeError, match="jnp.where") as info:
        with jax_export._noting_array_step(changed):
            raise TypeError("a loss failed") from cause
    assert str(info.value).startswith("a loss failed\n(") and info.value.__cause__.__cause__ is cause
    with pytest.raises(ValueError, match="jnp.where") as info:  # its type takes a tracer, not a message
        with jax_export._noting_array_step(changed):
            raise cause
    assert type(info.value) is ValueError and info.value.__cause__ is cause
    with pytest.raises(TypeError, match="^a loss failed$"):  # no step read as an array: as raised
        with jax_export._noting_array_step(types.SimpleNamespace(step_read_as_array=False)):
            raise TypeError("a loss failed") from cause
