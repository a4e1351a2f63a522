"""Cosine scores (normalize=True) on the torch backend (device="torch:cpu") where one real checkpoint
spans several checkpoint slots (layers; metadata["fingerprints"]["checkpoints"] names fewer checkpoints
than there are slots): each slot is scaled by the inverse norm of ITS run of slots, on both sides, for
scores, top_k and aggregate, full and factored, against float64 NumPy. Three runs of two slots whose
rows have norms far apart tell one run's inverse norms from another's."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from reference import exact_scores, factored_to_full, score_bound

from .numpy_reference import normalized

pytest.importorskip("torch")

WEIGHTS = [0.5, 1.5, -0.75, 2.0, 1.25, 0.25]
RUN = 2
SLOT_SCALES = [1.0, 3.0, 1e3, 0.5, 1e-3, 7.0]  # per slot: the three runs' norms differ by orders of magnitude


def sides(rng, factored: bool):
    """(test set, train set, float64 per-slot test rows, float64 per-slot train rows) of 6 slots in runs of 2."""
    meta = {"fingerprints": {"checkpoints": ["first", "second", "third"]}}
    made = []
    for n in (5, 23):
        if factored:
            left = [(rng.standard_normal((n, 3)) * s).astype(np.float32) for s in SLOT_SCALES]
            right = [(rng.standard_normal((n, 2)) * (1 + c)).astype(np.float32) for c in range(len(SLOT_SCALES))]
            made.append((tracin.FactoredGradients(left, right, WEIGHTS, metadata=meta), factored_to_full(left, right)))
        else:
            blocks = [(rng.standard_normal((n, 4)) * s).astype(np.float32) for s in SLOT_SCALES]
            made.append((tracin.Gradients(blocks, WEIGHTS, metadata=meta), blocks))
    (t, test), (x, train) = made
    as64 = lambda blocks: normalized([np.asarray(b, np.float64) for b in blocks], RUN)  # noqa: E731
    return t, x, as64(test), as64(train)


@pytest.mark.parametrize("factored", [False, True], ids=["full", "factored"])
def test_cosine_scores_scale_each_slot_by_its_own_runs_norms(rng, factored):
    t, x, t64, x64 = sides(rng, factored)
    exact, bound = exact_scores(t64, x64, WEIGHTS), score_bound(t64, x64, WEIGHTS)
    got = tracin.scores(t, x, device="torch:cpu", normalize=True)
    assert np.all(np.abs(got - exact) <= bound)


@pytest.mark.parametrize("factored", [False, True], ids=["full", "factored"])
def test_cosine_aggregate_scales_each_slot_by_its_own_runs_norms(rng, factored):
    t, x, t64, x64 = sides(rng, factored)
    exact, bound = exact_scores(t64, x64, WEIGHTS), score_bound(t64, x64, WEIGHTS)
    got = tracin.aggregate(t, x, device="torch:cpu", normalize=True)
    assert np.all(np.abs(got - exact.sum(0)) <= bound.sum(0))


@pytest.mark.parametrize("factored", [False, True], ids=["full", "factored"])
def test_cosine_top_k_scales_each_slot_by_its_own_runs_norms(rng, factored):
    t, x, t64, x64 = sides(rng, factored)
    exact, bound = exact_scores(t64, x64, WEIGHTS), score_bound(t64, x64, WEIGHTS)
    found = tracin.top_k(t, x, k=4, device="torch:cpu", normalize=True)
    chosen = np.take_along_axis(exact, found.indices, 1)
    assert np.all(np.abs(found.values - chosen) <= np.take_along_axis(bound, found.indices, 1))
    kth = -np.sort(-exact, axis=1)[:, 3:4]
    assert np.all(chosen >= kth - 2 * bound.max(axis=1, keepdims=True))
