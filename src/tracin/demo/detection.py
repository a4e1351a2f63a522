"""Mislabel detection curves: the fraction of flipped labels found against the fraction inspected."""

from __future__ import annotations

import numpy as np


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """float64 (n + 1,): fraction of all flipped examples found among the top-i by score (the recall
    after inspecting i examples), i = 0..n (inspecting the highest scores first; ties broken by index)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    found = np.concatenate([[0], np.cumsum(flipped[order])])
    return found / max(int(flipped.sum()), 1)


def found_at(curve: np.ndarray, fraction: float) -> float:
    """Fraction of flipped labels found after inspecting `fraction` of the training set."""
    n = len(curve) - 1
    return float(curve[int(round(fraction * n))])


def random_curve(n: int, flipped_count: int) -> np.ndarray:
    """Expected curve of inspecting in random order: a straight line."""
    return np.linspace(0.0, 1.0, n + 1) if flipped_count else np.zeros(n + 1)


def perfect_curve(n: int, flipped_count: int) -> np.ndarray:
    """The best possible curve: every inspected example is a flipped one until all are found."""
    return np.minimum(np.arange(n + 1) / flipped_count, 1.0) if flipped_count else np.zeros(n + 1)
