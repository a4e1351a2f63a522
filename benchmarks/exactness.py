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


def check_top_k(
    test: np.ndarray,
    train: np.ndarray,
    ours: tuple,
    reference: tuple,
    side: str = "proponents",
    max_train_norm: float | None = None,
) -> dict:
    """Compares one side's top-k result `ours` = (values (m, k), indices (m, k)) with `reference`.

    test (m, d) and train (n, d) are the data both results are about (weights folded in, factors
    materialised). Returns counts of identical rows, rows equal up to ties, wrong rows, the
    largest error of our reported values against the exact scores (relative to |q| max|x|), and
    ok (no wrong rows, values within the tolerance, well formed). max_train_norm: max |x| over train's
    rows where the caller has it (else read from train: a pass over all of it).
    """
    values, indices = (np.asarray(a) for a in ours)
    ref_indices = np.asarray(reference[1])
    m, k = ref_indices.shape
    descending = side == "proponents"
    problem = _well_formed(indices, values, m, k, train.shape[0], descending)
    if problem:
        return {"rows": m, "ok": False, "problem": problem}
    largest = row_norms(train).max() if max_train_norm is None else max_train_norm
    scale = row_norms(test) * largest + np.finfo(np.float64).tiny
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


class SampledReference:
    """The exact (float64) top-k of a sample of test rows, to check top-k results of all m rows on that
    sample: a check of a large problem at the cost of `count` rows.

    test (m, d) and train (n, d) float arrays (train may be an np.memmap); the reference is computed
    once per side, train converted to float64 `block` rows at a time.
    """

    def __init__(self, test: np.ndarray, train: np.ndarray, k: int, sides: tuple[str, ...], count: int = 32):
        self.test, self.train = test, train
        self.rows = np.unique(np.linspace(0, test.shape[0] - 1, min(count, test.shape[0])).astype(np.int64))
        self.reference = {side: _exact_top_k(test[self.rows], train, k, side) for side in sides}
        self.max_train_norm = float(row_norms(train).max(initial=0.0))  # once: every check needs it

    def check(self, values: np.ndarray, indices: np.ndarray, side: str = "proponents") -> dict:
        """check_top_k of one side's result (values (m, k'), indices (m, k'), k' <= the reference's k)
        on the sampled rows."""
        k = np.shape(indices)[1]
        ref_values, ref_indices = (a[:, :k] for a in self.reference[side])
        ours = (np.asarray(values)[self.rows], np.asarray(indices)[self.rows])
        return check_top_k(self.test[self.rows], self.train, ours, (ref_values, ref_indices), side, self.max_train_norm)


def _exact_top_k(test: np.ndarray, train: np.ndarray, k: int, side: str, block: int = 65536) -> tuple:
    """float64 (values (m, k), indices (m, k)), best first: the k largest (proponents) or smallest
    (opponents) exact scores test @ train.T per row."""
    sign = 1.0 if side == "proponents" else -1.0
    q = np.asarray(test, np.float64)
    best = np.empty((q.shape[0], 0))
    best_at = np.empty((q.shape[0], 0), np.int64)
    for a in range(0, train.shape[0], block):
        scores = sign * (q @ np.asarray(train[a : a + block], np.float64).T)
        best = np.concatenate([best, scores], axis=1)
        best_at = np.concatenate([best_at, np.broadcast_to(np.arange(a, a + scores.shape[1]), scores.shape)], axis=1)
        if best.shape[1] > k:
            keep = np.argpartition(-best, k - 1, axis=1)[:, :k]
            best, best_at = np.take_along_axis(best, keep, 1), np.take_along_axis(best_at, keep, 1)
    order = np.argsort(-best, axis=1, kind="stable")
    return sign * np.take_along_axis(best, order, 1), np.take_along_axis(best_at, order, 1)
