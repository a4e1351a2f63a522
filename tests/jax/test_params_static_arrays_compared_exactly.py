"""Static arrays that differ between checkpoints are refused naming the first differing index and both values,
whatever their dtypes: object arrays (their elements have no .tolist(): the refusal was an AttributeError),
ml_dtypes' bfloat16 / float8 against float32 (NumPy kind 'V': no index was named), and 64-bit integers beyond
2**53, which float64, their common type with uint64 or a float, rounds to equal values (no index either); a
NumPy float64 / int64 array against JAX's float32 / int32 one of other values, told the index and the kind."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
ml_dtypes = pytest.importorskip("ml_dtypes")
jnp = jax.numpy

from tracin.jax import export_gradients  # noqa: E402

_W = np.full((3, 2), 0.5, np.float32)


class _Tagged(eqx.Module):
    w: jax.Array
    table: object = eqx.field(static=True)


def _loss(p, inputs, targets):  # the static array unused: only the layouts differ
    return jnp.sum((inputs @ p.w - targets) ** 2, axis=1)


def _refusal(first, later) -> str:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    with pytest.raises(ValueError) as raised:
        export_gradients(_loss, [(_Tagged(_W, first), 1.0), (_Tagged(_W + 1, later), 1.0)], (x, y), progress=False)
    return str(raised.value)


def _first_differing(first: list, later: list) -> int:
    """The first index where two lists of Python values differ, compared as Python compares them (exactly)."""
    return next(i for i, (a, b) in enumerate(zip(first, later, strict=True)) if a != b)


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
@pytest.mark.parametrize(
    "first, later",
    [
        ([{"lr": 1}, "relu", 3], [{"lr": 1}, "gelu", 3]),
        (["a", "b"], [{"a": 1}, "b"]),
    ],
    ids=["strings", "dict-vs-str"],
)
def test_object_arrays_that_differ_are_refused_naming_the_element(first, later):
    a, b = np.array(first, dtype=object), np.array(later, dtype=object)
    at = _first_differing(first, later)
    text = _refusal(a, b)
    assert f"(first differing at index ({at},): {later[at]!r} here, {first[at]!r} in the first checkpoint)" in text


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
@pytest.mark.parametrize("narrow", ["bfloat16", "float8_e4m3fn"])
def test_an_ml_dtypes_array_against_a_float32_one_names_the_first_differing_index(narrow):
    values = [1.0, 2.0, 3.0, 4.0]
    other = [1.0, 2.0, 3.25, 5.0]  # 3.25: not a bfloat16 or float8 value, so one of both kinds cannot hold it
    first = np.array(values, dtype=getattr(ml_dtypes, narrow))
    assert [float(v) for v in first] == values  # held exactly
    text = _refusal(first, np.array(other, np.float32))
    assert "(first differing at index (2,): 3.25 here, 3.0 in the first checkpoint)" in text, text


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
@pytest.mark.parametrize(
    "first, later",
    [
        (np.array([5, 2**63 - 1], np.uint64), np.array([5, 2**63 - 2], np.int64)),
        (np.array([7, 2**53 + 1], np.int64), np.array([7.0, 2.0**53], np.float64)),
        (np.array([0, 2**53 + 1], np.int64), np.array([0.0, 2.0**53], np.float32)),
    ],
    ids=["uint64-int64", "int64-float64", "int64-float32"],
)
def test_64_bit_integers_are_compared_exactly_against_another_dtype(first, later):
    py_first, py_later = first.tolist(), later.tolist()  # Python ints and floats: exact comparisons
    at = _first_differing(py_first, py_later)
    assert float(py_first[at]) == float(py_later[at])  # equal once both are float64: where it was missed
    text = _refusal(first, later)
    assert f"(first differing at index ({at},): {py_later[at]!r} here, {py_first[at]!r} in the first checkpoint)" in (
        text
    ), text


# Static arrays of one shape but two dtypes (a NumPy float64 or int64 array in one checkpoint, a JAX float32 or
# int32 one in the other, x64 off): the first differing index and the kind are told at once (it said only "give
# every checkpoint the same kind", the differing value found only after that fix, a second round trip).


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="with x64 on, JAX keeps float64 and int64")
@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_a_numpy_wide_and_a_jax_narrow_array_of_other_values_name_the_first_differing_index(dtype):
    first = np.arange(100).astype(dtype)
    later_host = first.copy()
    later_host[50] = 7
    later_host[80] = 9
    later = jnp.asarray(later_host)
    assert later.dtype != first.dtype  # narrowed by JAX
    (where,) = np.flatnonzero(first.astype(np.float64) != np.asarray(later).astype(np.float64))[:1]
    text = _refusal(first, later)
    here, there = np.asarray(later)[where].item(), first[where].item()
    assert (
        f"(first differing at index ({where},): {here!r} here, {there!r} in the first checkpoint; a JAX array here, "
        "a NumPy array in the first checkpoint: give every checkpoint the same kind)"
    ) in text, text


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="with x64 on, JAX keeps float64")
@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_equal_values_of_two_dtypes_and_kinds_are_told_the_kind_only():
    first = np.arange(100.0)
    text = _refusal(first, jnp.asarray(first))
    assert "first differing" not in text
    assert "(a JAX array here, a NumPy array in the first checkpoint: give every checkpoint the same kind)" in text
