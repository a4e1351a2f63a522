"""Damping relative to the mean eigenvalue, and the damped inverse (R + lambda I)^-1 by Cholesky."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def check_damping(damping: Any) -> float:
    """`damping` as a finite float > 0 (TypeError / ValueError naming the argument otherwise)."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"damping must be a positive number (a multiple of the mean eigenvalue), got {damping!r}")
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(
            f"damping must be a finite number > 0 (a multiple of the mean eigenvalue of R), got {damping!r}"
        )
    return float(damping)


def mean_eigenvalue(r: np.ndarray, what: str) -> float:
    """trace(r) / side of a float64 second moment; ValueError if it is not a finite positive number."""
    mean = float(np.trace(r)) / r.shape[0]
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(
            f"{what}: the gradients' second moment has mean eigenvalue {mean} (all-zero or "
            "non-finite gradients); whitening needs finite, not all-zero gradients: all-zero gradients add "
            "nothing to any score, so drop that checkpoint from the train, test and mix sets"
        )
    return mean


EXCESS = 0.01  # largest eigenvalue of (R + lambda I)^-1 times lambda accepted above 1 (rounding of R)


def rounding_hint(precision: str | None) -> str:
    """What to do when R's rounding exceeds lambda, by the precision R was summed in."""
    if precision == "float32":
        return (
            "R was summed from float32 products (precision='float32', the default), whose rounding (about "
            "2^-24 of R's largest entries) is the likely cause: fit with precision='float64', or use a larger damping"
        )
    if precision == "float64":
        return "R's float64 rounding exceeds lambda: use a larger damping"
    return "fit with precision='float64' if R was summed in float32, or use a larger damping"


def damped_inverse(r: np.ndarray, lam: float, what: str, precision: str | None = None) -> np.ndarray:
    """float64 (R + lam I)^-1 of a symmetric (k, k) R, as L^-T L^-1 with L the Cholesky factor
    (symmetric by construction); R is left as it is. `precision` (the dtype R's products were summed
    from; None: unknown) picks the advice in errors. ValueError if R + lam I is not positive definite,
    or if the inverse fails check_top_eigenvalue: for a positive semidefinite R every eigenvalue of
    the inverse is at most 1 / lam, so R's rounding has made it indefinite by more than about
    EXCESS x lam and the whitened rows would be wrong by up to that factor (measured: an excess of
    11% in the top eigenvalue gave scores 114% off the float64 ones)."""
    shifted = r.copy()
    shifted[np.diag_indices_from(shifted)] += lam
    try:
        lower = np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{what}: R + lambda I is not positive definite (lambda = {lam:.6g}): rounding in R exceeds lambda; "
            + rounding_hint(precision)
        ) from None
    del shifted
    inv_lower = lower_inverse(lower)
    inverse = inv_lower.T @ inv_lower  # NumPy computes a.T @ a as a symmetric rank-k update
    check_top_eigenvalue(inverse, lam, what, precision)
    return inverse


def check_top_eigenvalue(x: np.ndarray, lam: float, what: str, precision: str | None = None) -> None:
    """ValueError if the symmetric (k, k) X = (R + lam I)^-1 has an eigenvalue above (1 + EXCESS) / lam,
    which no positive semidefinite R allows. Exact (to about k x 2^-53 of it) up to k = EXACT_SIDE, where a
    Cholesky factorization of (1 + EXCESS) / lam I - X decides it: 0.02-0.05 ms for k <= 64 (many small
    K-FAC factors; the inversion itself 0.04-0.25 ms), about 16% of the inversion at k = 256. Above, the
    top Ritz value of LANCZOS_STEPS steps of Lanczos (one product by X each, about 10% of the inversion
    at k = 1024-4096, 1 BLAS thread) is a lower bound on the largest eigenvalue, so it never fires
    falsely; on rank-deficient float32 R (1024 or 2048 dims, 256 rows), where the top eigenvalues form a
    large cluster near 1 / lam, it came within 4e-4 of eigvalsh's value, so there the bar is 1.01 / lam
    to within 0.05% (a contrived spectrum, one eigenvalue at 1.011 / lam just above a dense cluster at
    k = 4096, was found 0.14% short and passed)."""
    bound = (1.0 + EXCESS) / lam
    top = _top_above(x, bound)
    if top is not None:
        raise ValueError(
            f"{what}: (R + lambda I)^-1 has an eigenvalue {top * lam:.4g} / lambda (lambda = {lam:.6g}), above the "
            "1 / lambda that bounds it for any positive semidefinite R: rounding in R exceeds lambda and the "
            "whitened rows would be wrong by up to that factor; " + rounding_hint(precision)
        )


EXACT_SIDE = 256  # side up to which check_top_eigenvalue is exact (a Cholesky); above, Lanczos
LANCZOS_STEPS = 32  # Lanczos steps above EXACT_SIDE (one product by X each; the inverse itself costs O(k^3))


def _top_above(x: np.ndarray, bound: float) -> float | None:
    """The largest eigenvalue of a symmetric (k, k) X if it exceeds `bound` (as far as check_top_eigenvalue
    finds; for k > EXACT_SIDE a lower bound on it), else None."""
    k = x.shape[0]
    if k <= EXACT_SIDE:
        margin = -x
        margin[np.diag_indices_from(margin)] += bound
        try:
            np.linalg.cholesky(margin)
            return None
        except np.linalg.LinAlgError:
            top = float(np.linalg.eigvalsh(x)[-1])  # only to say it; O(k^3) is small at this side
            return top if top > bound else None
    top = max(float(np.diagonal(x).max()), lanczos_top(x, LANCZOS_STEPS))
    return top if top > bound else None


def lanczos_top(x: np.ndarray, steps: int) -> float:
    """The largest Ritz value of a symmetric (k, k) X on the Krylov space of `steps` products from a
    fixed random vector (Lanczos with full reorthogonalization, twice per step): at most X's largest
    eigenvalue, beyond rounding, and close to it after a few tens of steps."""
    k = x.shape[0]
    steps = min(steps, k)
    basis = np.empty((steps, k))  # rows: contiguous vectors
    alpha, beta = np.zeros(steps), np.zeros(steps)
    v = np.random.default_rng(0).standard_normal(k)
    basis[0] = v / np.linalg.norm(v)
    done = steps
    for j in range(steps):
        w = x @ basis[j]
        alpha[j] = basis[j] @ w
        for _ in range(2):
            w -= (basis[: j + 1] @ w) @ basis[: j + 1]
        if j + 1 == steps:
            break
        beta[j] = np.linalg.norm(w)
        if not beta[j] > 1e-12 * np.abs(alpha[: j + 1]).max():  # an invariant subspace: its Ritz values are exact
            done = j + 1
            break
        basis[j + 1] = w / beta[j]
    t = np.diag(alpha[:done]) + np.diag(beta[: done - 1], 1) + np.diag(beta[: done - 1], -1)
    return float(np.linalg.eigvalsh(t)[-1])


TRIANGLE_BASE = 128  # side below which lower_inverse inverts directly (LAPACK); above, halves by matrix products


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """float64 inverse of a nonsingular lower-triangular (k, k) matrix, by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]; about 2k^3/3 flops in matrix products,
    a quarter of a general inverse's."""
    k = lower.shape[0]
    if k <= TRIANGLE_BASE:
        return np.linalg.inv(lower)
    h = k // 2
    out = np.zeros_like(lower)
    out[:h, :h] = lower_inverse(lower[:h, :h])
    out[h:, h:] = lower_inverse(lower[h:, h:])
    out[h:, :h] = -(out[h:, h:] @ (lower[h:, :h] @ out[:h, :h]))
    return out
