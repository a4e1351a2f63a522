"""Is a top-k result right? Checked in float64 against a reference result, forgiving only ties.

Two results for a row agree when they select the same train rows, or when their exact (float64)
scores, sorted, agree within the float32 contract of docs/architecture.md (so they differ only by which of
(nearly) equally scored rows they kept). Anything else is a wrong row: a fast but wrong kernel
cannot pass.
"""

from __future__ import annotations

import numpy as np

RELATIVE_TOLERANCE = 1e-5  # docs/architecture.md: |ours - exact| <= 1e-5 * |g(t)| * |g(i)| for float32
_GATHER_ELEMENTS = 1 << 22  # float64 elements gathered per row block (32 MiB)


def row_norms(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """float64 (n,) Euclidean norms of the rows of x (any float dtype), a block at a time."""
    out = np.empty(x.shape[0])
    for a in range(0, x.shape[0], block):
        out[a : a + block] = np.linalg.norm(x[a : a + block].astype(np.float64), axis=1)
    return out


def _exact(test: np.ndarray, train: np.ndarray, rows: slice, indices: np.ndarray) -> np.ndarray:
    q = test[rows].astype(np.float64)
    return np.einsum("rd,rkd->rk", q, train[indices].astype(np.float64))


def _well_formed(indices: np.ndarray, values: np.ndarray, m: int, k: int, n: int, descending: bool) -> str | None:
    if indices.shape != (m, k) or values.shape != (m, k):
        return f"shape {indices.shape} / {values.shape}, expected {(m, k)}"
    if indices.min(initial=0) < 0 or indices.max(initial=0) >= n:
        return "index out of range"
    if np.any(np.diff(np.sort(indices, axis=1), axis=1) == 0):
        return "a train row selected twice"
    steps = np.diff(values, axis=1)
    if np.any(steps > 0 if descending else steps < 0):
        return "values not sorted best first"
    return None


def check_top_k(test: np.ndarray, train: np.ndarray, ours: tuple, reference: tuple, side: str = "proponents") -> dict:
    """Compares one side's top-k result `ours` = (values (m, k), indices (m, k)) with `reference`.

    test (m, d) and train (n, d) are the data both results are about (weights folded in, factors
    materialised). Returns counts of identical rows, rows equal up to ties, wrong rows, the
    largest error of our reported values against the exact scores (relative to |q| max|x|), and
    ok (no wrong rows, values within the tolerance, well formed).
    """
    values, indices = (np.asarray(a) for a in ours)
    ref_indices = np.asarray(reference[1])
    m, k = ref_indices.shape
    descending = side == "proponents"
    problem = _well_formed(indices, values, m, k, train.shape[0], descending)
    if problem:
        return {"rows": m, "ok": False, "problem": problem}
    scale = row_norms(test) * row_norms(train).max() + np.finfo(np.float64).tiny
    identical = tie_only = wrong = 0
    value_error = 0.0
    step = max(1, _GATHER_ELEMENTS // max(1, k * test.shape[1]))
    for a in range(0, m, step):
        rows = slice(a, min(a + step, m))
        ours_exact = _exact(test, train, rows, indices[rows])
        ref_exact = _exact(test, train, rows, ref_indices[rows])
        s = scale[rows, None]
        value_error = max(value_error, float(np.max(np.abs(values[rows] - ours_exact) / s)))
        same = np.all(np.sort(indices[rows], axis=1) == np.sort(ref_indices[rows], axis=1), axis=1)
        sign = -1.0 if descending else 1.0
        gap = np.abs(np.sort(sign * ours_exact, axis=1) - np.sort(sign * ref_exact, axis=1)) / s
        equivalent = np.all(gap <= 2 * RELATIVE_TOLERANCE, axis=1)
        identical += int(same.sum())
        tie_only += int((~same & equivalent).sum())
        wrong += int((~same & ~equivalent).sum())
    return {
        "rows": m,
        "identical_rows": identical,
        "tie_only_rows": tie_only,
        "wrong_rows": wrong,
        "max_value_error": value_error,
        "ok": wrong == 0 and value_error <= RELATIVE_TOLERANCE,
    }
