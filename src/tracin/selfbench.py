"""`tracin bench`: tracin.top_k against NumPy (matmul + argpartition) on a generated problem.

A quick answer to "how fast is tracin on this machine?" that needs only NumPy. The full peer
benchmark (faiss, torch, the bare sgemm, rooflines) is `python -m benchmarks.kernel` in a source
checkout.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._cpus import usable_cores

NUMPY_CHUNK_BYTES = 128 * 2**20  # score matrix NumPy holds at once (test rows per chunk follow from it)
CHECKED_ROWS = 8  # test rows whose top-k is checked against float64 (spread over the test rows)
CHECK_TRAIN_ROWS = 16384  # train rows the check widens to float64 at once (into one buffer)
TOLERANCE = 1e-5  # the numerical contract's scale-aware bound (docs/architecture.md)


@dataclass(frozen=True)
class BenchConfig:
    """A generated top-k problem: m test rows, n train rows, d dims (float32 Gaussian), k per row."""

    m: int = 256
    n: int = 100_000
    d: int = 256
    k: int = 10
    threads: int | None = None  # tracin's threads asked for (None: all usable cores); BLAS keeps its own default
    repeats: int = 3
    seed: int = 0


QUICK = BenchConfig(m=64, n=20_000, d=64, repeats=2)


@dataclass(frozen=True)
class BenchResult:
    """Median seconds of each contender, whether tracin's top-k matches float64 on CHECKED_ROWS rows,
    and the threads tracin ran on."""

    config: BenchConfig
    tracin_s: float
    numpy_s: float
    exact: bool
    threads: int  # the threads tracin ran on

    @property
    def speedup(self) -> float:
        """NumPy time / tracin time (> 1: tracin faster)."""
        return self.numpy_s / self.tracin_s


def numpy_chunk_rows(n: int) -> int:
    """Test rows numpy_top_k scores at once against n train rows (NUMPY_CHUNK_BYTES of float32 scores)."""
    return max(1, NUMPY_CHUNK_BYTES // (4 * max(n, 1)))


def numpy_top_k(test: np.ndarray, train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Proponents with NumPy alone: test @ train.T in chunks of test rows, argpartition, then a
    sort of the k. Returns (values float32 (m, k), indices int64 (m, k)), largest first."""
    m, n = test.shape[0], train.shape[0]
    k = min(k, n)
    values, indices = np.empty((m, k), np.float32), np.empty((m, k), np.int64)
    rows = numpy_chunk_rows(n)
    for a in range(0, m, rows):
        scores = test[a : a + rows] @ train.T
        part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
        top = np.take_along_axis(scores, part, 1)
        order = np.argsort(-top, axis=1, kind="stable")
        values[a : a + rows] = np.take_along_axis(top, order, 1)
        indices[a : a + rows] = np.take_along_axis(part, order, 1)
    return values, indices


def matches_float64(test: np.ndarray, train: np.ndarray, k: int, values: np.ndarray, indices: np.ndarray) -> bool:
    """Whether a proponent top-k (values float32 (m, min(k, n)), indices int64 (m, min(k, n))) is right
    for CHECKED_ROWS test rows spread over the m: finite values in non-increasing order, distinct
    indices in [0, n), each value within TOLERANCE * |t| * |x_i| of the float64 score, and no row left
    out that beats the smallest chosen float64 score by more than twice that bound. The float64 scores
    are computed CHECK_TRAIN_ROWS train rows at a time (no float64 copy of the whole train set)."""
    m, n = test.shape[0], train.shape[0]
    width = min(k, n)
    if values.shape != (m, width) or indices.shape != (m, width):
        return False
    rows = np.unique(np.linspace(0, m - 1, min(CHECKED_ROWS, m)).astype(np.int64)) if m else np.empty(0, np.int64)
    got, chosen = values[rows].astype(np.float64), indices[rows]
    if not np.all(np.isfinite(got)) or np.any(np.diff(got, axis=1) > 0):
        return False
    if np.any((chosen < 0) | (chosen >= n)) or np.any(np.diff(np.sort(chosen, axis=1), axis=1) == 0):
        return False
    q = test[rows].astype(np.float64)
    q_norms = np.sqrt(np.einsum("ij,ij->i", q, q))
    exact, bound = np.empty((len(rows), n)), np.empty((len(rows), n))
    widened = np.empty((min(CHECK_TRAIN_ROWS, n), train.shape[1]))
    for a in range(0, n, CHECK_TRAIN_ROWS):
        x = widened[: min(CHECK_TRAIN_ROWS, n - a)]
        x[...] = train[a : a + len(x)]
        exact[:, a : a + len(x)] = q @ x.T
        bound[:, a : a + len(x)] = TOLERANCE * q_norms[:, None] * np.sqrt(np.einsum("ij,ij->i", x, x))[None, :]
    if np.any(np.abs(got - np.take_along_axis(exact, chosen, 1)) > np.take_along_axis(bound, chosen, 1)):
        return False
    smallest = np.take_along_axis(exact, chosen, 1).min(axis=1, initial=np.inf)[:, None]
    np.put_along_axis(exact, chosen, -np.inf, 1)
    exact -= smallest
    bound *= 2
    return bool(np.all(exact <= bound))


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def threads(config: BenchConfig) -> int:
    """The threads tracin runs on: config.threads, else every usable core, capped at the usable cores
    as the kernel caps num_threads (backends/cpu.py), so that what is printed and recorded is what ran."""
    usable = usable_cores()
    return min(config.threads or usable, usable)


def run(config: BenchConfig, status: Callable[[str], object] = lambda _: None) -> BenchResult:
    """Generates the problem, times both contenders (warm-up, then `repeats` calls each; medians)
    and checks tracin's result against float64, saying status(line) before each step. tracin runs on
    threads(config)."""
    import tracin

    used = threads(config)
    status(f"generating the data ({config.m} + {config.n} rows of {config.d} float32)")
    rng = np.random.default_rng(config.seed)
    test = rng.standard_normal((config.m, config.d), dtype=np.float32)
    train = rng.standard_normal((config.n, config.d), dtype=np.float32)
    status("checking tracin's top-k against float64")
    ours = tracin.top_k(test, train, config.k, num_threads=used, progress=False)
    exact = matches_float64(test, train, config.k, ours.values, ours.indices)
    calls = f"a warm-up and {config.repeats} timed call(s)"
    status(f"timing tracin.top_k: {calls}")
    tracin_s = _median_seconds(
        lambda: tracin.top_k(test, train, config.k, num_threads=used, progress=False), config.repeats
    )
    status(f"timing NumPy: {calls}")
    numpy_s = _median_seconds(lambda: numpy_top_k(test, train, config.k), config.repeats)
    return BenchResult(config, tracin_s, numpy_s, exact, used)


def problem(config: BenchConfig) -> str:
    """The first line `tracin bench` prints, saying what is timed (tracin's threads: threads(config), and
    the count asked for if more than the usable cores)."""
    c = config
    k = f"top-{min(c.k, c.n)}" + (f" (k={c.k} capped at the train rows)" if c.k > c.n else "")
    return (
        f"{k} proponents of {c.m} test rows among {c.n} train rows, d={c.d}, float32; "
        f"tracin on {_threads_said(c)}, NumPy's BLAS on its default threads; median of {c.repeats}"
    )


def _threads_said(config: BenchConfig) -> str:
    """'N thread(s)', and the count asked for where threads(config) capped it at the usable cores."""
    used = threads(config)
    asked = config.threads
    capped = f" ({asked} asked, capped at the {used} usable core(s))" if asked is not None and asked > used else ""
    return f"{used} thread(s){capped}"


def timings(result: BenchResult) -> str:
    """The lines `tracin bench` prints after problem(): each contender's median, the speedup and the
    float64 check."""
    c = result.config
    return "\n".join(
        [
            f"  tracin.top_k                 {result.tracin_s * 1e3:10.1f} ms",
            f"  numpy matmul + argpartition  {result.numpy_s * 1e3:10.1f} ms",
            f"  tracin is {result.speedup:.2f}x the speed of NumPy; top-k "
            + ("matches float64" if result.exact else "DOES NOT MATCH float64 (please report)")
            + f" on {min(CHECKED_ROWS, c.m)} checked rows",
            "  the full peer benchmark (faiss, torch, roofline) is `python -m benchmarks.kernel` in a source checkout",
        ]
    )
