"""The two ground-truth scores: flipped labels found per fraction inspected, and the linear
datamodeling score (Park et al. 2023)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def inspected_count(n: int, fraction: float) -> int:
    return int(round(fraction * n))


def found_fractions(scores: np.ndarray, flipped: np.ndarray, fractions: tuple[float, ...]) -> list[float]:
    """Fraction of the flipped examples among the round(q * n) highest `scores` (ties: lower index
    first), for each q in `fractions`. scores: (n,); flipped: bool (n,)."""
    total = int(flipped.sum())
    if total == 0:
        raise ValueError("flipped marks no example: there is nothing to find")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.cumsum(flipped[order])
    return [
        float(hits[inspected_count(len(order), q) - 1] / total) if inspected_count(len(order), q) else 0.0
        for q in fractions
    ]


def perfect_fractions(n: int, n_flipped: int, fractions: tuple[float, ...]) -> list[float]:
    """What a detector that ranks every flipped example first finds."""
    if n_flipped < 1:
        raise ValueError(f"n_flipped must be at least 1, got {n_flipped}")
    return [min(1.0, inspected_count(n, q) / n_flipped) for q in fractions]


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (m,) Spearman correlation between column j of a and of b ((M, m) each); 0 where a
    column is constant (no ranking, no correlation)."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / np.where(denom > 0, denom, 1.0), 0.0)


def lds(attributions: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> dict:
    """Linear datamodeling score of attributions (m, n) against subset models: masks bool (M, n)
    (training rows of each), losses (M, m) (their test losses). The prediction for subset S is the
    summed attribution over S; lower loss is better, so it is correlated with -loss.
    Returns {"mean", "se", "per_example"} over the m test examples."""
    predicted = masks.astype(np.float64) @ np.asarray(attributions, dtype=np.float64).T
    rho = spearman_columns(predicted, -np.asarray(losses, dtype=np.float64))
    return {"mean": float(rho.mean()), "se": float(rho.std(ddof=1) / np.sqrt(len(rho))), "per_example": rho.tolist()}
