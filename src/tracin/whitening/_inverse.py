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
            "non-finite gradients); whitening needs finite, not all-zero gradients"
        )
    return mean


EXCESS = 0.01  # largest diagonal entry of (R + lambda I)^-1 times lambda accepted above 1 (rounding of R)


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
    or if an eigenvalue of the inverse found by _top_eigenvalue exceeds (1 + EXCESS) / lam: for a
    positive semidefinite R
    every eigenvalue of the inverse is at most 1 / lam, so R's rounding has made it indefinite by more
    than EXCESS x lam and the whitened rows would be wrong by up to that factor (measured: an excess of
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
    top = _top_eigenvalue(inverse) * lam
    if not top <= 1.0 + EXCESS:
        raise ValueError(
            f"{what}: (R + lambda I)^-1 has an eigenvalue {top:.4g} / lambda (lambda = {lam:.6g}), above the "
            "1 / lambda that bounds it for any positive semidefinite R: rounding in R exceeds lambda and the "
            "whitened rows would be wrong by up to that factor; " + rounding_hint(precision)
        )
    return inverse


_PROBE_VECTORS = 4  # subspace iteration of _top_eigenvalue: vectors (one is the largest diagonal's axis)
_PROBE_STEPS = 8  # and multiplications by X (each O(k^2) per vector; the inverse itself costs O(k^3))


def _top_eigenvalue(x: np.ndarray) -> float:
    """A lower bound on the largest eigenvalue of a symmetric (k, k) X, at least its largest diagonal
    entry: the largest Ritz value of X on a few vectors after a few steps of subspace iteration
    (deterministic: fixed seed). Any such value is a certificate, so it never overstates the largest
    eigenvalue beyond rounding."""
    k = x.shape[0]
    top = float(np.diagonal(x).max())
    v = np.random.default_rng(0).standard_normal((k, min(_PROBE_VECTORS, k)))
    v[:, 0] = 0.0
    v[int(np.argmax(np.diagonal(x))), 0] = 1.0
    for _ in range(_PROBE_STEPS):
        v = np.linalg.qr(x @ v)[0]
    ritz = np.linalg.eigvalsh(v.T @ x @ v)
    return max(top, float(ritz[-1]))


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
