"""The machine's limits, measured with NumPy, and the roofline bound of a piece of work.

Peak: the best of a few large square float32 matmuls (BLAS sgemm) at a given thread count.
Bandwidth: the best of a few sums over a large float32 array, split over threads (a read stream,
which is what scoring a large train side needs). A piece of work of F FLOPs that must move B bytes
cannot take less than max(F / peak, B / bandwidth).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def peak_sgemm_gflops(threads: int, size: int = 2048, repeats: int = 3) -> float:
    """Best GFLOP/s of a (size x size) @ (size x size) float32 product with `threads` BLAS threads."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    best = float("inf")
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def read_bandwidth_gbs(threads: int, nbytes: int = 1 << 29, repeats: int = 3) -> float:
    """Best GB/s (1e9 bytes) of summing an `nbytes` float32 array, one contiguous part per thread."""
    data = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.add.reduce, parts))
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.add.reduce, parts))  # ufunc reductions release the GIL
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9


def _monotone(measured: dict[int, float]) -> dict[str, float]:
    """More threads can always run as fewer: each limit is at least that of any smaller count."""
    out, best = {}, 0.0
    for t in sorted(measured):
        best = max(best, measured[t])
        out[str(t)] = best
    return out


def machine_limits(threads: list[int], quick: bool = False) -> dict:
    """{"peak_sgemm_gflops": {t: ...}, "read_bandwidth_gbs": {t: ...}} for each thread count,
    plus the raw measurements (the limits are made non-decreasing in t)."""
    size, nbytes, repeats = (512, 1 << 25, 3) if quick else (2048, 1 << 29, 5)
    peak = {t: peak_sgemm_gflops(t, size, repeats) for t in threads}
    bandwidth = {t: read_bandwidth_gbs(t, nbytes, repeats) for t in threads}
    return {
        "peak_sgemm_gflops": _monotone(peak),
        "read_bandwidth_gbs": _monotone(bandwidth),
        "measured": {"peak_sgemm_gflops": {str(t): v for t, v in peak.items()},
                     "read_bandwidth_gbs": {str(t): v for t, v in bandwidth.items()}},
        "method": f"peak: best of {repeats} float32 {size}^3 numpy matmuls; bandwidth: best of {repeats} "
                  f"threaded sums over {nbytes >> 20} MiB; non-decreasing in threads; the peak is "
                  f"raised to the fastest bare sgemm of the run",
    }


def bound(flops: float, nbytes: float, peak_gflops: float, bandwidth_gbs: float) -> dict:
    """Roofline lower bound on the time of `flops` FLOPs moving `nbytes` bytes."""
    compute_s = flops / (peak_gflops * 1e9)
    memory_s = nbytes / (bandwidth_gbs * 1e9)
    return {
        "flops": flops,
        "bytes": nbytes,
        "intensity_flop_per_byte": flops / nbytes if nbytes else float("inf"),
        "compute_s": compute_s,
        "memory_s": memory_s,
        "bound_s": max(compute_s, memory_s),
        "bound_by": "compute" if compute_s >= memory_s else "memory",
    }
