"""detection.random_curve: the expected recall of inspecting in random order, and 0 throughout when
there is nothing to find, as detection_curve gives then (r369 mutant D3)."""

from __future__ import annotations

import numpy as np

from tracin.demo.detection import detection_curve, random_curve


def test_random_order_finds_on_average_the_fraction_inspected():
    rng = np.random.default_rng(0)
    flipped = np.zeros(12, dtype=bool)
    flipped[[2, 5, 7]] = True
    # the mean over every one of many random orders, in float64
    mean = np.mean([detection_curve(rng.random(12), flipped) for _ in range(20000)], axis=0)
    np.testing.assert_allclose(random_curve(12, 3), mean, atol=0.01)
    np.testing.assert_array_equal(random_curve(4, 1), [0.0, 0.25, 0.5, 0.75, 1.0])


def test_with_nothing_flipped_random_order_finds_nothing():
    """No flipped label: every curve is 0 (no NaN, no line to 1), the value detection_curve gives."""
    none = np.zeros(5, dtype=bool)
    np.testing.assert_array_equal(random_curve(5, 0), np.zeros(6))
    np.testing.assert_array_equal(random_curve(5, 0), detection_curve(np.arange(5.0), none))
