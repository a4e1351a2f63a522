"""Static arrays of one shape but two dtypes in two checkpoints (a NumPy float64 or int64 array in one, a JAX
float32 or int32 one in the other, JAX's x64 off): a refusal of differing values names the first index where they
differ, and the kind, at once (it said only "give every checkpoint the same kind": the differing value was found
only after that fix, a second round trip)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jnp = jax.numpy

from tracin.jax import export_gradients  # noqa: E402

_W = np.full((3, 2), 0.5, np.float32)


class _Offset(eqx.Module):
    w: jax.Array
    offset: object = eqx.field(static=True)


def _loss(p, inputs, targets):  # the static array unused: only the layouts differ
    return jnp.sum((inputs @ p.w - targets) ** 2, axis=1)


def _refusal(first, later) -> str:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    with pytest.raises(ValueError) as raised:
        export_gradients(_loss, [(_Offset(_W, first), 1.0), (_Offset(_W + 1, later), 1.0)], (x, y), progress=False)
    return str(raised.value)


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
