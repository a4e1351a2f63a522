"""The machine's limits, measured with NumPy, and the roofline bound of a piece of work.

Peak: the best of a few large square float32 matmuls (BLAS sgemm) at a given thread count.
Bandwidth: the best of a few sums over a large float32 array, split over threads (a read stream,
which is what scoring a large train side needs). A piece of work of F FLOPs that must move B bytes
cannot take less than max(F / peak, B / bandwidth).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# (matmul size, bytes summed, repeats) of the limit measurements: the full run's 2048^3 product and
# 512 MiB stream run seconds and are past BLAS and cache start-up effects; --quick's take milliseconds.
FULL = (2048, 1 << 29, 5)
QUICK = (1024, 1 << 25, 3)


def peak_sgemm_gflops(threads: list[int], size: int = 2048, repeats: int = 3) -> dict[int, float]:
    """Best GFLOP/s of a (size x size) @ (size x size) float32 product at each BLAS thread count.

    The thread counts take turns, one product each per round, so that noise from the rest of the
    machine hits them alike. Raises RuntimeError when the BLAS does not take the thread limit
    (every count would then measure the same thing)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    best = {t: float("inf") for t in threads}
    for round_ in range(repeats + 1):  # round 0 warms up
        for t in threads:
            with threadpool_limits(limits=t, user_api="blas"):
                seen = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
                if seen != {t} and t <= (os.cpu_count() or 1):
                    raise RuntimeError(f"BLAS thread limit {t} not taken (BLAS libraries report {sorted(seen)})")
                t0 = time.perf_counter()
                np.matmul(a, b, out=out)
                elapsed = time.perf_counter() - t0
            if round_:
                best[t] = min(best[t], elapsed)
    return {t: 2.0 * size**3 / s / 1e9 for t, s in best.items()}


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


def machine_limits(threads: list[int], quick: bool = False) -> dict:
    """{"peak_sgemm_gflops": {t: ...}, "read_bandwidth_gbs": {t: ...}} for each thread count, as
    measured (a count slower than a smaller one is reported so, not copied from it), plus the
    raw measurements (kernel.attach_rooflines raises the peaks later)."""
    size, nbytes, repeats = QUICK if quick else FULL
    peak = peak_sgemm_gflops(threads, size, repeats)
    bandwidth = {t: read_bandwidth_gbs(t, nbytes, repeats) for t in threads}
    return {
        "peak_sgemm_gflops": {str(t): v for t, v in peak.items()},
        "read_bandwidth_gbs": {str(t): v for t, v in bandwidth.items()},
        "measured": {
            "peak_sgemm_gflops": {str(t): v for t, v in peak.items()},
            "read_bandwidth_gbs": {str(t): v for t, v in bandwidth.items()},
        },
        "method": f"peak: best of {repeats} float32 {size}^3 numpy matmuls per thread count, the counts "
        f"taking turns; bandwidth: best of {repeats} threaded sums over {nbytes >> 20} MiB; "
        f"each peak raised to the fastest bare sgemm of the run at its own thread count",
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
