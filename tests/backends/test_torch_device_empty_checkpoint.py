"""A checkpoint slot of zero columns beside others, on the torch backend (device="torch:cpu"): it adds
nothing, and the weighted packing (torch_device._fold_weights, which reads each row's largest value per
slot) skips it rather than reducing over no columns, for any weight, full and factored (a left or a
right factor of zero columns), against float64 NumPy and the C++ kernel. Killer test of hand mutant
D13 (r379: the zero-width skip dropped, torch.aminmax over an empty dimension raised)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from reference import exact_scores, factored_to_full

pytest.importorskip("torch")


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.5, 1e-30], [3.0, -2.0]], ids=["ones", "tiny", "large"])
@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_a_zero_width_checkpoint_adds_nothing(rng, device, weights):
    test = [rng.standard_normal((3, 4)).astype(np.float32), np.zeros((3, 0), np.float32)]
    train = [rng.standard_normal((5, 4)).astype(np.float32), np.zeros((5, 0), np.float32)]
    exact = exact_scores(test, train, weights)
    t, x = tracin.Gradients(test, weights), tracin.Gradients(train, weights)
    np.testing.assert_allclose(tracin.scores(t, x, device=device), exact, rtol=1e-5, atol=0)
    found = tracin.top_k(t, x, k=2, device=device)
    np.testing.assert_array_equal(found.indices, np.argsort(-exact, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(tracin.aggregate(t, x, device=device), exact.sum(0), rtol=1e-5)


@pytest.mark.parametrize("empty", ["left", "right"])
@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_a_factored_checkpoint_with_a_zero_width_factor_adds_nothing(rng, device, empty):
    weights = [2.5, 1e-30]
    shapes = {"left": (0, 2), "right": (2, 0)}[empty]
    sides = []
    for n in (3, 5):
        left = [rng.standard_normal((n, 3)).astype(np.float32), np.ones((n, shapes[0]), np.float32)]
        right = [rng.standard_normal((n, 2)).astype(np.float32), np.ones((n, shapes[1]), np.float32)]
        sides.append((left, right))
    exact = exact_scores(*(factored_to_full(lf, rt) for lf, rt in sides), weights)
    t, x = (tracin.FactoredGradients(lf, rt, weights) for lf, rt in sides)
    np.testing.assert_allclose(tracin.scores(t, x, device=device), exact, rtol=1e-5, atol=0)
    np.testing.assert_allclose(tracin.aggregate(t, x, device=device), exact.sum(0), rtol=1e-5)
