"""The README benchmark table, generated from a kernel benchmark JSON (never typed by hand).

    python -m benchmarks.report [--json benchmarks/results/kernel.json] [--readme README.md] [--block NAME]

Prints the Markdown table; with --readme, writes it instead between that README's marker comments
`<!-- bench:BLOCK:start -->` and `<!-- bench:BLOCK:end -->` (BLOCK: the JSON's file name without
.json unless --block says; a README without them is refused). A ratio whose contenders' repeated
times spread by more than NOISY_SPREAD (max / min) is marked noisy; a goal gets a verdict only if
every pairing of its ratio's repeated times gives the same one, and none without two repeated times
per contender.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import RESULTS_DIR

NOISY_SPREAD = 1.5  # max / min of a contender's repeated times beyond which its ratios are marked noisy
NOISY = "noisy: rerun on an idle machine"
NO_ESTIMATE = "no noise estimate"  # fewer than two (positive) repeated times: no verdict
REPO_ROOT = Path(__file__).resolve().parent.parent


def _markers(block: str) -> tuple[str, str]:
    """The README comments around the generated block named `block`."""
    return f"<!-- bench:{block}:start -->", f"<!-- bench:{block}:end -->"


START, END = _markers("kernel")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _times(contender: dict) -> list[float] | None:
    """A contender's repeated times, or None without two positive ones (no noise estimate)."""
    times = contender.get("times_s") or []
    return times if len(times) > 1 and min(times) > 0 else None


def _noise(case: dict, label: str) -> str:
    """' (noisy)' if a contender of the case's ratio `label` spread more than NOISY_SPREAD
    (max / min) over its repeats, ' (no noise estimate)' without two repeated times for each."""
    ratio = case["ratios"][label]
    times = [_times(case["contenders"][ratio[side]]) for side in ("numerator", "denominator")]
    if any(t is None for t in times):
        return f" ({NO_ESTIMATE})"
    return " (noisy)" if any(max(t) / min(t) > NOISY_SPREAD for t in times) else ""


def _pairings(case: dict, label: str) -> tuple[float, float] | None:
    """The least and the greatest value of the case's ratio `label` over every pairing of its
    contenders' repeated times, min(num) / max(den) and max(num) / min(den); None without two
    positive repeated times for each."""
    ratio = case["ratios"][label]
    num, den = (_times(case["contenders"][ratio[side]]) for side in ("numerator", "denominator"))
    if num is None or den is None:
        return None
    return min(num) / max(den), max(num) / min(den)


def _met(goal: dict, value: float) -> bool:
    return value >= goal["target"] if goal["op"] == ">=" else value <= goal["target"]


def _goal_rows(goals: list[dict], cases: list[dict], quick: bool = False) -> list[str]:
    """The goal table; at --quick's toy sizes the Met column is shown in parentheses, not as a
    verdict. A goal on a ratio gets a verdict only if every pairing of its contenders' repeats
    gives the same one (else it reads noisy), and none without repeated times to tell."""
    met_head = "Met at toy sizes (no verdict)" if quick else "Met"
    rows = [f"| Goal | Target | Measured | Roofline limit | {met_head} |", "|---|---|---|---|---|"]
    verdicts = {True: "(yes)", False: "(no)", None: "-"} if quick else {True: "yes", False: "**no**", None: "-"}
    by_name = {c["name"]: c for c in cases}
    for g in goals:
        target = "report" if g["op"] == "report" else f"{g['op']} {g['target']}"
        if g.get("target_of_limit") is not None:  # a fraction of the roofline limit of the run
            target = f"{g['op']} {g['target_of_limit']} x limit ({_fmt(g['target'])})"
        case = by_name.get(g["case"])
        met = verdicts[g["met"]]
        if g["met"] is not None and case is not None and g["ratio"] in case["ratios"]:
            span = _pairings(case, g["ratio"])
            if span is None:
                met = NO_ESTIMATE
            elif _met(g, span[0]) != _met(g, span[1]):
                met = NOISY
        measured = g["measured"] if isinstance(g["measured"], int) else _fmt(g["measured"])
        rows.append(f"| {g['goal']} | {target} | {measured} | {_fmt(g.get('roofline_limit'))} | {met} |")
    return rows


def _case_rows(cases: list[dict], isa: str) -> list[str]:
    rows = [
        f"| Case ({isa} kernel) | tracin median (ms) | tracin GFLOP/s | % of roofline (bound) | "
        "Ratios (median times) | Exact |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        name, r = next(((n, r) for n, r in c["contenders"].items() if r["peer"] == "tracin"))
        ratios = ", ".join(f"{label} {v['value']:.2f}x{_noise(c, label)}" for label, v in c["ratios"].items())
        wrong = sum(not ch["ok"] for ch in c["checks"])
        exact = "-" if not c["checks"] else ("yes" if wrong == 0 else f"**{wrong} failed**")
        rows.append(
            f"| {c['title']} ({name}) | {r['median_s'] * 1e3:.1f} | {r['gflops']:.1f} | "
            f"{100 * r['roofline_fraction']:.0f}% ({r['roofline']['bound_by']}) | {ratios} | {exact} |"
        )
    return rows


def _isa_blocks(payload: dict) -> list[tuple[str, list[dict], list[dict]]]:
    """(instruction set, its goals, its cases) per kernel instruction set of the run, first the
    one "goals" holds. A record without "isa" (older runs) ran with the machine's own."""
    own = payload.get("machine", {}).get("tracin_isa", "?")
    isas = payload["config"].get("isas") or [own]
    by_isa = payload.get("goals_by_isa") or {isas[0]: payload["goals"]}
    return [
        (isa, payload["goals"] if i == 0 else by_isa[isa], [c for c in payload["cases"] if c.get("isa", own) == isa])
        for i, isa in enumerate(isas)
    ]


def markdown(payload: dict, source: str | None = None) -> str:
    """The Markdown block: where and how it was measured, then per kernel instruction set the goals
    and one row per case."""
    m, cfg, lim = payload.get("machine", {}), payload["config"], payload["limits"]
    t = str(cfg["threads"])
    blocks = _isa_blocks(payload)
    own = m.get("tracin_isa", "?")
    kernels = ", ".join(f"{isa} ({'native' if isa == own else 'forced'})" for isa, _, _ in blocks)
    head = (
        f"Measured {m.get('time', '')} on {m.get('cpu_model', m.get('processor', '?'))} "
        f"({m.get('cpu_count', '?')} cores), {cfg['threads']} threads, tracin {m.get('tracin', '?')} "
        f"(kernel instruction set: {kernels}), faiss {payload['versions']['faiss']}, "
        f"torch {payload['versions']['torch']}, "
        f"numpy {m.get('numpy', '?')}; median of {cfg['repeats']} interleaved repeats after "
        f"{cfg['warmup']} warm-up. Machine limits: peak sgemm {lim['peak_sgemm_gflops'][t]:.0f} GFLOP/s, "
        f"read bandwidth {lim['read_bandwidth_gbs'][t]:.1f} GB/s. Ratios are peer time / tracin time "
        f"(> 1: tracin faster) unless named a cost. Roofline limit: the ratio with tracin at its "
        f"roofline bound (max(FLOPs / peak, least bytes / bandwidth)) against the peer as measured, "
        f"or, tracin against tracin, both at their bounds. Noisy: a contender of the ratio took more than "
        f"{NOISY_SPREAD}x as long in its slowest repeat as in its fastest. A goal is judged only if the ratio "
        f"from every pairing of the two contenders' repeated times (from min / max to max / min) gives the "
        f"same verdict; else it reads noisy, and without two repeated times each, {NO_ESTIMATE}."
    )
    if any("numerator_of" in r for c in payload["cases"] for r in c["ratios"].values()):
        head += (
            " faiss is timed on both its search paths, its default (a loop of dot products below "
            f"{payload['versions'].get('faiss_distance_compute_blas_threshold', '?')} queries) and its BLAS "
            "path (distance_compute_blas_threshold = 0), and a ratio against faiss uses the faster of the two "
            "(faiss against faiss, t=1 -> t=2: one path on both sides, the faster at t=2)."
        )
    if cfg.get("quick"):
        head += (
            " **Quick (smoke-test) sizes: not meaningful as speeds; the goals are judged only by a full "
            "run** (the toy problems are too small for threads, blocking or the k-selection to pay off)."
        )
    if source:
        head += f" Generated by benchmarks/report.py from `{source}`."
    parts = [head]
    for isa, goals, cases in blocks:
        parts += [
            "",
            f"tracin kernel: **{isa}** ({'native' if isa == own else 'forced'}).",
            "",
            *_goal_rows(goals, cases, bool(cfg.get("quick"))),
            "",
            *_case_rows(cases, isa),
        ]
    return "\n".join(parts)


def _split(readme: Path, block: str) -> tuple[str, str]:
    """The text of `readme` before the start marker of `block` and after its end marker; a
    ValueError naming the markers if the README lacks them (a misspelt block or a new README)."""
    start, end = _markers(block)
    try:
        text = Path(readme).read_text()
    except OSError as e:
        raise ValueError(f"cannot read {readme}: {e}") from e
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(
            f"{readme} has no block {block!r}: it needs one line {start} and, after it, one line {end} "
            "where the table goes"
        )
    before, rest = text.split(start, 1)
    return before, rest.split(end, 1)[1]


def check_readme(readme: Path, block: str) -> None:
    """Raises ValueError unless `readme` holds the markers of `block` (to check before a long run)."""
    _split(readme, block)


def update_readme(readme: Path, payload: dict, source: str | None = None, block: str = "kernel") -> None:
    """Replaces the text between the markers of `block` in `readme` with the generated block."""
    before, after = _split(readme, block)
    start, end = _markers(block)
    Path(readme).write_text(f"{before}{start}\n{markdown(payload, source)}\n{end}{after}")


def _is_kernel_record(payload: object) -> bool:
    """Whether a JSON payload is what benchmarks.kernel writes (its limits, config threads and cases)."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("limits"), dict)
        and "peak_sgemm_gflops" in payload["limits"]
        and isinstance(payload.get("config"), dict)
        and "threads" in payload["config"]
        and "cases" in payload
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "kernel.json", help="benchmark JSON to render")
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help=f"README to write the table into (e.g. {REPO_ROOT / 'README.md'}; default: print it)",
    )
    p.add_argument(
        "--block",
        default=None,
        help="with --readme: name in the README markers <!-- bench:BLOCK:start/end --> (default: the JSON's "
        "file name without .json, e.g. kernel_avx2)",
    )
    args = p.parse_args(argv)
    if args.block is not None and args.readme is None:
        p.error("--block: names a README block, so it needs --readme")
    block = args.block or args.json.stem
    try:
        payload = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"--json: cannot read {args.json}: {e}")
    if not _is_kernel_record(payload):
        kind = payload.get("benchmark") if isinstance(payload, dict) else None
        p.error(
            f"--json: {args.json} is not a kernel benchmark record (its benchmark: {kind!r}); "
            "render it with its own report"
        )
    source = (
        str(args.json.resolve().relative_to(REPO_ROOT))
        if args.json.resolve().is_relative_to(REPO_ROOT)
        else str(args.json)
    )
    if args.readme is None:
        print(markdown(payload, source))
        return 0
    try:
        update_readme(args.readme, payload, source, block)
    except ValueError as e:
        p.error(f"--readme: {e}")
    print(f"updated block {block!r} of {args.readme} from {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
