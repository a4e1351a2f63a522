"""Kernel speed benchmark: tracin.top_k against faiss, numpy, torch and the bare sgemm.

    python -m benchmarks.kernel [--quick] [--cases top10,both,...] [--repeats 5] [--threads 2]
                                [--isa native,avx2]
    python -m benchmarks.kernel --cases cosine      # normalize=True against plain scores (opt-in)

Run from a source checkout with the bench extra (pip install 'tracin[bench]'). Each case times its
contenders interleaved (warm-up, then `repeats` rounds; medians), checks the top-k results against
a peer in float64 (ties forgiven, nothing else), and puts each time against the roofline measured
on this machine. Writes results/kernel.json and PNG plots beside it (--quick: kernel_quick.json in
a new temporary folder, so smoke runs leave nothing in the checkout); `benchmarks.report` turns
the JSON into the README table. --isa runs every case once per instruction set of tracin's kernel
(native: the one it picks on this CPU; avx2 on an AVX-512 CPU forces the AVX2 path), the peers
timed again beside it; each case record names the set it ran with.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tracin._cpus import usable_cores

from . import cases as case_defs
from . import roofline
from .common import (
    RESULTS_DIR,
    SETTLE_S,
    machine_info,
    missing_modules,
    output_dir,
    record_name,
    time_interleaved,
    write_json,
)
from .exactness import check_top_k
from .peers import numpy_top_k, thread_limits

ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
ISA_NAMES = ("native", "avx512", "avx2", "generic")
BENCH_EXTRA = ("faiss", "torch", "matplotlib", "threadpoolctl")  # modules of pip install 'tracin[bench]'


@dataclass(frozen=True)
class Goal:
    """A speed target: ratio `ratio` of case `case` compared by `op` with `target`
    (op "report": measured and shown, no target). With `of_limit`, the target is that fraction of
    the ratio's roofline limit measured in the same run (for ratios whose limit depends on the
    machine or the shape, so that no target asks for more than the roofline allows). The targets
    are set here and nowhere else."""

    description: str
    case: str
    ratio: str
    op: str
    target: float | None = None
    of_limit: bool = False


GOALS = [
    Goal("one-sided top-10: speed vs faiss", "top10", "tracin vs faiss", ">=", 1.0),
    Goal("one-sided top-10: speed vs the bare sgemm", "top10", "tracin vs sgemm", ">=", 0.9),
    Goal("both sides in one call vs two faiss searches", "both", "tracin vs faiss", ">=", 1.8),
    Goal("skinny queries (m=16, n=1M): speed vs faiss", "skinny", "tracin vs faiss", ">=", 5.0),
    # fp16 halves the train side's bytes: up to 2x where the fp32 search is memory-bound, nothing
    # where it is compute-bound (the roofline limit is 2.0 or 1.0); 0.7 of it is 1.4 on the former.
    Goal("skinny queries: fp16 train side vs fp32", "skinny", "fp16 vs fp32", ">=", 0.7, of_limit=True),
    Goal("k=1000 cost / k=10 cost", "k", "tracin k=1000 / k=10 cost", "<=", 1.5),
    Goal("k=100 cost / k=10 cost", "k", "tracin k=100 / k=10 cost", "report"),
    Goal("C=5 checkpoints cost / one checkpoint of 5x dims", "checkpoints", "C checkpoints / one wide cost", "<=", 1.1),
    # the FLOP ratio (p*q)/(p+q) = 9.8 at 10 x 513 bounds the gain (the roofline limit)
    Goal(
        "factored (10 x 513) vs materialised (5130 dims)",
        "factored",
        "factored vs materialised",
        ">=",
        0.8,
        of_limit=True,
    ),
    Goal("threads 1 -> 2 speed-up (tracin)", "threads", "tracin t=1 -> t=2", "report"),
    Goal("threads 1 -> 2 speed-up (faiss)", "threads", "faiss t=1 -> t=2", "report"),
]


def _top_k_call(q: np.ndarray, x: np.ndarray, threads: int, isa: str, normalize: bool) -> Callable[[], object]:
    """tracin.top_k(q, x, 10, normalize=...); with `isa` other than this CPU's own, the kernel call
    with its instruction set forced, as cases._tracin does."""
    import tracin

    if isa in ("native", case_defs.native_isa()):
        return lambda: tracin.top_k(q, x, 10, num_threads=threads, normalize=normalize)
    from tracin import _core

    t, s = tracin.Gradients(q).kernel_side(), tracin.Gradients(x).kernel_side()
    return lambda: tracin.TopK(
        *_core.top_k(t, s, [1.0], 10, 0, num_threads=threads, isa=isa, normalize=int(normalize))[:2]
    )


def _unit(a: np.ndarray) -> np.ndarray:
    """float32 rows divided by their float64 norms (the cosine reference's data)."""
    return (a / np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def cosine(sizes: case_defs.Sizes, data: case_defs.Data, threads: int, isa: str = "native") -> Iterator[case_defs.Case]:
    """top-10 with normalize=True against plain scores on the same data (the cost of the norms in
    the kernel), on the headline and the skinny shapes; numpy on unit rows as the peer and check."""
    for name, (m, n, d) in (("cosine", sizes.main), ("cosine skinny", sizes.skinny)):
        q, x = data.matrix(m, d, "test"), data.matrix(n, d)
        qu, xu = _unit(q), _unit(x)
        flops, least = 2.0 * m * n * d, n * d * 4.0 + m * d * 4.0 + m * 10 * 12.0
        yield case_defs.Case(
            name,
            f"top-10 cosine (normalize=True) vs plain scores, m={m} n={n} d={d} fp32",
            {"m": m, "n": n, "d": d, "k": 10, "side": "proponents", "dtype": "float32", "threads": threads},
            [
                case_defs.Contender(
                    "tracin plain", "tracin", _top_k_call(q, x, threads, isa, False), flops, least, threads
                ),
                case_defs.Contender(
                    "tracin cosine", "tracin", _top_k_call(q, x, threads, isa, True), flops, least, threads
                ),
                case_defs.Contender(
                    "numpy on unit rows", "numpy", lambda qu=qu, xu=xu: numpy_top_k(qu, xu, 10), flops, least, threads
                ),
            ],
            {
                "cosine / plain cost": ("tracin cosine", "tracin plain"),
                "tracin vs numpy": ("numpy on unit rows", "tracin cosine"),
            },
            [case_defs.Check("tracin cosine", "numpy on unit rows", qu, xu)],
        )


# The default run: case_defs.GROUPS; cosine on request (--cases cosine), its ratio "cosine / plain
# cost" reported per case (no GOALS entry: every goal is judged on a default run).
GROUPS = {**case_defs.GROUPS, "cosine": cosine}


def _stashing(name: str, fn: Callable[[], object], stash: dict) -> Callable[[], None]:
    def run() -> None:
        stash[name] = fn()

    return run


def _checks(case: case_defs.Case, stash: dict) -> list[dict]:
    out = []
    for check in case.checks:
        ours = stash[check.ours]
        if isinstance(check.reference, str):
            reference, ref_name = stash[check.reference], check.reference
        else:
            reference, ref_name = check.reference(), check.reference_name
        sides = [("proponents", 0), ("opponents", 1)] if check.side == "both" else [(check.side, None)]
        for side, part in sides:
            mine = ours if part is None else ours[part]
            theirs = reference if part is None else reference[part]
            result = check_top_k(check.test, check.train, tuple(mine), tuple(theirs), side)
            out.append({"ours": check.ours, "reference": ref_name, "side": side, **result})
    return out


def _fastest(side: case_defs.Side, contenders: dict[str, dict]) -> str:
    """The contender of a ratio side with the least median time (one name: that name)."""
    return side if isinstance(side, str) else min(side, key=lambda name: contenders[name]["median_s"])


def _ratio_contenders(sides: tuple[case_defs.Side, case_defs.Side], contenders: dict[str, dict]) -> tuple[str, str]:
    """(numerator, denominator) of a ratio. Two sides that both list alternatives (one peer's paths,
    in the same order) are paired: the same path on both, the one with the faster denominator (a
    path change must not count as, e.g., thread scaling); else each side takes its fastest."""
    num, den = sides
    if isinstance(num, str) or isinstance(den, str):
        return _fastest(num, contenders), _fastest(den, contenders)
    return min(zip(num, den, strict=True), key=lambda pair: contenders[pair[1]]["median_s"])


def run_case(case: case_defs.Case, repeats: int, warmup: int, pause_s: float) -> dict:
    """Times and checks one case; the JSON record of it (rooflines come later, attach_rooflines)."""
    stash: dict = {}
    timing = time_interleaved(
        {c.name: _stashing(c.name, c.run, stash) for c in case.contenders},
        repeats=repeats,
        warmup=warmup,
        pause_s=pause_s,
    )
    contenders = {}
    for c in case.contenders:
        median = timing[c.name]["median_s"]
        contenders[c.name] = {
            "peer": c.peer,
            "threads": c.threads,
            "median_s": median,
            "times_s": timing[c.name]["times_s"],
            "flops": c.flops,
            "bytes": c.bytes,
            "gflops": c.flops / median / 1e9,
            "settings": c.settings,
        }
    ratios = {}
    for label, sides in case.ratios.items():
        num, den = _ratio_contenders(sides, contenders)
        ratios[label] = {
            "value": contenders[num]["median_s"] / contenders[den]["median_s"],
            "numerator": num,
            "denominator": den,
        }
        for key, side in zip(("numerator_of", "denominator_of"), sides, strict=True):
            if not isinstance(side, str):
                ratios[label][key] = list(side)
    return {
        "name": case.name,
        "title": case.title,
        "params": case.params,
        "contenders": contenders,
        "ratios": ratios,
        "checks": _checks(case, stash),
    }


def resolve_isas(names: list[str]) -> list[str]:
    """The distinct instruction sets tracin's kernel runs with for `names` on this CPU, in order
    ("native" -> the one it picks; a set the CPU lacks -> the one it falls back to)."""
    from tracin import _core

    out: list[str] = []
    for name in names:
        isa = _core.resolve_isa("auto" if name == "native" else name)
        if isa not in out:
            out.append(isa)
    return out


def attach_rooflines(case_records: list[dict], limits: dict) -> None:
    """Raises the peak at each thread count to the fastest bare sgemm seen at that count in the run
    (a peak measured while the machine was busy is too low; the machine did at least that), then
    gives every contender its roofline bound and the fraction of it reached."""
    peaks = limits["peak_sgemm_gflops"]
    for c in (c for r in case_records for c in r["contenders"].values() if c["peer"] == "sgemm"):
        t = str(c["threads"])
        peaks[t] = max(peaks[t], c["flops"] / min(c["times_s"]) / 1e9)
    for c in (c for r in case_records for c in r["contenders"].values()):
        bound = roofline.bound(
            c["flops"], c["bytes"], peaks[str(c["threads"])], limits["read_bandwidth_gbs"][str(c["threads"])]
        )
        c["roofline"] = bound
        c["roofline_fraction"] = bound["bound_s"] / c["median_s"]


def roofline_limit(case: dict, numerator: str, denominator: str) -> float:
    """The ratio at the roofline. Two runs of one library (e.g. tracin vs tracin): both at their
    bounds, what the work itself allows (e.g. the FLOP ratio of factored mode). tracin against a
    peer: the peer as measured, tracin at its bound (the most any kernel could gain here)."""
    num, den = case["contenders"][numerator], case["contenders"][denominator]
    top = num["roofline"]["bound_s"] if num["peer"] == den["peer"] else num["median_s"]
    return top / den["roofline"]["bound_s"]


def evaluate_goals(case_records: list[dict], isa: str | None = None) -> list[dict]:
    """Each goal with its measured value, its roofline limit and whether it is met (None: not
    run or report only), on the cases run with instruction set `isa` (None: all cases); plus one
    exactness goal over every check made on them."""
    records = [c for c in case_records if isa is None or c.get("isa") == isa]
    by_name = {c["name"]: c for c in records}
    out = []
    for g in GOALS:
        case = by_name.get(g.case, {})
        ratio = case.get("ratios", {}).get(g.ratio)
        measured = limit = met = None
        target = None if g.of_limit else g.target
        if ratio is not None:
            measured = ratio["value"]
            limit = roofline_limit(case, ratio["numerator"], ratio["denominator"])
            if g.of_limit:
                target = g.target * limit
            if g.op != "report":
                met = measured >= target if g.op == ">=" else measured <= target
        record = {
            "goal": g.description,
            "case": g.case,
            "ratio": g.ratio,
            "op": g.op,
            "target": target,
            "measured": measured,
            "roofline_limit": limit,
            "met": met,
            "isa": isa,
        }
        if g.of_limit:
            record["target_of_limit"] = g.target
        out.append(record)
    checks = [ch for c in records for ch in c["checks"]]
    wrong = sum(not ch["ok"] for ch in checks)
    out.append(
        {
            "goal": "exact: top-k equal to the peers' except at ties",
            "case": "all",
            "ratio": "wrong checks",
            "op": "<=",
            "target": 0,
            "measured": wrong,
            "roofline_limit": None,
            "met": wrong == 0 if checks else None,
            "isa": isa,
        }
    )
    return out


def _versions() -> dict:
    import faiss
    import matplotlib
    import threadpoolctl
    import torch

    return {
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "threadpoolctl": threadpoolctl.__version__,
        "matplotlib": matplotlib.__version__,
        "faiss_distance_compute_blas_threshold": faiss.cvar.distance_compute_blas_threshold,
    }


def run(
    groups: list[str],
    sizes: case_defs.Sizes,
    threads: int,
    repeats: int,
    warmup: int,
    quick: bool,
    log: Callable[[str], None] = print,
    isas: list[str] | None = None,
) -> dict:
    """Measures the machine's limits, then every case of `groups` once per instruction set of
    `isas` (resolved names, default: this CPU's own); the JSON payload."""
    isas = isas or resolve_isas(["native"])
    native = case_defs.native_isa()
    thread_counts = sorted({1, threads})
    log(f"measuring peak sgemm and read bandwidth at threads {thread_counts} ...")
    limits = roofline.machine_limits(thread_counts, quick=quick)
    log(f"  {limits['peak_sgemm_gflops']} GFLOP/s, {limits['read_bandwidth_gbs']} GB/s")
    data = case_defs.Data()
    records = []
    for isa in isas:
        log(f"tracin kernel: {isa}" + (" (this CPU's own)" if isa == native else " (forced)"))
        for group in groups:
            for case in GROUPS[group](sizes, data, threads, isa):
                log(f"case {case.name}: {case.title}")
                with thread_limits(threads):
                    record = run_case(case, repeats, warmup, pause_s=0.0 if quick else SETTLE_S)
                record["group"] = group
                record["isa"] = isa
                records.append(record)
                for name, c in record["contenders"].items():
                    log(f"  {name:24s} {c['median_s'] * 1e3:10.2f} ms {c['gflops']:8.1f} GFLOP/s")
                bad = [ch for ch in record["checks"] if not ch["ok"]]
                log("  exactness: " + ("ok" if not bad else f"{len(bad)} FAILED CHECKS: {bad}"))
                del case
    attach_rooflines(records, limits)
    return {
        "machine": machine_info(),
        "config": {
            "quick": quick,
            "repeats": repeats,
            "warmup": warmup,
            "threads": threads,
            "cases": groups,
            "isas": isas,
            "pause_between_calls_s": 0.0 if quick else SETTLE_S,
            "sizes": sizes.__dict__,
        },
        "versions": _versions(),
        "environment": {v: os.environ.get(v) for v in ENV_VARS},
        "limits": limits,
        "cases": records,
        "goals": evaluate_goals(records, isas[0]),
        "goals_by_isa": {isa: evaluate_goals(records, isa) for isa in isas},
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument(
        "--cases",
        default=",".join(case_defs.GROUPS),
        help=f"comma-separated case groups (default: all of {','.join(case_defs.GROUPS)}; also: cosine)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per contender first (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=usable_cores(),
        help="threads for every library (default and at most: the cores this process may use, its affinity "
        "mask); the threads case also runs 1",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default: {RESULTS_DIR}, or a new temporary folder with --quick)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="result name (default kernel, or kernel_quick with --quick; a run of other --cases, --isa or "
        "--threads than the defaults adds them: kernel_top10, kernel_avx2, kernel_threads1)",
    )
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also write the table into this README, between its markers <!-- bench:NAME:start/end --> (NAME: --name)",
    )
    p.add_argument(
        "--isa",
        default="native",
        help="comma-separated instruction sets of tracin's kernel, each run on every case: native "
        "(the one it picks on this CPU), avx512, avx2, generic (default: native)",
    )
    return p


def missing_extra() -> list[str]:
    """The bench extra's modules that are not installed."""
    return missing_modules(BENCH_EXTRA)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.kernel`; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.cases.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        parser.error(f"--cases: unknown {unknown}; choose from {','.join(GROUPS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.threads > usable_cores():
        # tracin caps its threads at these cores, the peers and the sgemm limit do not: they would be
        # oversubscribed while tracin is not, and the ratios would flatter tracin
        parser.error(f"--threads: {args.threads} is more than the {usable_cores()} cores this process may use")
    isa_names = [i.strip() for i in args.isa.split(",") if i.strip()]
    bad_isa = [i for i in isa_names if i not in ISA_NAMES]
    if bad_isa or not isa_names:
        parser.error(f"--isa: unknown {bad_isa}; choose from {','.join(ISA_NAMES)}")
    missing = missing_extra()
    if missing:
        print(
            f"{parser.prog}: error: needs the bench extra: pip install 'tracin[bench]' (missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return 1
    from . import plot, report

    # a subset of the cases, a forced ISA or fewer threads is not the recorded run: a name of its own
    # (kernel_top10, kernel_avx2, ...) unless --name gives one, so that kernel.json and its plots stay
    options = [
        (groups, list(case_defs.GROUPS), "-".join(groups)),
        (isa_names, ["native"], "-".join(isa_names)),
        (args.threads, usable_cores(), f"threads{args.threads}"),
    ]
    name = args.name or record_name("kernel", args.quick, options)
    if args.readme:
        try:
            report.check_readme(args.readme, name)
        except ValueError as e:
            parser.error(f"--readme: {e} (the block is named by --name)")
    sizes = case_defs.QUICK if args.quick else case_defs.FULL
    out = output_dir(args.out, args.quick, "bench")
    payload = run(groups, sizes, args.threads, args.repeats, args.warmup, args.quick, isas=resolve_isas(isa_names))
    payload["plots"] = [p.name for p in plot.plot_all(payload, out, name)]
    path = write_json(name, payload, directory=out)
    print(report.markdown(payload))
    print(f"wrote {path} and {', '.join(payload['plots'])}")
    wrong = [(c["name"], ch["ours"], ch["reference"]) for c in payload["cases"] for ch in c["checks"] if not ch["ok"]]
    if wrong:  # written first: the figures kept for diagnosis, but never put in a README or passed as a run
        print(
            f"{parser.prog}: error: top-k differs from the reference in {len(wrong)} checks: {wrong}",
            file=sys.stderr,
        )
        return 1
    if args.readme:
        report.update_readme(args.readme, payload, os.path.relpath(path, args.readme.parent), block=name)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
