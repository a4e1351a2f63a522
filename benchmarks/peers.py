"""The peers tracin is timed against, each behind one small top-k function.

Every function returns (values float32 (m, k), indices int64 (m, k)) for one side, best first, or
((prop values, prop indices), (opp values, opp indices)) for side="both", so that the exactness
check (benchmarks/exactness.py) reads them all alike. Thread counts are set by the caller
(`thread_limits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

Pair = tuple[np.ndarray, np.ndarray]


@contextmanager
def thread_limits(threads: int) -> Iterator[None]:
    """Every library's thread pool (BLAS, OpenMP incl. faiss's, torch) limited to `threads`."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def faiss_index(train: np.ndarray):
    """An IndexFlatIP holding `train` (float32 (n, d)); faiss copies the rows in."""
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train, dtype=np.float32))
    return index


def faiss_default_blas_threshold() -> int:
    """faiss's own `distance_compute_blas_threshold`: IndexFlatIP.search takes its BLAS path (sgemm
    of query blocks, then heaps) only for at least this many queries, else a loop of dot products."""
    import faiss

    return int(faiss.cvar.distance_compute_blas_threshold)


@contextmanager
def faiss_blas_threshold(threshold: int | None) -> Iterator[None]:
    """faiss's global `distance_compute_blas_threshold` set to `threshold` (None: left as it is),
    restored afterwards."""
    import faiss

    if threshold is None:
        yield
        return
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = threshold
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def faiss_top_k(index, test: np.ndarray, k: int, blas_threshold: int | None = None) -> Pair:
    """Proponents: one IndexFlatIP.search (with faiss's BLAS threshold set to `blas_threshold`)."""
    with faiss_blas_threshold(blas_threshold):
        values, indices = index.search(test, k)
    return values, indices


def faiss_both(
    index, test: np.ndarray, neg_test: np.ndarray, k: int, blas_threshold: int | None = None
) -> tuple[Pair, Pair]:
    """Both sides as a faiss user gets them: a search with q, another with -q (given ready)."""
    with faiss_blas_threshold(blas_threshold):
        prop = index.search(test, k)
        neg_values, opp_indices = index.search(neg_test, k)
    return prop, (-neg_values, opp_indices)


def _select_numpy(scores: np.ndarray, k: int, largest: bool) -> Pair:
    """argpartition for the k best per row, then a sort of those k only."""
    n = scores.shape[1]
    if largest:
        part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    else:
        part = np.argpartition(scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, 1)
    order = np.argsort(-values if largest else values, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1), np.take_along_axis(part, order, 1)


def numpy_top_k(test: np.ndarray, train: np.ndarray, k: int, side: str = "proponents"):
    """Q @ X.T, then argpartition + sort of the k (both sides share the one product)."""
    scores = test @ train.T
    if side == "proponents":
        return _select_numpy(scores, k, True)
    if side == "opponents":
        return _select_numpy(scores, k, False)
    return _select_numpy(scores, k, True), _select_numpy(scores, k, False)


def torch_top_k(test, train, k: int, side: str = "proponents"):
    """torch matmul + topk on tensors sharing memory with the NumPy inputs."""
    import torch

    scores = test @ train.T

    def one(largest: bool) -> Pair:
        values, indices = torch.topk(scores, k, dim=1, largest=largest, sorted=True)
        return values.numpy(), indices.numpy()

    if side == "proponents":
        return one(True)
    if side == "opponents":
        return one(False)
    return one(True), one(False)


def bare_sgemm(test: np.ndarray, train: np.ndarray) -> Callable[[], None]:
    """Q @ X.T into a preallocated output: the same product with nothing else, the machine's
    practical limit for any exact method."""
    out = np.empty((test.shape[0], train.shape[0]), dtype=np.float32)
    train_t = train.T

    def run() -> None:
        np.matmul(test, train_t, out=out)

    return run
