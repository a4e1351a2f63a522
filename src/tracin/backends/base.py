"""The scoring backend protocol and the result types it speaks in.

A backend scores one test chunk against one train piece at a time; the generic loop in
tracin.scoring cuts the sets into pieces, merges top-k across pieces, sums aggregates and
drives the progress bar, so a backend holds no state across pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from ..gradients import KernelSide


class TopK(NamedTuple):
    """values float32 (m, k) and indices int64 (m, k) into the train rows, best first per row."""

    values: np.ndarray
    indices: np.ndarray


class BothSides(NamedTuple):
    """Proponents (largest first) and opponents (most negative first) from one pass."""

    proponents: TopK
    opponents: TopK


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
    """

    name: str

    def scores(
        self, test: KernelSide, train: KernelSide, weights: Sequence[float], *, num_threads: int, normalize: int = 0
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
    ) -> tuple[TopK | None, TopK | None]:
        """(proponents, opponents) of this train piece, each (m, k) with indices local to the piece,
        or None for a side not asked for. side: "proponents", "opponents" or "both"; k <= n.
        Proponents descending, opponents ascending, ties to the smaller index."""

    def self_influence(self, train: KernelSide, weights: Sequence[float], *, num_threads: int) -> np.ndarray:
        """float32 (n,): sum_c w_c |train_c[i]|^2."""

    def aggregate(
        self, test: KernelSide, train: KernelSide, weights: Sequence[float], *, num_threads: int, normalize: int = 0
    ) -> np.ndarray:
        """float64 (n,): sum over the test rows of the scores, for the caller to sum across chunks."""
