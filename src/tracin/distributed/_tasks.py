"""What the workers run: the single-machine kernel on one shard, and the merges of the results."""

from __future__ import annotations

import numpy as np

from .. import backends
from ..gradients import GradientSet, KernelSide
from ..scoring import (
    TopK,
    _chunks,
    _column_sums,
    _normalize_run,
    _pair,
    merge_top_k,
    pair_warnings_told,
    rows_shifted,
    self_influence,
    top_k,
)
from ._cluster import kernel_threads
from ._shards import StoreRows

Side = StoreRows | GradientSet  # a store shard named by path, or a (small) set sent by value
MERGE_BLOCK = 2**20  # (test rows x columns) a merge task sorts at once: ~40 MB of temporaries
SIDE_NAMES = {"proponents": ("proponents",), "opponents": ("opponents",), "both": ("proponents", "opponents")}


def _opened(side: Side) -> GradientSet:
    return side.open() if isinstance(side, StoreRows) else side


def top_k_part(
    test: Side,
    train: Side,
    k: int,
    side: str,
    offset: int,
    num_threads: int | None,
    normalize: bool,
) -> tuple[TopK, ...]:
    """tracin.top_k of one shard: a TopK per name in SIDE_NAMES[side], values float32 (m, <= k),
    indices int64 (m, <= k) shifted by `offset` (the shard's first train row)."""
    threads = kernel_threads(num_threads)
    with pair_warnings_told():  # the client warned once of the pair's records (_pair), not each shard
        found = top_k(_opened(test), _opened(train), k, side, num_threads=threads, progress=False, normalize=normalize)
    parts = tuple(found) if side == "both" else (found,)
    return tuple(p._replace(indices=p.indices + offset) for p in parts)


def merge_parts(parts: list[tuple[TopK, ...]], k: int, side: str) -> tuple[TopK, ...]:
    """Merges top_k_part results of disjoint train rows (global indices) into one per side."""
    return tuple(_merged([p[s] for p in parts], k, name) for s, name in enumerate(SIDE_NAMES[side]))


def _merged(found: list[TopK], k: int, side: str) -> TopK:
    """merge_top_k of `found` a block of test rows at a time (rows merge independently: the same
    result), into one preallocated TopK: the merge's temporaries stay near MERGE_BLOCK entries."""
    m, columns = found[0].values.shape[0], sum(f.values.shape[1] for f in found)
    step = max(1, MERGE_BLOCK // max(columns, 1))

    def rows(a: int) -> TopK:
        return merge_top_k(
            [TopK(f.values[a : a + step], f.indices[a : a + step]) for f in found], [0] * len(found), k=k, side=side
        )

    first = rows(0)
    out = TopK(*(np.empty((m, *x.shape[1:]), dtype=x.dtype) for x in first))
    for a in range(0, m, step):
        out.values[a : a + step], out.indices[a : a + step] = first if a == 0 else rows(a)
    return out


def self_influence_part(train: Side, num_threads: int | None, per_checkpoint: bool) -> np.ndarray:
    """tracin.self_influence of one shard: float32 (rows,), or (rows, C) with per_checkpoint."""
    threads = kernel_threads(num_threads)
    return self_influence(_opened(train), per_checkpoint=per_checkpoint, num_threads=threads, progress=False)


def column_sums_part(test: Side, sums: list[np.ndarray] | None, num_threads: int | None, run: int) -> list[np.ndarray]:
    """Full gradients' aggregate, first step, on one test shard: its rows' float64 column sums per
    checkpoint (cosine-scaled for run > 0) added chunk by chunk in row order to a copy of `sums`
    (the shards before it; None: zeros), as tracin.aggregate carries them across the test chunks:
    a chain of these over the shards in order gives its sums bit for bit."""
    sums = None if sums is None else [s.copy() for s in sums]  # a retried task starts from the same sums
    return _column_sums(backends.get("cpu"), _opened(test), sums, kernel_threads(num_threads), run)


def aggregate_sums_part(
    sums: list[np.ndarray], train: Side, weights: list[float], num_threads: int | None, run: int
) -> np.ndarray:
    """Full gradients' aggregate, second step, on one train shard: float64 (rows,) dot products of its
    rows with the weighted column sums of every test row (column_sums_part), chunk by chunk; the
    shard's rows of tracin.aggregate's float64 total bit for bit."""
    train_set, cpu, threads = _opened(train), backends.get("cpu"), kernel_threads(num_threads)
    out = np.zeros(train_set.n_rows, dtype=np.float64)
    for i0, i1 in _chunks(train_set):
        piece = KernelSide._make(train_set.kernel_side(i0, i1))
        try:
            out[i0:i1] = cpu.aggregate_sums(sums, piece, weights, num_threads=threads, normalize=run)
        except ValueError as e:
            message = rows_shifted(str(e), 0, i0)
            if message is None:
                raise
            raise ValueError(message) from None
    return out


def aggregate_part(
    test: Side, train: Side, num_threads: int | None, normalize: bool, per_test_chunk: bool
) -> np.ndarray:
    """Factored gradients: the kernel's float64 sums over each chunk of test rows (as tracin.aggregate cuts them; cosine
    scores with normalize), added in order from zero per train row: float64 (train rows,), the
    shard's share of tracin.aggregate's float64 total bit for bit. per_test_chunk: float64 (test
    chunks, train rows) instead, one row per chunk, for the caller to add in order after the rows of
    the test shards before this one."""
    with pair_warnings_told():  # the client warned once of the pair's records (_pair), not each shard
        test_set, train_set, w = _pair(_opened(test), _opened(train))
    run = _normalize_run(normalize, test_set, train_set)
    threads, cpu = kernel_threads(num_threads), backends.get("cpu")
    test_chunks = _chunks(test_set)
    out = np.zeros((len(test_chunks), train_set.n_rows) if per_test_chunk else train_set.n_rows, dtype=np.float64)
    for j, (t0, t1) in enumerate(test_chunks):
        t_side, total = test_set.kernel_side(t0, t1), out[j] if per_test_chunk else out
        for i0, i1 in _chunks(train_set):
            try:
                total[i0:i1] += cpu.aggregate(
                    t_side, train_set.kernel_side(i0, i1), w, num_threads=threads, normalize=run
                )
            except ValueError as e:  # rows counted from the chunks' starts: from the shard's instead
                message = rows_shifted(str(e), t0, i0)
                if message is None:
                    raise
                raise ValueError(message) from None
    return out


def add_in_order(partials: np.ndarray, total: np.ndarray | None = None) -> np.ndarray:
    """float64 `total` (None: zeros) plus the rows of (c, n) partials, added one after another (not
    pairwise, as np.sum would), the order tracin.aggregate adds its test chunks in; a new array."""
    total = np.zeros(partials.shape[1], dtype=np.float64) if total is None else total.copy()
    for row in partials:
        total += row
    return total
