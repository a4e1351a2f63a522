"""Conversion edges the other convert tests leave open: the largest finite float16 values are finite (not
NaN / Inf) when a store writer refuses non-finite blocks, and the conversion errors keep their attributes
when pickled (a worker process's error reaches its parent that way)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import tracin
from tracin.store._convert import BeyondRangeError, NonFiniteError, to_store_dtype

from .helpers import read_rows

# float16 values whose exponent bits are 0b11110 (one below all ones): finite, the largest float16 holds
LARGE_FLOAT16 = [32768.0, 40000.0, -49152.0, 65504.0, -65504.0]


@pytest.mark.parametrize("target", ["float16", "float32"])
def test_the_largest_finite_float16_values_are_not_taken_for_nan_or_inf(target):
    x = np.zeros((3, 6), np.float16)
    x[1, : len(LARGE_FLOAT16)] = LARGE_FLOAT16
    out = to_store_dtype(x, target, "block", 10, " of checkpoint 0", refuse_nonfinite=True)
    expected = np.zeros((3, 6), np.float64)
    expected[1, : len(LARGE_FLOAT16)] = LARGE_FLOAT16  # all exact in float16 and float32
    np.testing.assert_array_equal(out.astype(np.float64), expected)


def test_a_float16_store_takes_its_largest_finite_values_and_scores_them(tmp_path):
    x = np.zeros((2, 5), np.float16)
    x[0] = LARGE_FLOAT16
    x[1] = [1.0, 0.5, -2.0, 0.0, 3.0]
    writer = tracin.GradientStore.create(tmp_path / "s", 2, [5], [0.5], "float16")
    writer.write(0, 0, x)  # float16 rows as they came (refused as "NaN or Inf" when judged wrongly)
    store = writer.finalize()
    rows = x.astype(np.float64)
    np.testing.assert_array_equal(read_rows(store)[0].astype(np.float64), rows)
    expected = 0.5 * (rows * rows).sum(axis=1)
    np.testing.assert_allclose(tracin.self_influence(store), expected, rtol=1e-6)


def test_a_nan_among_large_float16_values_is_still_refused_naming_its_row():
    x = np.full((4, 3), 40000.0, np.float16)
    x[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"^block holds NaN or Inf values in row 7 of checkpoint 1$"):
        to_store_dtype(x, "float16", "block", 5, " of checkpoint 1", refuse_nonfinite=True)


def test_a_beyond_range_error_keeps_its_attributes_when_pickled():
    x = np.ones((3, 2), np.float32)
    x[1, 0] = 70000.0
    with pytest.raises(BeyondRangeError) as caught:
        to_store_dtype(x, "float16", "block", 4, " of checkpoint 2")
    err = pickle.loads(pickle.dumps(caught.value))
    assert type(err) is BeyondRangeError
    assert str(err) == str(caught.value)
    # hand-worked: row 1 of the block; float32 into float16, whose largest finite value is 65504
    assert (err.row, err.source, err.dtype, err.limit) == (1, "float32", "float16", 65504.0)


def test_a_non_finite_error_keeps_its_attributes_when_pickled():
    x = np.ones((9, 2), np.float32)
    x[[2, 3, 8], 1] = [np.inf, np.nan, -np.inf]
    with pytest.raises(NonFiniteError) as caught:
        to_store_dtype(x, "float32", "left", 100, " of checkpoint 0", refuse_nonfinite=True)
    err = pickle.loads(pickle.dumps(caught.value))
    assert type(err) is NonFiniteError
    assert str(err) == "left holds NaN or Inf values in rows 102, 103, 108 of checkpoint 0"
    assert (err.rows, err.count, err.name, err.where) == ([102, 103, 108], 3, "left", " of checkpoint 0")
