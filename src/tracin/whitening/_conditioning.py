"""How far float32 whitened scores can be off at a damping: the condition number of (R + lambda I).

Whitened test rows and the scores made from them are float32 whatever fit's precision. Rounding the
whitened rows to float32 and, more, summing each score's d products in float32 (an error that grows
with d) leave scores off, relative to the largest score, by up to about
(4 + sqrt(d) / 2) x cond x 2^-24 (error_factor; the stated worst case), cond = (largest eigenvalue of
R + lambda) / (smallest eigenvalue of R + lambda) per checkpoint. K-FAC applies each factor's inverse
on its own (left (B + lambda_B I)^-1 and right (A + lambda_A I)^-1, each rounded to float32) and its
scores are products (left'_t . left_i) (right'_t . right_i) of a p- and a q-term float32 sum, so each
factor adds its own relative error: the bound is the sum over the two factors, error_factor(p) x cond_B
+ error_factor(q) x cond_A (x 2^-24), not a product of conds (the measured error was
below that sum in every case, up to 0.71 of it, and up to 6.9 x (cond_B + cond_A) x 2^-24, over 240 fits of 1 to
400 rows, sides 30 to 768, dampings 1e-2 to 1e-10, flat or 1e-2 column spectra, and 340 of 1 to 3 rows, sides 16
to 300, column scales random in 1e-3 to 1, dampings 1e-9 to 1e-2, where the largest ratios were; the product
overstated 5.7e-4 as 79). cond is at most
(largest + lambda) / lambda, reached where the train rows do not span all d directions (fewer rows than
dims). Measured (5 to 20 Gaussian train rows of d = 50 to 2000 dims, float64 NumPy
reference): at most 1.8 (d 50), 6.8 (d 200), 9.1 (d 1000 and 2000) x cond x 2^-24, half the factor
(7.5, 11.1, 19.8, 26.4) or less.

When fit warns (warn_if_ill_conditioned) is decided apart from that worst case, on
error_factor(d) x cond_seen x 2^-24 > WARN_ERROR (1e-2; measured errors then reach about 4e-3 to 5e-3;
for K-FAC the sum of the two factors' such terms, each with its own side and cond_seen):
- cond_seen = min(cond, sqrt((largest + lambda) / smallest)). The second term is for a full-rank R: test
  rows like the rows R was fitted on have components of about sqrt(eigenvalue) along each eigenvector,
  which (R + lambda I)^-1 scales by at most 1 / sqrt(eigenvalue), so their whitened rows span a range of
  sqrt(largest / smallest), not cond (d 1024, eigenvalue spread 1e-6, damping 1e-3, cond 1.5e4,
  measured 5e-7 of the largest score). Where R is rank-deficient (smallest 0, or rounding's 1e-17) it is
  cond: test rows have components R never saw, whitened by 1 / lambda.
- The damping the warning advises (the smallest doubling of the given one) keeps the stated worst case,
  error_factor(d) x cond x 2^-24, within SCORE_ERROR (4e-3), whatever the test rows.
So a fit is silent where its worst case is up to WARN_ERROR (e.g. the quality suite's breast_cancer,
1024 dims, 398 rows, damping 0.1: cond 3.5e3, worst case 4.2e-3, measured about 2e-3) and, for a full-rank R,
at any damping while sqrt(largest / smallest) x error_factor(d) x 2^-24 <= WARN_ERROR (eigenvalue spreads
down to about 1e-7 at d = 1024, 1e-8 at d = 256).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ._inverse import LANCZOS_STEPS, lanczos_top

FLOAT32_EPS = 2.0**-24
SCORE_ERROR = 4e-3
"""The float32 scores' error bound error_factor(d) x cond x 2^-24 (relative to the largest score) that the damping
fit and with_damping advise keeps them within."""
WARN_ERROR = 1e-2
"""error_factor(d) x cond_seen x 2^-24 above which fit and with_damping warn (module docstring)."""


def error_factor(width: int) -> float:
    """The bound on float32 whitened scores' error, relative to the largest score, in units of cond x 2^-24, for
    checkpoints of `width` dims: 4 + sqrt(width) / 2 (the float32 sums over d products grow with d; see the
    module docstring for what it was measured against)."""
    return 4.0 + 0.5 * float(np.sqrt(width))


_EXACT_SIDE = 256  # eigvalsh up to this side; above, power iteration (a lower bound on the largest)
_POWER_STEPS = 64


def largest_eigenvalue(r: np.ndarray) -> float:
    """The largest eigenvalue of the symmetric positive semidefinite float64 (k, k) R (above
    _EXACT_SIDE a lower bound from power iteration, from a fixed start: the same answer every run)."""
    if r.shape[0] <= _EXACT_SIDE:
        return float(np.linalg.eigvalsh(r)[-1]) if r.size else 0.0
    v = np.random.default_rng(0).standard_normal(r.shape[0])
    top = 0.0
    for _ in range(_POWER_STEPS):
        w = r @ v
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        top = float(v @ w) / float(v @ v)
        v = w / norm
    return top


def eigenvalue_ends(r: np.ndarray) -> tuple[float, float | None]:
    """(largest, smallest) eigenvalue of the symmetric positive semidefinite float64 (k, k) R, the
    smallest clipped at 0 (rounding can make it slightly negative). Up to _EXACT_SIDE both exact
    (eigvalsh); above, largest_eigenvalue's and None: warn_if_ill_conditioned finds the smallest
    from the damped inverse, only where it may warn."""
    if r.shape[0] <= _EXACT_SIDE:
        if not r.size:
            return 0.0, 0.0
        w = np.linalg.eigvalsh(r)
        return float(w[-1]), max(float(w[0]), 0.0)
    return largest_eigenvalue(r), None


def smallest_from_inverse(x: np.ndarray, lam: float) -> float:
    """R's smallest eigenvalue (clipped at 0) from X = (R + lam I)^-1: 1 / (X's largest) - lam, X's largest
    from Lanczos (a lower bound on it: the smallest is over- rather than underestimated, so the
    condition number found is at most the true one, as largest_eigenvalue's bound keeps it)."""
    top = max(float(np.diagonal(x).max()), lanczos_top(x, LANCZOS_STEPS))
    return max(1.0 / top - lam, 0.0)


def warn_if_ill_conditioned(
    ends: list[tuple[float, float | None]],
    inverses: list[np.ndarray],
    damping: float,
    lambdas_at: Callable[[float], list[float]],
    per_checkpoint: int,
) -> None:
    """RuntimeWarning when a checkpoint's error_factor(d) x cond_seen x 2^-24 exceeds WARN_ERROR at `damping`
    (module docstring), stating its worst case error_factor(d) x cond x 2^-24 and naming the smallest power-of-two
    multiple of `damping` that brings every checkpoint's worst case within SCORE_ERROR: `ends` the (largest,
    smallest or None) eigenvalues of each matrix R (eigenvalue_ends, kernel block order), `inverses` their damped
    inverses at `damping` (where a smallest is None, it is found from them, but only if cond_seen's bound
    (largest + lambda) / lambda may warn), lambdas_at(d) their lambdas at damping d, per_checkpoint matrices per
    checkpoint (2 for K-FAC: the checkpoint's bound is the sum of its two factors' error_factor(side) x cond x
    2^-24, each applied and rounded on its own; else d the matrix's side).
    cond = (largest + lambda) / (smallest + lambda)."""
    factors = [error_factor(x.shape[0]) for x in inverses]

    def worst(d: float, bottoms: list[float], seen: bool) -> tuple[float, list[float], int]:
        """(error, conds of its matrices, checkpoint) of the checkpoint of the largest error at damping d: with
        cond_seen (`seen`) or cond."""
        lambdas = lambdas_at(d)
        conds = []
        for (top, _), low, lam in zip(ends, bottoms, lambdas, strict=True):
            cond = (top + lam) / (low + lam)
            if seen and low > 0.0:
                cond = min(cond, float(np.sqrt((top + lam) / low)))
            conds.append(cond)
        terms = [f * c * FLOAT32_EPS for f, c in zip(factors, conds, strict=True)]
        bounds = [sum(terms[i : i + per_checkpoint]) for i in range(0, len(terms), per_checkpoint)]
        c = int(np.argmax(bounds))
        return bounds[c], conds[c * per_checkpoint : (c + 1) * per_checkpoint], c

    if worst(damping, [0.0 if low is None else low for _, low in ends], True)[0] <= WARN_ERROR:
        return  # even cond_seen's bound is under
    lambdas = lambdas_at(damping)
    bottoms = [
        smallest_from_inverse(x, lam) if low is None else low
        for (_, low), x, lam in zip(ends, inverses, lambdas, strict=True)
    ]
    if worst(damping, bottoms, True)[0] <= WARN_ERROR:
        return
    error, conds, checkpoint = worst(damping, bottoms, False)
    safe: float | None = damping
    while safe is not None:  # doublings: at most float64's 2^2098 range of dampings
        safe *= 2.0
        try:
            if worst(safe, bottoms, False)[0] <= SCORE_ERROR:
                break
        except ValueError:  # lambda beyond float64 (lambdas_at refuses it): no damping to name
            safe = None
    advice = "a larger damping" if safe is None else f"a damping of {safe:.3g} or more"
    sides = [x.shape[0] for x in inverses[checkpoint * per_checkpoint : (checkpoint + 1) * per_checkpoint]]
    if per_checkpoint == 2:
        what = (
            f"leaves checkpoint {checkpoint}'s K-FAC factors (B + lambda_B I) and (A + lambda_A I) condition numbers "
            f"of about {conds[0]:.3g} and {conds[1]:.3g}"
        )
        how = (
            f"the sum over the two factors of (4 + sqrt(side) / 2) x cond x 2^-24, sides {sides[0]} and {sides[1]}, "
            "each factor applied on its own"
        )
    else:
        what = f"leaves (R + lambda I) a condition number of about {conds[0]:.3g} (checkpoint {checkpoint})"
        how = f"(4 + sqrt(d) / 2) x cond x 2^-24, d = {sides[0]}, its dims"
    warnings.warn(
        f"whitening: damping {damping:.3g} {what}; whitened scores are float32, so they may be off by up to about "
        f"{error:.2g} of the largest score ({how}, whatever fit's precision); {advice} keeps that within "
        f"{SCORE_ERROR:.2g} (Whitening.with_damping)",
        RuntimeWarning,
        stacklevel=4,  # the caller of fit or with_damping
    )
