"""Independent float64 NumPy reference for TracIn and the scale-aware error bound of docs/architecture.md."""

from __future__ import annotations

import numpy as np


def to_float64(a) -> np.ndarray:
    """float64 copy of a NumPy / ml_dtypes / torch array."""
    if type(a).__module__.startswith("torch"):
        a = a.detach().float().numpy()
    return np.asarray(a).astype(np.float64)


def exact_scores(test: list, train: list, weights) -> np.ndarray:
    """(m, n) float64: sum_c w_c * test[c] @ train[c].T."""
    return sum(w * to_float64(t) @ to_float64(x).T for w, t, x in zip(weights, test, train, strict=True))


def score_bound(test: list, train: list, weights) -> np.ndarray:
    """(m, n): 1e-5 * sum_c |w_c| |g_c(t)| |g_c(i)| — the allowed |ours - exact| per entry."""
    return sum(
        1e-5 * abs(w) * np.outer(np.linalg.norm(to_float64(t), axis=1), np.linalg.norm(to_float64(x), axis=1))
        for w, t, x in zip(weights, test, train, strict=True)
    )


def factored_to_full(left: list, right: list) -> list:
    """Per checkpoint the (n, p*q) gradients whose rows are the outer products left[i] (x) right[i]."""
    return [
        np.einsum("np,nq->npq", to_float64(a), to_float64(b)).reshape(len(a), -1)
        for a, b in zip(left, right, strict=True)
    ]


def assert_close_to_exact(ours: np.ndarray, test: list, train: list, weights) -> None:
    exact = exact_scores(test, train, weights)
    bound = score_bound(test, train, weights)
    err = np.abs(ours.astype(np.float64) - exact)
    assert ours.shape == exact.shape, (ours.shape, exact.shape)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), f"error {err[worst]} exceeds bound {bound[worst]} at {worst}"
