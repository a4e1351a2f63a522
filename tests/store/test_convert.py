"""Conversion of written blocks to the store dtype, checked against ml_dtypes / NumPy casts."""

import re
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from tracin.store._convert import BeyondRangeError, LowPrecisionRows, float32_to_bfloat16_bits, to_store_dtype

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
    cutoff = {"float16": "65520 rounds beyond 65504", "bfloat16": "3.3961775e+38 rounds beyond 3.3895314e+38"}
    stated = f"beyond the {target} range (|x| >= {cutoff[target]}), first in row 3; store them as {wider}"
    assert str(e.value).endswith(stated)
    assert (e.value.row, e.value.source, e.value.dtype) == (3, source, target)
    with pytest.raises(ValueError, match=r"first in row 13 of checkpoint 2; store them as"):
        to_store_dtype(x, target, "block", 10, " of checkpoint 2")


@pytest.mark.parametrize("target", ["float16", "bfloat16"])
def test_the_stated_range_is_the_one_applied(target):
    """review94 F2: the error said |x| > 65504, but 65519 is stored (as 65504) and only |x| >= 65520 is
    refused (the midpoint to the next power of two, a tie rounding to even, i.e. to inf). The stated
    cutoff (read back as float32) is the smallest float32 refused; the float32 below it is kept, as the
    dtype's largest value, the stated one (references: NumPy and ml_dtypes casts)."""
    cast = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[target]
    limit = float(np.finfo(cast).max)
    cutoff = float(re.search(r"\|x\| >= (\S+) rounds beyond (\S+)\)", _refusal(np.float32(3.4e38), target))[1])
    below = np.nextafter(np.float32(cutoff), np.float32(0))
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(cutoff).astype(cast)) and float(below.astype(cast)) == limit  # the reference
    for sign in (1, -1):
        kept = to_store_dtype(np.array([[sign * below]], np.float32), target, "block")
        assert float(kept.view(cast)[0, 0]) == sign * limit
        stated = re.search(r"rounds beyond (\S+)\)", _refusal(np.float32(sign * cutoff), target))[1]
        assert np.float32(stated) == np.float32(limit)


def _refusal(value: np.float32, target: str) -> str:
    with pytest.raises(BeyondRangeError) as e:
        to_store_dtype(np.array([[value]], np.float32), target, "block")
    return str(e.value)


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


def _tiny_block() -> np.ndarray:
    """Rows: 0 normal with a few tiny values (harmless), 1 all zero (nothing lost), 2 all below float16's
    smallest normal 2**-14 but kept as subnormals, 3 all at most 2**-25 (become 0), 4 at 2**-14 itself
    (normal), 5 just below 2**-14 (rounds up to it: normal), 6 all below 2**-14, its largest negative."""
    x = np.zeros((7, 4), np.float32)
    x[0] = [1.0, 1e-9, -3e-7, 2.0]
    x[2] = [1e-6, -3e-6, 0.0, 5e-7]
    x[3] = [2e-8, -1e-9, 2.9e-8, 0.0]
    x[4] = [2.0**-14, 0.0, -1e-7, 0.0]
    x[5] = [np.nextafter(np.float32(2.0**-14), np.float32(0)), 0.0, 0.0, 0.0]
    x[6] = [-4e-5, 1e-5, 0.0, 0.0]
    return x


def _lost_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference (NumPy's float16 cast): rows, not all zero, whose float16 values are all below the
    smallest normal; and which of those became all zero."""
    f16 = x.astype(np.float32).astype(np.float16).astype(np.float64)
    lost = (np.abs(f16).max(axis=1) < np.finfo(np.float16).smallest_normal) & (x != 0).any(axis=1)
    return lost, lost & (f16 == 0).all(axis=1)


@pytest.mark.parametrize("source", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_float16_rows_left_below_the_normal_range_warn_with_counts(source, kind):
    """review94 F1: such rows (precision lost, or all zero) were stored without a word. The warning counts
    them (rows 2, 3 and 6; row 3 became zero), gives their largest |x| and points to bfloat16; rows with a few
    tiny values beside large ones, rows of zeros and rows that round to a normal number are not counted."""
    x = _tiny_block()
    if source == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16)
    lost, zero = _lost_rows(x)
    assert (
        lost.tolist() == [False, False, True, True, False, False, True]
        and zero.tolist() == [False] * 3 + [True] + [False] * 3
    )
    largest = np.abs(x.astype(np.float32)[lost]).max()
    block = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, source)) if kind == "torch" else x
    message = (
        rf"^3 of the 7 rows of block \(rows 10 to 16 of checkpoint 2\) hold only values below float16's smallest "
        rf"normal number, 6.1e-05, in magnitude \(the largest: {largest:.3g}\), which float16 keeps with fewer "
        r"significant bits \(subnormals\) or as 0, so their scores lose precision; 1 of them became all zero "
        r"\(it scores 0\); store them as bfloat16 \(nearly float32's range\) or float32$"
    )
    with pytest.warns(RuntimeWarning, match=message):
        out = to_store_dtype(block, "float16", "block", 10, " of checkpoint 2")
    np.testing.assert_array_equal(out, x.astype(np.float32).astype(np.float16))  # stored all the same


def test_a_writer_s_low_precision_rows_warns_once_whatever_the_blocks():
    """One LowPrecisionRows (a writer's or an export's) warns at the first block holding such rows, in its
    words, and not for later blocks; another one warns again."""
    low = LowPrecisionRows("gradient store s", "use bfloat16")
    normal = np.ones((3, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_store_dtype(normal, "float16", "block", low=low)
    with pytest.warns(
        RuntimeWarning, match=r"^gradient store s: 3 of the 7 rows of block \(rows 0 to 6\) .*; use bfloat16$"
    ):
        to_store_dtype(_tiny_block(), "float16", "block", low=low)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_store_dtype(_tiny_block(), "float16", "block", low=low)
        to_store_dtype(_tiny_block()[3:4], "float16", "block", low=low)
    words = r"^the row of block \(row 5\) holds only .*, so its scores lose precision; it became all zero \(it scores"
    with pytest.warns(RuntimeWarning, match=words):
        to_store_dtype(_tiny_block()[3:4], "float16", "block", 5, low=LowPrecisionRows())


@pytest.mark.parametrize("zeros", [1, 2])
def test_the_rows_that_became_all_zero_are_counted_in_singular_or_plural(zeros):
    """review102 F6: '1 of them became all zero (they score 0)'. Rows 0..zeros-1 round to all zero in
    float16 (checked against NumPy's cast), the last keeps a subnormal."""
    x = np.full((3, 2), 1e-6, np.float32)
    x[:zeros] = 1e-9
    lost, zero = _lost_rows(x)
    assert lost.all() and zero.sum() == zeros
    verb = "it scores 0" if zeros == 1 else "they score 0"
    with pytest.warns(RuntimeWarning, match=rf"; {zeros} of them became all zero \({verb}\); store them"):
        to_store_dtype(x, "float16", "block")


@pytest.mark.parametrize(
    "x, dtype",
    [
        (np.random.default_rng(2).standard_normal((64, 300)).astype(np.float32), "float16"),  # normal gradients
        (np.random.default_rng(2).standard_normal((64, 300)).astype(np.float32) * 1e-3, "float16"),
        (np.zeros((5, 3), np.float32), "float16"),  # rows of zeros lose nothing
        (np.zeros((0, 3), np.float32), "float16"),
        (np.zeros((3, 0), np.float32), "float16"),
        (np.array([[np.nan, 1e-9], [np.inf, 0.0]], np.float32), "float16"),  # kept (no refuse_nonfinite)
        (_tiny_block(), "bfloat16"),  # float32's range
        (_tiny_block(), "float32"),
        (_tiny_block().astype(np.float16), "float16"),  # already float16: nothing converted, nothing lost here
    ],
)
def test_no_low_precision_warning_where_nothing_is_lost(x, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_store_dtype(x, dtype, "block")


def _edge_rows(target: str) -> np.ndarray:
    """float32 rows of edge values for casting to `target`, none beyond its range: subnormal results and
    their ties, float32 denormals, -0.0, the largest finite results, ties to even, NaN payloads, Inf."""
    if target == "float16":
        edges = [2.0**-24, 2.0**-25, 3 * 2.0**-25, -(2.0**-25), 5 * 2.0**-26, 2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-24]
        below = float(np.nextafter(np.float32(65520), np.float32(0)))  # rounds to 65504
        edges += [65504.0, -65504.0, below, 1 + 2.0**-11, 1 + 3 * 2.0**-11]
    else:
        edges = [1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2.0**-133, 2.0**-134, 3 * 2.0**-134, 2.0**-126]
        edges += [3.3895314e38, float(np.array(0x7F7F7FFF, np.uint32).view(np.float32)), 1 + 2.0**-8 + 2.0**-23]
    edges += [0.0, -0.0, 1e-40, -1e-45, 1.0, -2.5, np.inf, -np.inf]
    nans = np.array([0x7F800001, 0x7FC00000, 0xFFC00001, 0x7FBFFFFF, 0xFFFFFFFF, 0x7FA02000], np.uint32)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((12, 64)) * 10.0 ** rng.integers(-9, 4, (12, 64))).astype(np.float32)
    x[0, : len(edges)] = edges  # rows 0, 1: edge values among normal ones; row 1 also NaNs of every payload
    x[1, : len(edges)] = np.array(edges, np.float32)[::-1]
    x[1, -len(nans) :] = nans.view(np.float32)
    x[2, : len(edges) - 3] = edges[:-3]  # finite edges only: cast by torch alone
    x[3, :4] = nans[:4].view(np.float32)
    x[5] = rng.standard_normal(64).astype(np.float32) * 1e-6  # all below float16's normal range
    return x


@pytest.mark.parametrize("target", ["float16", "bfloat16"])
@pytest.mark.parametrize("low", [False, True])
def test_torch_float32_rows_cast_by_torch_give_the_numpy_cast_s_bits(target, low, monkeypatch):
    """r251: torch float32 rows are cast by torch (multi-threaded, 2-3x NumPy); the bits must be those of
    the NumPy path for every edge value (round to nearest even: a truncating cast fails), NaN payloads
    included (rows holding NaN or Inf are cast again by NumPy), and so must the low-precision warning."""
    import tracin.store._convert as convert

    calls = []
    real = convert._torch_cast
    monkeypatch.setattr(convert, "_torch_cast", lambda a, d: calls.append(d) or real(a, d))
    x = _edge_rows(target)
    lows = [LowPrecisionRows("t"), LowPrecisionRows("t")] if low else [None, None]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = to_store_dtype(torch.from_numpy(x.copy()), target, "block", 4, " of checkpoint 1", low=lows[0])
        assert calls == [target]
        ref = to_store_dtype(x, target, "block", 4, " of checkpoint 1", low=lows[1])
    assert calls == [target] and ours.dtype == ref.dtype and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours.view(np.uint16), ref.view(np.uint16))
    cast = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[target]
    finite = ~np.isnan(x)  # the independent reference where NaN bits are not specified
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(ours.view(np.uint16)[finite], x.astype(cast).view(np.uint16)[finite])
    texts = [str(w.message) for w in seen]
    assert len(texts) == (2 if target == "float16" else 0) and len(set(texts)) <= 1
    if texts:
        head = f"{'t: ' if low else ''}1 of the 12 rows of block (rows 4 to 15 of checkpoint 1) holds only"
        assert texts[0].startswith(head)


@pytest.mark.parametrize("target, value", [("float16", 65520.0), ("float16", -7e4), ("bfloat16", 3.3961776e38)])
@pytest.mark.parametrize("refuse_nonfinite", [False, True])
def test_torch_float32_rows_beyond_the_range_are_refused_as_numpy_rows_are(target, value, refuse_nonfinite):
    """The torch cast turns such values into Inf; the error is the NumPy path's: same text and row (the first
    holding one: row 5, after rows holding NaN and Inf that are kept)."""
    x = _edge_rows(target)[:8].copy()
    x[~np.isfinite(x)] = 1.0 if refuse_nonfinite else x[~np.isfinite(x)]
    x[5, 7] = x[6, 0] = value
    errors = []
    for block in (torch.from_numpy(x.copy()), x):
        with pytest.raises(BeyondRangeError) as e:
            to_store_dtype(block, target, "block", 10, " of checkpoint 2", refuse_nonfinite=refuse_nonfinite)
        errors.append((str(e.value), e.value.row, e.value.source, e.value.dtype, e.value.limit))
    assert errors[0] == errors[1]
    assert errors[0][1] == 5 and "first in row 15 of checkpoint 2; store them as" in errors[0][0]


def test_a_meta_tensor_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"^rows is a torch tensor on the meta device, which holds shapes but no"):
        to_store_dtype(torch.empty(3, 4, device="meta"), "float16", "rows")
