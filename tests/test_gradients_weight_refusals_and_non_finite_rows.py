"""tracin.gradients: which weights are refused and how the refusal names them; non_finite_rows over pieces of
rows (its first five bad rows, numbered from the block's start) and bfloat16's non-finite test by exponent bits."""

from __future__ import annotations

import decimal

import ml_dtypes
import numpy as np
import pytest

import tracin
from tracin import gradients
from tracin._arrays import DTYPE_CODES
from tracin.gradients import non_finite_rows

_TWO = [np.zeros((2, 2), np.float32)] * 2
_THREE = [np.zeros((2, 2), np.float32)] * 3


@pytest.mark.parametrize(
    "weights",
    [np.array([0.5, True], dtype=object), np.array([decimal.Decimal("0.5"), np.bool_(False)], dtype=object)],
    ids=["object array with True", "object array with np.bool_"],
)
def test_a_bool_inside_an_object_array_of_weights_is_refused(weights):
    """A bool is no learning rate, inside an object array too (as in a list): NumPy would read True as 1.0."""
    with pytest.raises(TypeError, match=r"^weights must be a sequence of real numbers \(one per checkpoint\), got"):
        tracin.Gradients(_TWO, weights)


def test_a_scalar_weight_that_rounds_to_zero_is_named_as_weights_0():
    """One checkpoint, its weight given as a scalar: the refusal names weights[0] and the value given."""
    with pytest.raises(ValueError, match=r"^weights\[0\] = Decimal\('1E-400'\) is not 0 but rounds to 0 in float64"):
        tracin.Gradients(np.zeros((2, 2), np.float32), decimal.Decimal("1e-400"))
    assert tracin.Gradients(np.zeros((2, 2), np.float32), 0.25).weights.tolist() == [0.25]


def test_the_first_of_several_weights_that_round_to_zero_is_the_one_named():
    tiny = [decimal.Decimal("1e-400"), decimal.Decimal("-1e-500")]
    with pytest.raises(ValueError, match=r"^weights\[1\] = Decimal\('1E-400'\) is not 0 .* so checkpoint 1 would"):
        tracin.Gradients(_THREE, [1.0, *tiny])


def test_non_finite_rows_numbers_rows_from_the_blocks_start_and_stops_at_the_limit(monkeypatch):
    """Pieces of 2 rows (FINITE_CHECK_BYTES made small): bad rows 0-5 and 9; the first five are named, counted
    from the block's start (not the piece's), and a piece holding more than the rows still wanted adds only those."""
    width = 3
    monkeypatch.setattr(gradients, "FINITE_CHECK_BYTES", 4 * width * 2)
    block = np.ones((12, width), np.float32)
    bad = [0, 1, 2, 3, 4, 5, 9]
    block[bad, 1] = np.nan
    block[3, 2] = np.inf
    assert non_finite_rows(block, DTYPE_CODES["float32"]) == [0, 1, 2, 3, 4]
    assert non_finite_rows(block, DTYPE_CODES["float32"], limit=7) == bad
    assert non_finite_rows(block[6:], DTYPE_CODES["float32"]) == [3]  # row 9 of the block, 3 of the view
    late = np.ones((12, width), np.float32)
    late[[7, 10, 11], 0] = -np.inf
    assert non_finite_rows(late, DTYPE_CODES["float32"]) == [7, 10, 11]
    assert non_finite_rows(late, DTYPE_CODES["float32"], limit=2) == [7, 10]


def test_bfloat16_rows_are_non_finite_by_all_ones_exponent_bits_alone():
    """bfloat16 given as its uint16 bits: 2**127 (bits 0x7F00) and the largest finite value (0x7F7F) are finite;
    Inf and NaN of either sign (exponent bits all ones, 0x7F80) are named."""
    values = np.ones((6, 4), ml_dtypes.bfloat16)
    values[0, 1] = 2.0**127
    values[1, 3] = -float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    values[2, 0] = np.inf
    values[3, 2] = -np.inf
    values[5, 1] = np.nan
    bits = values.view(np.uint16)
    assert int(bits[0, 1]) == 0x7F00 and int(bits[1, 3]) == 0xFF7F
    assert non_finite_rows(bits, DTYPE_CODES["bfloat16"]) == [2, 3, 5]
    half = np.array([[65504.0, 1.0], [np.inf, 0.0], [6.1e-5, -65504.0]], np.float16)
    assert non_finite_rows(half, DTYPE_CODES["float16"]) == [1]


@pytest.mark.parametrize(
    "flag",
    [np.array(True), np.array(False), "jax"],
    ids=["numpy 0-d True", "numpy 0-d False", "jax 0-d True"],
)
def test_a_0d_bool_array_among_the_weights_is_refused_as_a_bool_is(flag):
    """A 0-d bool array (NumPy's, or JAX's jnp.asarray(True)) in a list of weights was read as 1.0 / 0.0, while a
    bool, np.bool_, a 0-d torch bool tensor and a bool array are refused: refused as they are."""
    if isinstance(flag, str):
        flag = pytest.importorskip("jax.numpy").asarray(True)
    with pytest.raises(TypeError, match=r"^weights must be a sequence of real numbers \(one per checkpoint\), got"):
        tracin.Gradients(_TWO, [flag, 1.0])
    with pytest.raises(TypeError, match=r"^weights must be a sequence of real numbers"):
        tracin.FactoredGradients(_TWO, _TWO, (0.5, flag))
    assert tracin.Gradients(_TWO, [np.array(0.5), np.float32(2.0)]).weights.tolist() == [0.5, 2.0]  # 0-d numbers
