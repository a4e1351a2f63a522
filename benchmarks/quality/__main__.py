"""python -m benchmarks.quality: run the suite, write quality.json and its plots, print the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..common import (
    RESULTS_DIR,
    add_output_options,
    machine_info,
    missing_modules,
    output_dir,
    writable_dir,
    write_json,
)
from . import config, plots, report
from .run import run

NEEDS = ("torch", "sklearn", "scipy", "matplotlib")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split(":", 1)[1].strip())
    add_output_options(p, "small models and few subset models: a smoke test")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"subset-model cache (default: {RESULTS_DIR / '.cache'}, or OUT/.cache with --quick)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = missing_modules(NEEDS)
    if missing:
        print(
            f"python -m benchmarks.quality: error: needs {', '.join(missing)} (pip install 'tracin[bench]')",
            file=sys.stderr,
        )
        return 1
    suite = config.QUICK if args.quick else config.FULL
    out = output_dir(args.out, args.quick, "quality")
    cache = args.cache or ((out / ".cache") if args.quick else RESULTS_DIR / ".cache")
    try:  # before the run, not after its first dataset's models are trained
        writable_dir(cache)
    except OSError as e:
        print(f"python -m benchmarks.quality: error: --cache: cannot use {cache}: {e}", file=sys.stderr)
        return 2
    name = "quality_quick" if args.quick else "quality"
    payload = run(suite, cache, log=lambda s: print(s, flush=True))
    payload["machine"] = machine_info()
    payload["plots"] = [p.name for p in plots.plot_all(payload, out, name)]
    path = write_json(name, payload, directory=out)
    print(report.markdown(payload))
    whitened = report.whitening_markdown(payload)
    if whitened:
        print(f"\n{whitened}")
    print(f"wrote {path} and {', '.join(payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
