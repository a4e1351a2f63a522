"""Retrieval metrics of a score matrix against the passages that state each query's fact."""

from __future__ import annotations

import numpy as np

RECALL_AT = 10


def ranks(scores: np.ndarray, relevant: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Per query, the 1-based ranks of its relevant passages when passages are sorted by descending
    score (ties broken by one random order of the passages, drawn from `seed`, the same for every
    contender: a tie never favours the relevant passages)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores must be (queries={len(relevant)}, passages), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores: non-finite values")
    tiebreak = np.random.default_rng(seed).permutation(scores.shape[1])
    out = []
    for row, rel in zip(scores, relevant, strict=True):
        order = np.lexsort((tiebreak, -row))
        position = np.empty_like(order)
        position[order] = np.arange(1, len(order) + 1)
        out.append(position[rel])
    return out


def reciprocal_ranks(query_ranks: list[np.ndarray]) -> np.ndarray:
    """Per query, 1 / the rank of its first relevant passage."""
    return np.array([1.0 / r.min() for r in query_ranks])


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b over the same queries and its standard error (the paired comparison of two
    contenders' per-query values: far tighter than the two means' own errors)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def summary(query_ranks: list[np.ndarray], k: int = RECALL_AT) -> dict:
    """MRR (1 / rank of the first relevant passage) and recall@k (fraction of the relevant passages in
    the top k), mean over queries with standard errors (sample std / sqrt(queries))."""
    rr = reciprocal_ranks(query_ranks)
    recall = np.array([(r <= k).mean() for r in query_ranks])

    def mean_se(x: np.ndarray) -> tuple[float, float]:
        return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    (mrr, mrr_se), (rec, rec_se) = mean_se(rr), mean_se(recall)
    return {"mrr": mrr, "mrr_se": mrr_se, f"recall@{k}": rec, f"recall@{k}_se": rec_se}
