"""python -m benchmarks.fact_tracing: run the benchmark, write fact_tracing.json and its plot, print the table."""

from __future__ import annotations

import argparse
import os
import sys

from ..common import add_output_options, missing_modules, output_dir, write_json
from . import config, plot, report
from .run import run

NEEDS = ("torch", "transformers", "rank_bm25", "matplotlib")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fact_tracing", description=__doc__.split(":", 1)[1].strip())
    add_output_options(p, "a tiny corpus and a few training steps: a smoke test (< 1 min)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch and scoring threads (default: every core)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = missing_modules(NEEDS)
    if missing:
        print(
            f"python -m benchmarks.fact_tracing: error: needs {', '.join(missing)} (pip install 'tracin[bench,torch]')",
            file=sys.stderr,
        )
        return 1
    if args.threads < 1:
        print(f"python -m benchmarks.fact_tracing: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if "torch" not in sys.modules:
        # OpenMP workers that sleep at a barrier instead of spinning: on a machine other processes load, two
        # spinning torch threads trained 6-15x slower than one; sleeping ones about as fast as one.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = output_dir(args.out, args.quick, "fact-tracing")  # a given --out was test-written when parsed
    name = "fact_tracing_quick" if args.quick else "fact_tracing"
    payload = run(config.QUICK if args.quick else config.FULL, args.threads, log=lambda s: print(s, flush=True))
    payload["plots"] = [plot.plot(payload, out / f"{name}.png").name]
    path = write_json(name, payload, directory=out)
    print(report.markdown(payload))
    print()
    print(report.summary_table(payload))
    print(f"wrote {path} and {', '.join(payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
