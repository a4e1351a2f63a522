"""Whitening fit: the second moment R = G^T G / n of 200k x 4096 float32 gradients, against NumPy's own
float32 G.T @ G and this machine's sgemm throughput.

    PYTHONPATH=src python benchmarks/whitening.py            # the recorded size (results/whitening.json)
    PYTHONPATH=src python benchmarks/whitening.py --quick    # a smoke run (JSON in a new temporary folder)

Contenders, interleaved (benchmarks.common.time_interleaved), on the same in-memory (n, d) float32 G:
numpy_gtg (G.T @ G in float32: OpenBLAS ssyrk, float32 sums over all n rows), tracin_float32 (the fit's
accumulation: float32 products of up to 4096 rows added into float64, precision="float32"),
tracin_float64 (precision="float64"). Before any timing, each contender's R is checked once at 32
columns against float64 NumPy (above AGREEMENT_TOL: exit 1, nothing timed or written). Rates are GFLOP/s
of the flops done: n d (d + 1) / seconds for the three contenders (a symmetric rank-n update computes
the d (d + 1) / 2 entries of one triangle, 2 n flops each), 2 d^3 / seconds for sgemm, a square d x d
float32 product; so fraction_of_sgemm is the share of the machine's sgemm throughput a contender
reaches. Also timed once: the damped inverse of one d x d R (Cholesky and inverse in float64) and the
whole Whitening.fit. The goal: tracin_float32 at >= 70% of this machine's sgemm rate, and of numpy_gtg.
A recorded run times every contender and sgemm, interleaved in the same rounds, at least MIN_REPEATS
times (--quick may take fewer); the sgemm rate is that of its fastest call (the machine's limit), the
others' of their medians.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tracin  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_output_options,
    at_least,
    check_agreement,
    description,
    output_dir,
    quick_or_given,
    record_name,
    size_options,
    time_interleaved,
    write_json,
)
from tracin.whitening import Whitening  # noqa: E402
from tracin.whitening._inverse import damped_inverse  # noqa: E402
from tracin.whitening._moments import second_moments  # noqa: E402
from tracin.whitening._threads import blas_threads  # noqa: E402

PROG = "python -m benchmarks.whitening"
AGREEMENT_TOL = 1e-3  # largest |R - reference| / max |reference| of a contender, checked before timing
CHECKED_COLUMNS = 32  # columns of R checked against float64 NumPy (all d of them cost a float64 G.T @ G)
FULL = {"n": 200_000, "d": 4096}  # the recorded sizes (results/whitening.json)
QUICK = {"n": 4096, "d": 256}  # --quick: a smoke run
GOAL = 0.7  # fraction of the sgemm rate (and of NumPy's G.T @ G) the float32 fit must reach
MIN_REPEATS = 3  # fewer timed calls cannot tell a result from the noise of a shared machine


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def random_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 standard normal rows, drawn in blocks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    g = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 8192):
        g[a : a + 8192] = rng.standard_normal((min(8192, n - a), d), dtype=np.float32)
    return g


def symmetric_flops(n: int, d: int) -> int:
    """Flops of G^T G for an (n, d) G computed as a symmetric product: one triangle, d (d + 1) / 2
    entries of n multiply-adds each."""
    return n * d * (d + 1)


def reference_columns(g: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(d, len(columns)) float64 columns of R = G^T G / n of an (n, d) float32 G, products and sums
    in float64 over blocks of rows (no float64 copy of the whole)."""
    ref = np.zeros((g.shape[1], len(columns)))
    for a in range(0, len(g), 8192):
        block = g[a : a + 8192].astype(np.float64)
        ref += block.T @ block[:, columns]
    return ref / len(g)


def check_contenders(g: np.ndarray, contenders: dict, seed: int = 0) -> dict[str, float]:
    """Each contender's R (numpy_gtg's G^T G divided by n) against reference_columns at CHECKED_COLUMNS
    random columns, once: a gap above AGREEMENT_TOL ends the program (exit code 1) naming the
    contender (common.check_agreement). Returns the gaps."""
    n, d = g.shape
    columns = np.sort(np.random.default_rng(seed).choice(d, min(d, CHECKED_COLUMNS), replace=False))
    ref = reference_columns(g, columns)
    gaps = {}
    for name, fn in contenders.items():
        r = fn()
        r = r[0] if isinstance(r, list) else np.asarray(r) / n
        got = r[:, columns] if np.ndim(r) == 2 and r.shape[0] == d else r
        gaps[name] = check_agreement(PROG, name, got, ref, AGREEMENT_TOL, "float64 NumPy's G.T @ G / n")
    return gaps


def measure(n: int, d: int, repeats: int, threads: int | None, warmup: int = 0, verdict: bool = True) -> dict:
    """Times the contenders (`warmup` untimed calls each first) and judges the goal (met: None
    without `verdict`, as for --quick's toy sizes)."""
    g = random_rows(n, d)
    grads = tracin.Gradients(g)
    square = g[:d] if n >= d else random_rows(d, d, 1)
    square_t = np.ascontiguousarray(square.T)
    contenders = {
        "numpy_gtg": lambda: g.T @ g,
        "tracin_float32": lambda: second_moments(grads, _NoBar(), "float32"),
        "tracin_float64": lambda: second_moments(grads, _NoBar(), "float64"),
    }
    with blas_threads(threads):
        gaps = check_contenders(g, contenders)
        timings = time_interleaved(  # the sgemm ceiling among them: machine noise hits all alike
            {**contenders, "sgemm": lambda: square @ square_t},
            repeats=repeats,
            warmup=warmup,
            pause_s=1.0,
        )
        sgemm = timings.pop("sgemm")
        (r,) = second_moments(grads, _NoBar(), "float64")
        t0 = time.perf_counter()
        damped_inverse(r, float(np.trace(r)) / d, "benchmark")
        inverse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        Whitening.fit(grads, progress=False)
        fit_s = time.perf_counter() - t0
    sgemm_rate = 2 * d**3 / min(sgemm["times_s"]) / 1e9
    for t in timings.values():
        t["gflops"] = symmetric_flops(n, d) / t["median_s"] / 1e9
        t["fraction_of_sgemm"] = t["gflops"] / sgemm_rate
    ours = timings["tracin_float32"]
    return {
        "n": n,
        "d": d,
        "repeats": repeats,
        "threads": threads,
        "sgemm": {**sgemm, "gflops": sgemm_rate, "rate_of": "fastest call"},
        "timings": timings,
        "agreement": {"checked_columns": min(d, CHECKED_COLUMNS), "tol": AGREEMENT_TOL, "rel_gap": gaps},
        "float32_vs_numpy_gtg": timings["numpy_gtg"]["median_s"] / ours["median_s"],
        "float64_vs_numpy_gtg": timings["numpy_gtg"]["median_s"] / timings["tracin_float64"]["median_s"],
        "damped_inverse_s": inverse_s,
        "whitening_fit_s": fit_s,
        "goal": {
            "fraction": GOAL,
            "met": bool(
                ours["fraction_of_sgemm"] >= GOAL and timings["numpy_gtg"]["median_s"] / ours["median_s"] >= GOAL
            )
            if verdict
            else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=description(__doc__))
    parser.add_argument("--n", type=at_least(1), default=None, help="rows (default 200000, 4096 with --quick)")
    parser.add_argument("--d", type=at_least(1), default=None, help="dims (default 4096, 256 with --quick)")
    parser.add_argument(
        "--repeats",
        type=at_least(1),
        default=MIN_REPEATS,
        help=f"interleaved rounds, at least {MIN_REPEATS} but with --quick (default {MIN_REPEATS})",
    )
    parser.add_argument("--threads", type=at_least(1), default=None, help="BLAS threads (default: BLAS's own)")
    add_output_options(
        parser, "small sizes, one warm-up call each, no verdict: to check the script runs (a size given as a flag wins)"
    )
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS and not args.quick:
        parser.error(
            f"--repeats must be at least {MIN_REPEATS} (fewer cannot tell a result from noise), got {args.repeats}"
        )
    quick_or_given(args, QUICK, FULL)
    n, d = args.n, args.d
    result = measure(n, d, args.repeats, args.threads, warmup=1 if args.quick else 0, verdict=not args.quick)
    out = output_dir(args.out, args.quick, "whitening")
    # other sizes or BLAS threads than the recorded run's: a record of their own (whitening_n512_d32, ...)
    options = [*size_options(args, QUICK, FULL), (args.threads, None, f"threads{args.threads}")]
    path = write_json(record_name("whitening", args.quick, options), result, out)
    t = result["timings"]
    print(
        f"R of {n} x {d}: sgemm (fastest call) {result['sgemm']['gflops']:.1f} GFLOP/s; numpy G.T @ G "
        f"{t['numpy_gtg']['gflops']:.1f}, tracin float32 {t['tracin_float32']['gflops']:.1f} "
        f"({t['tracin_float32']['fraction_of_sgemm']:.0%} of sgemm, {result['float32_vs_numpy_gtg']:.0%} of "
        f"numpy), float64 {t['tracin_float64']['gflops']:.1f}; inverse {result['damped_inverse_s']:.1f} s, "
        f"fit {result['whitening_fit_s']:.1f} s; goal met: "
        + ("no verdict (--quick)" if result["goal"]["met"] is None else str(result["goal"]["met"]))
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
