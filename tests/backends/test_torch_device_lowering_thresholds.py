"""The torch backend's packing of weighted test rows at its exact thresholds (torch_device._fold_weights
and _lowering_loses_values), on CPU tensors (device="torch:cpu") against float64 NumPy and the C++
kernel: a row whose largest |w_c x value| reaches 2^127 is lowered whatever the sign of the weight and
where that value only rounds to 2^127; a lowering that would zero a value equal to float32's smallest
normal (2^-126) keeps the row unlowered, as the C++ kernel's ShiftLosesBits does for every value in
[2^-126, FLT_MAX]; such a row whose packed (float32) weighted value is infinite is the overflow error.
Killer tests of hand mutants (r379): D10, D18, D22, D58, D59."""

from __future__ import annotations

import numpy as np
import pytest

import tracin

torch = pytest.importorskip("torch")


def float64_scores(test: np.ndarray, train: np.ndarray, weight: float) -> np.ndarray:
    """The exact scores, w <t, x>, in float64."""
    return weight * (test.astype(np.float64) @ train.astype(np.float64).T)


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_a_row_under_a_negative_weight_reaching_2_to_the_127_is_lowered(device):
    """w = -1.5 on a row of +-1.5 x 2^126: |w x value| = 1.6875 x 2^127, whose floor(log2) is 127 (the
    product of the mantissas, 0.75 x 0.75, is at least 0.5), so the row is lowered before its GEMM and
    scores exactly; kept unlowered, 1.5 x 2^126 x 4 overflows float32 inside the dot product (inf - inf)
    and the call was the overflow error. A sign taken into the mantissas' product (below 0.5 for every
    negative weight) counts one binary order less for negative weights only."""
    a = 1.5 * 2.0**126
    test = np.array([[a, -a]], dtype=np.float32)
    train = np.array([[4.0, 4.0], [1.0, 0.5]], dtype=np.float32)
    want = float64_scores(test, train, -1.5)
    assert want.tolist() == [[0.0, -1.125 * 2.0**126]]
    got = tracin.scores(tracin.Gradients([test], [-1.5]), tracin.Gradients([train], [-1.5]), device=device)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
@pytest.mark.parametrize("call", ["scores", "top_k"])
def test_a_lowering_that_would_zero_float32s_smallest_normal_keeps_the_row_unlowered(device, call):
    """A row [2^127, 2^-126] (w = 1) reaches 2^127, so it would be lowered by 2^27, which rounds its
    2^-126, float32's smallest normal value, to 0: the row stays as it is (no value of it is infinite,
    so no error) and its score against [0, 2^100] is 2^-126 x 2^100 = 2^-26 exactly, not the 0 of a
    lowered row (a threshold of values strictly above 2^-126 lowered it)."""
    test = np.array([[2.0**127, 2.0**-126]], dtype=np.float32)
    train = np.array([[0.0, 2.0**100], [2.0**-100, 0.0], [0.0, 0.0]], dtype=np.float32)
    want = float64_scores(test, train, 1.0)
    assert want.tolist() == [[2.0**-26, 2.0**27, 0.0]]
    if call == "scores":
        np.testing.assert_array_equal(tracin.scores(test, train, device=device), want.astype(np.float32))
        return
    found = tracin.top_k(test, train, k=3, side="opponents", device=device)
    np.testing.assert_array_equal(found.indices, [[2, 0, 1]])
    np.testing.assert_array_equal(found.values, np.array([[0.0, 2.0**-26, 2.0**27]], dtype=np.float32))


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
@pytest.mark.parametrize("call", ["scores", "top_k"])
def test_a_row_kept_unlowered_whose_weighted_value_exceeds_float32_is_the_overflow_error(device, call):
    """w = 1.9 on a row [1.5 x 2^127, 2^-126]: 1.9 x 1.5 x 2^127 is finite in float64 but beyond float32,
    and lowering the row would zero its 2^-126, so it is kept unlowered and its packing overflows: the
    overflow error naming no pair (the C++ kernel's packing fails), although its dot products with these
    train rows and the weighted scores fit float32 (1.9 x 1.5 x 2^27 and 1.9 x 2^-126). It is the
    packed (float32) weighted value that must be infinite, not the float64 product."""
    test = np.array([[1.5 * 2.0**127, 2.0**-126]], dtype=np.float32)
    train = np.array([[2.0**-100, 0.0], [0.0, 1.0]], dtype=np.float32)
    t, x = tracin.Gradients([test], [1.9]), tracin.Gradients([train], [1.9])
    exact = float64_scores(test, train, 1.9)
    assert np.all(np.isfinite(exact.astype(np.float32)))
    with pytest.raises(ValueError, match="^influence overflowed float32 although every input is finite") as e:
        if call == "scores":
            tracin.scores(t, x, device=device)
        else:
            tracin.top_k(t, x, k=2, device=device)
    assert "first for test row" not in str(e.value)
    # aggregate of full rows scores the test rows' float64 column sums: no packing, no error
    np.testing.assert_allclose(tracin.aggregate(t, x, device=device), exact.sum(0), rtol=1e-6)


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_a_row_whose_weighted_value_rounds_up_to_2_to_the_127_is_lowered_as_on_the_cpu_kernel(device):
    """w = 2/3 (a float64 just below it) on a row of +-1.5 x 2^127: w x value is just below 2^127 exactly,
    but rounds to 2^127 in float32 (the C++ kernel's packing) and the product of the mantissas,
    0.75 x 0.666..., to 0.5 in float64: the row counts as reaching 2^127 and is lowered, so its
    score against [4, 4] is 0, not the overflow error of its unlowered GEMM (6 x 2^127 before the
    weight); a strict comparison with 0.5 (the exact product is below it) kept it unlowered."""
    w = 2 / 3
    assert np.float32(w * 1.5 * 2.0**127) == np.float32(2.0**127)
    a = 1.5 * 2.0**127
    test = np.array([[a, -a]], dtype=np.float32)
    train = np.array([[4.0, 4.0], [1.0, 0.5]], dtype=np.float32)
    want = float64_scores(test, train, w).astype(np.float32)
    assert want.tolist() == [[0.0, 2.0**126]]
    got = tracin.scores(tracin.Gradients([test], [w]), tracin.Gradients([train], [w]), device=device)
    np.testing.assert_array_equal(got, want)
