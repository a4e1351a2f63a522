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


def damped_inverse(r: np.ndarray, lam: float, what: str) -> np.ndarray:
    """float64 (R + lam I)^-1 of a symmetric (k, k) R, as L^-T L^-1 with L the Cholesky factor
    (symmetric by construction); R is left as it is."""
    shifted = r.copy()
    shifted[np.diag_indices_from(shifted)] += lam
    try:
        lower = np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{what}: R + lambda I is not positive definite (lambda = {lam}); the gradients "
            "hold non-finite values, or damping is too small for float64"
        ) from None
    del shifted
    inv_lower = lower_inverse(lower)
    return inv_lower.T @ inv_lower  # NumPy computes a.T @ a as a symmetric rank-k update


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
