"""The CPU backend's pairwise aggregate (factored gradients: the path without column sums) hands the
C++ kernel the capped thread count and the cosine run like every other call does (killer tests of hand
mutants C1: capped_threads dropped from aggregate, C4: normalize dropped from aggregate; m401)."""

from __future__ import annotations

import numpy as np

import tracin
from reference import factored_to_full
from tracin import _validate
from tracin.backends import cpu


def _factored(rng, n: int) -> tracin.FactoredGradients:
    def rows(d: int, integers: bool) -> np.ndarray:
        x = rng.standard_normal((n, d))
        return (np.round(2 * x) if integers else x).astype(np.float32)

    left, right = [rows(3, True), rows(2, False)], [rows(4, True), rows(5, False)]
    return tracin.FactoredGradients(left, right, weights=[0.5, -2.0])


def _full64(g: tracin.FactoredGradients) -> list[np.ndarray]:
    return factored_to_full(g.left, g.right)


def test_threads_above_the_usable_cores_are_capped_in_factored_aggregate(rng, monkeypatch):
    seen = []
    real = cpu._core.aggregate
    monkeypatch.setattr(cpu._core, "aggregate", lambda *a, **kw: seen.append(kw["num_threads"]) or real(*a, **kw))
    monkeypatch.setattr(_validate, "usable_cores", lambda: 3)
    test, train = _factored(rng, 4), _factored(rng, 9)
    exact = sum(w * a @ b.T for w, a, b in zip([0.5, -2.0], _full64(test), _full64(train), strict=True)).sum(0)
    for threads, expected in ((None, 0), (2, 2), (3, 3), (4, 3), (4096, 3)):
        seen.clear()
        got = tracin.aggregate(test, train, num_threads=threads, progress=False, device="cpu")
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
        assert seen and set(seen) == {expected}, (threads, seen)


def test_factored_aggregate_of_cosine_scores_matches_float64(rng):
    """normalize=True on factored sets: each row's gradient (outer product) unit-normalised per
    checkpoint, then the weighted dot products summed over the test rows."""
    test, train = _factored(rng, 5), _factored(rng, 7)

    def unit(blocks):
        return [b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks]

    t, x = unit(_full64(test)), unit(_full64(train))
    exact = sum(w * a @ b.T for w, a, b in zip([0.5, -2.0], t, x, strict=True)).sum(0)
    got = tracin.aggregate(test, train, normalize=True, progress=False, device="cpu")
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
