"""whitening._conditioning.eigenvalue_ends: the smallest eigenvalue of a positive semidefinite R is clipped at 0
where rounding makes eigvalsh's slightly negative (mutant C5: returned negative, which enlarges the cond the
ill-conditioning warning states and its advice works from, (largest + lambda) / (smallest + lambda), by up to
the 1% fit's rounding guard allows); the largest is R's (hand-worked for a rank-one R: |v|^2)."""

from __future__ import annotations

import numpy as np

from tracin.whitening import _conditioning


def test_the_smallest_eigenvalue_of_a_rank_deficient_r_is_clipped_at_zero():
    for seed in range(20):  # a rank-one R of 40 dims: 39 zero eigenvalues, which eigvalsh rounds either way
        v = np.random.default_rng(seed).standard_normal(40)
        r = np.outer(v, v)
        if np.linalg.eigvalsh(r)[0] < 0:
            break
    else:
        raise AssertionError("no rank-one R whose rounded smallest eigenvalue is negative")
    largest, smallest = _conditioning.eigenvalue_ends(r)
    assert smallest == 0.0
    np.testing.assert_allclose(largest, v @ v, rtol=1e-12)
