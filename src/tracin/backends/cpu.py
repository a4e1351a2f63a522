"""The CPU backend: the C++ kernel tracin._core (blocked tiles, its own threads, GIL released).

It keeps nothing in the loop's ChunkCache: the kernel reads test rows in place and packs them into
its tiles per call, which is part of its blocked GEMM. Aggregate of full gradients runs in two steps
(column_sums per test chunk, into float64 arrays carried across the chunks; aggregate_sums per train
piece), the bits of one _core.aggregate call however the sides are cut. A num_threads above the CPUs this process may
run on (tracin._cpus.usable_cores) is capped at them (tracin._validate.capped_threads, which projection
shares): the kernel computes on every thread it starts and gives each its own tiles and top-k
candidate buffers, so more threads than cores cost memory and time (4096 threads on 2 cores: 19 s
and 4.2 GiB against 1.3 s and 219 MiB) and gain nothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _core
from .._validate import capped_threads
from ..gradients import KernelSide
from .base import ChunkCache, TopK

_SIDE_CODES = {"proponents": 0, "opponents": 1, "both": 2}  # csrc/include/tracin/tracin.hpp: Side


class CpuBackend:
    """Scores row-major float32 / float16 / bfloat16 blocks in place, without copies."""

    name = "cpu"

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
        return _core.scores(test, train, weights, num_threads=capped_threads(num_threads), normalize=normalize)

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
        pv, pi, ov, oi = _core.top_k(
            test, train, weights, k, _SIDE_CODES[side], num_threads=capped_threads(num_threads), normalize=normalize
        )
        return (TopK(pv, pi) if side != "opponents" else None, TopK(ov, oi) if side != "proponents" else None)

    def self_influence(
        self, train: KernelSide, weights: Sequence[float], *, num_threads: int, cache: ChunkCache | None = None
    ) -> np.ndarray:
        return _core.self_influence(train, weights, num_threads=capped_threads(num_threads))

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
        return _core.aggregate(test, train, weights, num_threads=capped_threads(num_threads), normalize=normalize)

    def column_sums(
        self, test: KernelSide, sums: list[np.ndarray] | None, *, num_threads: int, normalize: int = 0
    ) -> list[np.ndarray]:
        if sums is None:
            sums = [np.zeros(b.shape[1], dtype=np.float64) for b in test.blocks]
        _core.column_sums(test, sums, num_threads=capped_threads(num_threads), normalize=normalize)
        return sums

    def aggregate_sums(
        self,
        sums: list[np.ndarray],
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        return _core.aggregate_sums(sums, train, weights, num_threads=capped_threads(num_threads), normalize=normalize)
