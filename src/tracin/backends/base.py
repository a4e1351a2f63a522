"""The scoring backend protocol and the result types it speaks in.

A backend scores one test chunk against one train piece at a time; the generic loop in
tracin.scoring cuts the sets into pieces, merges top-k across pieces, sums aggregates and
drives the progress bar. A backend holds no state of its own across pieces: what it derives from a
test chunk and reuses for that chunk's next pieces (a device copy, scaled rows, a running top-k
selection) goes in the ChunkCache the loop hands it, which lives for one public call.

Two optional capabilities: a backend whose class has a `top_k_running` method (KeepsTopK; the torch
device backend) keeps each test chunk's best k across the train pieces itself, and the loop calls that
instead of `top_k` and its host merge per piece (scoring.top_k). Backends without it (the C++
kernel) are merged on the host, piece by piece. One whose class has `column_sums` and
`aggregate_sums` (SumsColumns: both built-in backends) aggregates full gradients from the test side's
column sums, taken once over all its chunks, in one pass over the train rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np

from ..gradients import KernelSide

_T = TypeVar("_T")


class TopK(NamedTuple):
    """values float32 (m, k) and indices int64 (m, k) into the train rows, best first per row."""

    values: np.ndarray
    indices: np.ndarray


class BothSides(NamedTuple):
    """Proponents (the k highest scores, largest first) and opponents (the k lowest, smallest first) from one pass."""

    proponents: TopK
    opponents: TopK


class ChunkCache:
    """What backends derive from the current test chunk (device copies, scaled rows, inverse norms),
    kept while the generic loop's pairs share that chunk. The loop owns one per public call: it calls
    `use(chunk)` before each pair (a new chunk drops the previous one's items) and `clear()` at the end,
    so nothing outlives the call. A backend called without one (cache=None) derives everything again.

    Two things last for the whole call instead: items kept with `keep` (a device backend's staging
    buffers for train rows), and `next_train`, which the loop sets before each pair to the train side
    of the pair after it (the very object that pair will pass; None on the last pair), so that a device
    backend can start the next piece's upload while it computes on this one. A backend may ignore both.
    """

    def __init__(self) -> None:
        self._chunk: Hashable = None
        self._items: dict[Hashable, Any] = {}
        self._kept: dict[Hashable, Any] = {}
        self.next_train: KernelSide | None = None

    def use(self, chunk: Hashable) -> None:
        """The next pairs use the test chunk `chunk` (e.g. its row range in the set)."""
        if chunk != self._chunk:
            self._items.clear()
            self._chunk = chunk

    def get(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """The item `key` of the current chunk (the backend's name and options), made on first use."""
        if key not in self._items:
            self._items[key] = make()
        return self._items[key]

    def keep(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """The item `key` of the whole call, whatever the test chunk, made on first use."""
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def drop(self, key: Hashable) -> None:
        """Forgets the current chunk's item `key`, if any (its memory is freed once nothing else refers to it)."""
        self._items.pop(key, None)

    def clear(self) -> None:
        """Drops every item (device memory is freed once nothing else refers to it)."""
        self._items.clear()
        self._kept.clear()
        self._chunk = None
        self.next_train = None


class Backend(Protocol):
    """What a scoring backend does with one (test chunk, train piece) pair.

    Sides are KernelSide rows of equal dims; weights are the float64 checkpoint weights w_c, one
    per checkpoint; num_threads is the CPU thread count (0: all cores), which a device backend
    may ignore. normalize (scores, top_k, aggregate): 0 for plain scores; L > 0 for cosine scores,
    each row's gradient unit-normalised over every run of L consecutive checkpoint slots (one real
    checkpoint's layers), norms summed in float64 per row, a zero gradient scoring 0:
    entry (t, i) = sum_c w_c <test_c[t], train_c[i]> / (|test[t]|_run(c) |train[i]|_run(c)).
    Non-finite inputs, or results that overflow float32, raise ValueError naming the
    side, checkpoint and rows. Results must not depend on num_threads or on how rows are pieced.
    cache: the loop's ChunkCache for the current test chunk (and the call's next train piece), or None;
    a backend may keep there what it derives from `test` and must give the same results either way.
    """

    name: str

    def scores(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        """float32 (m, n): entry (t, i) = sum_c w_c <test_c[t], train_c[i]>."""

    def top_k(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        k: int,
        side: str,
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> tuple[TopK | None, TopK | None]:
        """(proponents, opponents) of this train piece, each (m, k) with indices local to the piece,
        or None for a side not asked for. side: "proponents", "opponents" or "both"; k <= n.
        Proponents descending, opponents ascending, ties to the smaller index. The arrays are the
        caller's (writable, shared with nothing kept): the loop shifts the indices in place."""

    def self_influence(
        self, train: KernelSide, weights: Sequence[float], *, num_threads: int, cache: ChunkCache | None = None
    ) -> np.ndarray:
        """float32 (n,): sum_c w_c |train_c[i]|^2."""

    def aggregate(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        """float64 (n,): sum over the test rows of the scores, for the caller to sum across chunks."""


class KeepsTopK(Protocol):
    """The optional capability of a backend that keeps the running top-k of a test chunk across the
    generic loop's train pieces (on its device: no host merge, one readback per test chunk). The loop
    uses it where the backend's class has a `top_k_running` method (looked up on the type, so that a
    backend's __getattr__ is not asked) and the train set has fewer than 2^32 rows."""

    def top_k_running(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        k: int,
        side: str,
        *,
        first: int,
        last: bool,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache,
    ) -> tuple[TopK | None, TopK | None] | None:
        """Merges the train piece `train`, rows [first, first + n) of the call's train set, into the
        current test chunk's best k, kept in `cache` (required) as the chunk's item: a piece with
        first == 0 starts the chunk's selection anew. Returns None unless `last` (the chunk's last
        piece); then (proponents, opponents) of the chunk over every piece merged since its first, as
        top_k's, indices global, min(k, first + n) columns (None for a side not asked for), and the
        selection is dropped from the cache. k: the call's k (not capped by the piece's rows).
        Equal to the host merge of top_k per piece (scoring._select), ties to the smaller global index."""


class SumsColumns(Protocol):
    """The optional capability of a backend that aggregates full gradients in two steps, so that the
    generic loop reads each side once ((m + n) x d work) instead of the train rows once per test
    chunk: column_sums over the test chunks in turn, then aggregate_sums per train piece. The loop
    uses it where the backend's class has both methods (looked up on the type, as KeepsTopK), else
    `aggregate` per (test chunk, train piece)."""

    def column_sums(self, test: KernelSide, sums: Any, *, num_threads: int, normalize: int = 0) -> Any:
        """Full gradients' aggregate, first step: the running float64 column sums per checkpoint of the
        test rows seen so far (cosine scores: each row scaled by its inverse norm over each run) with
        this chunk's rows added in row order; `sums` None starts them at zero, else it is what the
        previous chunk's call returned (which it may update in place). The form is the backend's own.
        NaN or Inf in `test` raises ValueError naming its side, checkpoint and rows."""

    def aggregate_sums(
        self,
        sums: Any,
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        """Full gradients' aggregate, second step: float64 (n,) aggregate of the train piece against
        every test row summed by column_sums (the train rows' dot products with the weighted sums);
        the same as `aggregate` of all those test rows at once, whatever the chunks and pieces."""
