"""Conversion of written blocks to the store dtype, checked against ml_dtypes / NumPy casts."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from tracin.store._convert import BeyondRangeError, float32_to_bfloat16_bits, to_store_dtype

SPECIAL = np.array(
    [
        0.0,
        -0.0,
        1.0,
        -2.5,
        np.inf,
        -np.inf,
        np.nan,
        3.4028235e38,
        -3.4028235e38,
        1e-40,
        -1e-45,
        1.00390625,
        1.01171875,
        1.0039063,
        65504.0,
        70000.0,
    ],
    dtype=np.float32,
)


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x


def test_bfloat16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    random = rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000)
    raw = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)  # any bits
    for x in (SPECIAL, random.astype(np.float32), raw):
        ours = float32_to_bfloat16_bits(x)
        with np.errstate(invalid="ignore"):
            ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
        nan = np.isnan(x)
        np.testing.assert_array_equal(ours[~nan], ref[~nan])
        assert np.isnan(ours[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()


@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("target", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_every_source_dtype_and_framework_converts_like_a_direct_cast(source, target, kind):
    rng = np.random.default_rng(1)
    special = SPECIAL[np.abs(SPECIAL) <= (60000 if target == "float16" else 3e38)]
    base = np.concatenate([rng.standard_normal((6, 5)).astype(np.float32) * 3, np.resize(special, 10).reshape(2, 5)])
    cast = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    x = base.astype(cast[source])
    if kind == "torch":
        t = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, source))
        block = t
    elif kind == "jax":
        block = jnp.asarray(x)
    else:
        block = x
    ours = to_store_dtype(block, target, "block")
    # Reference: go through float32 (exact from any of the three), then one rounding to the target.
    with np.errstate(over="ignore"):
        ref = _bits(x.astype(np.float32).astype(cast[target]))
    assert ours.dtype == ref.dtype and ours.flags.c_contiguous
    same = (ours == ref) | (np.isnan(x.astype(np.float32)))
    assert same.all(), (ours, ref)


@pytest.mark.parametrize(
    "source, target, value",
    [("float32", "float16", 70000.0), ("bfloat16", "float16", -1e10), ("float32", "bfloat16", 3.4e38)],
)
def test_finite_values_beyond_the_store_range_are_refused(source, target, value):
    """The error names the first row holding one (rows 3 and 5 do; counted from first_row) and the dtypes
    that would hold it: not bfloat16 when bfloat16 is the target."""
    cast = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    x = np.ones((6, 2), dtype=np.float32)
    x[3, 1] = x[5, 0] = value
    x[1, 0] = np.inf  # stays inf: not beyond the range
    x = x.astype(cast[source])
    wider = "float32 or bfloat16" if target == "float16" else "float32"
    with pytest.raises(BeyondRangeError, match=f"block holds {source} values beyond the {target} range") as e:
        to_store_dtype(x, target, "block")
    assert str(e.value).endswith(f", first in row 3; store them as {wider}")
    assert (e.value.row, e.value.source, e.value.dtype) == (3, source, target)
    with pytest.raises(ValueError, match=r"first in row 13 of checkpoint 2; store them as"):
        to_store_dtype(x, target, "block", 10, " of checkpoint 2")


def test_no_copy_when_the_dtype_already_matches():
    x = np.ones((4, 3), dtype=np.float16)
    assert np.shares_memory(to_store_dtype(x, "float16", "block"), x)


def test_column_slices_become_contiguous():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    out = to_store_dtype(x, "float32", "block")
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, x)


def test_rejects_other_dtypes_and_shapes():
    with pytest.raises(TypeError, match="block has dtype float64"):
        to_store_dtype(np.ones((2, 2)), "float32", "block")
    with pytest.raises(ValueError, match="block must be 2-D"):
        to_store_dtype(np.ones(3, dtype=np.float32), "float32", "block")
