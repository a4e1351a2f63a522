"""Static data (non-array leaves, Equinox static fields) of the later checkpoints must be the first checkpoint's
of the same kind, not only of equal value: a layout is a compiled function's cache key, and JAX computes with a
Python float and a NumPy float64 scalar (weak vs strong type: float16 * 2.0 is float16, float16 *
np.float64(2.0) is float32), or with a NumPy and a JAX array, differently. Equal values of another kind are
refused, named, and their layouts are unequal."""

from __future__ import annotations

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jnp = jax.numpy

from tracin.jax import export_gradients  # noqa: E402
from tracin.jax.params import layout_of  # noqa: E402


class _Scaled(eqx.Module):
    w: jax.Array
    scale: object  # a float field of an Equinox module: static data, as eqx.filter_grad leaves it


class _Offset(eqx.Module):
    w: jax.Array
    offset: object = eqx.field(static=True)


def _scaled_loss(p, inputs, targets):
    return jnp.sum((inputs @ p.w * p.scale - targets) ** 2, axis=1)


def _offset_loss(p, inputs, targets):
    return jnp.sum((inputs @ p.w + p.offset - targets) ** 2, axis=1)


def _unused_offset_loss(p, inputs, targets):  # a NaN setting must not make the rows NaN
    return jnp.sum((inputs @ p.w - targets) ** 2, axis=1)


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)


_W = np.full((3, 2), 0.5, np.float32)


@pytest.mark.parametrize(
    "first, later, shown",
    [(2.0, np.float64(2.0), "np.float64(2.0) here, 2.0"), (3, np.int64(3), "np.int64(3) here, 3")],
    ids=["float", "int"],
)
def test_a_python_scalar_and_a_numpy_scalar_of_one_value_are_other_static_data(first, later, shown):
    """_same_value compares NumPy scalars only with ones of their own type (mutant r362 P4 took np.float64(2.0)
    for 2.0, sharing one compiled function between them)."""
    a, b = _Scaled(_W, first), _Scaled(_W + 1, later)
    assert layout_of(a, None) != layout_of(b, None)
    x, y = _data()
    with pytest.raises(ValueError) as raised:
        export_gradients(_scaled_loss, [(a, 1.0), (b, 1.0)], (x, y), progress=False)
    text = str(raised.value)
    assert text.startswith("checkpoints[1]: non-array leaf 'scale' differs") and shown in text, text


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_a_numpy_and_a_jax_array_of_one_value_in_a_static_field_are_other_static_data_and_say_so():
    """Arrays in static fields are equal only when both are NumPy or both JAX (mutant r362 P3 dropped the kind);
    the refusal says which is which (it said 'other values of the same name or text' for these two of one text)."""
    a = _Offset(_W, np.array([1.0, 2.0], np.float32))
    b = _Offset(_W + 1, jnp.array([1.0, 2.0], jnp.float32))
    assert layout_of(a, None) != layout_of(b, None)
    x, y = _data()
    with pytest.raises(ValueError) as raised:
        export_gradients(_offset_loss, [(a, 1.0), (b, 1.0)], (x, y), progress=False)
    text = str(raised.value)
    assert re.search(
        r"checkpoints\[1\]: .*has other static data: offset=.*a JAX array here, a NumPy array in the first", text
    ), text


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_static_arrays_holding_nan_at_one_index_are_named_by_their_first_differing_value():
    """NaN equals NaN in static arrays (_same_value), so the first differing index named is the first where the
    values differ, not the NaN before it (mutant r362 P10 named index (0,), NaN against NaN)."""
    a = _Offset(_W, np.array([np.nan, 1.0, 2.0], np.float32))
    b = _Offset(_W + 1, np.array([np.nan, 1.0, 3.0], np.float32))
    x, y = _data()
    with pytest.raises(ValueError) as raised:
        export_gradients(_unused_offset_loss, [(a, 1.0), (b, 1.0)], (x, y), progress=False)
    assert "(first differing at index (2,): 3.0 here, 2.0 in the first checkpoint)" in str(raised.value), raised.value


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_a_numpy_and_a_jax_array_of_other_values_are_told_both_differences_at_once():
    """Other values and other kinds: the refusal named the differing index only, the kind told only once the
    values were fixed, a second round trip (review370 F7); both are told at once."""
    a = _Offset(_W, np.array([1.0, 2.0], np.float32))
    b = _Offset(_W + 1, jnp.array([1.0, 3.0], jnp.float32))
    x, y = _data()
    with pytest.raises(ValueError) as raised:
        export_gradients(_unused_offset_loss, [(a, 1.0), (b, 1.0)], (x, y), progress=False)
    assert (
        "(first differing at index (1,): 3.0 here, 2.0 in the first checkpoint; a JAX array here, a NumPy array in "
        "the first checkpoint: give every checkpoint the same kind)"
    ) in str(raised.value), raised.value
