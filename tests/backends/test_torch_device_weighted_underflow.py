"""Weights of 2 and more on rows whose unweighted dot products fall below float32's normal range but
whose weighted scores do not (torch_device._fold_weights): the torch backend (device="torch:cpu") keeps
the contract's scale-aware bound, as the C++ kernel does by packing w_c x value before its products.
Before, weights up to 2^25 stayed off the test rows (the GEMM took them): the raw dot product, near
2^-139, was rounded as a float32 subnormal (relative error near 2^-10) and then multiplied by w, 15.7x
the bound for w = 2^20 and 2^24 (found by mutation testing, r379)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from reference import exact_scores, score_bound

pytest.importorskip("torch")

# rows whose products are near 2^-140 (subnormal in float32) and whose weighted scores are normal
TEST = np.array([[1.3 * 2.0**-100, 0.7 * 2.0**-100], [0.9 * 2.0**-98, -1.7 * 2.0**-99]], dtype=np.float32)
TRAIN = np.array([[1.7 * 2.0**-40, 1.1 * 2.0**-40], [-1.3 * 2.0**-41, 1.9 * 2.0**-40], [1.0, 0.0]], dtype=np.float32)


@pytest.mark.parametrize("w", [2.0**20, 2.0**24, 3.0 * 2.0**21, 1e6])
@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_scores_under_a_large_weight_of_rows_whose_dot_products_underflow_keep_the_bound(w, device):
    exact, bound = exact_scores([TEST], [TRAIN], [w]), score_bound([TEST], [TRAIN], [w])
    assert np.all(np.abs(exact[:, :2]) > 2.0**-125)  # normal float32 scores
    t, x = tracin.Gradients([TEST], [w]), tracin.Gradients([TRAIN], [w])
    assert np.all(np.abs(tracin.scores(t, x, device=device) - exact) <= bound)
    for found in tracin.top_k(t, x, k=3, side="both", device=device):
        chosen = np.take_along_axis(exact, found.indices, 1)
        assert np.all(np.abs(found.values - chosen) <= np.take_along_axis(bound, found.indices, 1))


@pytest.mark.parametrize("w", [2.0**20, 2.0**24])
@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_factored_scores_under_a_large_weight_of_left_factors_whose_products_underflow_keep_the_bound(w, device):
    """The weight goes on the left factors, whose GEMM is the one that underflows here (right factors 1)."""
    ones_t, ones_x = np.ones((len(TEST), 1), np.float32), np.ones((len(TRAIN), 1), np.float32)
    exact, bound = exact_scores([TEST], [TRAIN], [w]), score_bound([TEST], [TRAIN], [w])
    t, x = tracin.FactoredGradients([TEST], [ones_t], [w]), tracin.FactoredGradients([TRAIN], [ones_x], [w])
    assert np.all(np.abs(tracin.scores(t, x, device=device) - exact) <= bound)


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_a_weight_below_2_on_such_rows_keeps_the_bound_where_the_score_is_normal(device):
    """w = 1.5: the dot products, near 2^-139, and the scores are below float32's normal range alike; the
    scores of the rows against [1, 0] (normal) keep the bound. The weights that stay off the rows are
    those below 2, whose raw dot products underflow only where the weighted score nearly does too."""
    exact, bound = exact_scores([TEST], [TRAIN], [1.5]), score_bound([TEST], [TRAIN], [1.5])
    got = tracin.scores(tracin.Gradients([TEST], [1.5]), tracin.Gradients([TRAIN], [1.5]), device=device)
    assert np.all(np.abs(got[:, 2] - exact[:, 2]) <= bound[:, 2])
    np.testing.assert_allclose(got[:, :2], exact[:, :2], rtol=2.0**-8)  # subnormal scores: float32's own step
