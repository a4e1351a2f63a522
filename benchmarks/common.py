"""Shared benchmark plumbing: interleaved timing with medians, peak memory, machine facts, JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Pause between timed calls of the full kernel run and between end-to-end repeats: OpenMP and BLAS
# worker threads of the previous call stop spinning and its freed memory settles. time_interleaved's
# default (0.25 s) serves the benchmarks whose calls run for seconds.
SETTLE_S = 1.0


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, else a usage error saying so (not a traceback later)."""
    import argparse

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return convert


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0, else a usage error saying so."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def description(doc: str) -> str:
    """A parser's description: the first paragraph of a module docstring, its wrapped lines joined."""
    return " ".join(doc.split("\n\n")[0].split())


def add_size_options(parser, full: dict, quick: dict, helps: dict[str, str]) -> None:
    """A --NAME flag per size of `full` (ints >= 1; several for a list), default None so that quick_or_given
    fills it from `full` or `quick`; its help names both defaults."""
    for name, value in full.items():
        nargs = "+" if isinstance(value, list) else None
        size = f"default {value}, {quick[name]} with --quick"
        parser.add_argument(
            f"--{name}", type=at_least(1), nargs=nargs, default=None, help=f"{helps.get(name, name)} ({size})"
        )


def quick_or_given(args, quick: dict, full: dict) -> None:
    """Fills each size of `args` left at None: from `quick` with --quick, else from `full`. A size
    given on the command line wins over both (so `--quick --n 1000` runs the quick run at n=1000)."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def record_name(base: str, quick: bool, options: list[tuple[object, object, str]]) -> str:
    """The name of a run's record: BASE (BASE_quick with --quick), then _LABEL for each (value, default,
    LABEL) of `options` whose value is not its default. Only a run of the recorded workload (every
    option at its default) writes the record README cites; any other (a subset of the cases, another
    ISA, other dims, checkpoints or test rows) gets a file of its own instead of overwriting it."""
    return "_".join(
        [f"{base}_quick" if quick else base, *(label for value, default, label in options if value != default)]
    )


def size_options(
    args, quick: dict, full: dict, skip: tuple[str, ...] = ("repeats",)
) -> list[tuple[object, object, str]]:
    """record_name's options for the sizes of quick_or_given (`skip`: those that change how often a
    workload is timed, not what it is): "size" as NGIB (store_4gib), a list as NAMEV1-V2 (threads1-2),
    any other as NAMEVALUE."""
    found = []
    for name, default in (quick if args.quick else full).items():
        if name in skip:
            continue
        value = getattr(args, name)
        shown = "-".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
        label = f"{shown}gib" if name == "size" else f"{name.replace('_', '-')}{shown}"
        found.append((value, default, label))
    return found


def agreement_gap(got: object, ref: object) -> float:
    """max |got - ref| / max |ref| in float64: inf where the shapes differ or `ref` is all zeros, nan
    where either holds a nan, so that only a result close to a non-zero reference passes a `<= tol`."""
    import numpy as np

    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if got.shape != ref.shape or scale == 0.0:
        return math.inf
    return float(np.abs(got - ref).max()) / scale


def check_agreement(prog: str, name: str, got: object, ref: object, tol: float, against: str) -> float:
    """agreement_gap of a contender `name`'s result, checked once before any timing: above `tol` (or of
    another shape) the program ends (exit code 1) with a line naming the contender and the gap, so that
    a wrong answer is never timed or recorded (python -O keeps the check). Returns the gap."""
    gap = agreement_gap(got, ref)
    if not gap <= tol:
        import numpy as np

        shapes = f" (shape {np.shape(got)}, expected {np.shape(ref)})" if np.shape(got) != np.shape(ref) else ""
        print(
            f"{prog}: error: {name} disagrees with {against}: max |difference| / max |reference| = {gap:.3g}, "
            f"above {tol:g}{shapes}; nothing timed",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return gap


def time_interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    pause_s: float = 0.25,
    after: Callable[[str], object] | None = None,
) -> dict[str, dict]:
    """Runs every contender `warmup` times, then `repeats` rounds of one call each (interleaved, so
    machine noise hits all alike). Returns per name {"median_s", "times_s"}.

    Each timed call starts `pause_s` after the previous one ends: OpenMP and BLAS worker threads
    keep spinning for a while after a call, and would otherwise tax whichever contender runs next.
    after(name), where given, runs after every call (warm-up ones too), outside the timed part and
    before the pause: e.g. to delete what the call wrote.
    """
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
            if after is not None:
                after(name)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            time.sleep(pause_s)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if after is not None:
                after(name)
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


def peak_rss_of(code: str, timeout: float = 1800) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of running `code` in a fresh Python process.

    Reads VmHWM from /proc/self/status where there is one: on Linux ru_maxrss of a child carries
    over the parent's peak (it is taken across fork/exec), so it would report this process's size.
    """
    wrapper = (
        "import resource, time\nt0 = time.perf_counter()\n"
        + code
        + "\ntry:\n    _peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
        "except (OSError, IndexError, ValueError):\n"
        "    _peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('__BENCH__', _peak / 1024, time.perf_counter() - t0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    line = next(s for s in out.splitlines() if s.startswith("__BENCH__"))
    _, rss, wall = line.split()
    return float(rss), float(wall)


CHECKOUT = Path(__file__).resolve().parent.parent  # the repository the benchmarks run from


def code_version(root: Path = CHECKOUT) -> dict:
    """The git commit checked out at `root` (the checkout the benchmarks run from) and whether tracked files
    differ from it; each None where git, or a repository whose top folder is `root`, is absent. Local
    only: no fetch."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout

    top = git("rev-parse", "--show-toplevel")  # not a repository that merely contains `root`
    commit = git("rev-parse", "--verify", "HEAD") if top and Path(top.strip()).resolve() == root.resolve() else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit.strip() if commit else None,
        "uncommitted_changes": None if status is None else bool(status.strip()),
    }


def machine_info() -> dict:
    """What the numbers were measured on, and with which code: code_version() (the commit, and whether
    tracked files differed from it), and how busy the machine was (the 1, 5 and 15 minute load averages
    when the record is written: the 5 and 15 minute ones span most runs)."""
    import numpy as np

    import tracin

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "tracin": tracin.__version__,
        "tracin_isa": tracin.detect_isa(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": list(os.getloadavg()),
        **code_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(s.split(":", 1)[1].strip() for s in f if s.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")} for p in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def writable_dir(out: Path) -> Path:
    """`out` made (with its parents) and probed with a file written and removed in it, so that a
    benchmark learns before its run, not after it, that its results cannot be saved there; OSError
    (an existing file, no permission, a read-only file system) as raised by the making or the probe."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".tracin-write-probe-"):
        pass
    return out


def _out_type(text: str) -> Path:
    """An argparse type for --out: a folder the results can be written to, else a usage error naming
    why (argparse names the option), before anything runs."""
    import argparse

    try:
        return writable_dir(Path(text))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text} cannot be written: {e.strerror or e}") from None


def output_dir(out: Path | None, quick: bool, name: str) -> Path:
    """Where a benchmark writes its results: `out` if given, else a new temporary folder for a
    quick (smoke) run, so that it leaves nothing in the checkout, else RESULTS_DIR. A given `out` is
    made and test-written (writable_dir): one that cannot be written ends the program with a line
    naming --out and exit code 2 (before the run, for the scripts that call this before it; those
    whose --out comes from add_output_options are checked when their arguments are parsed)."""
    if out is not None:
        try:
            return writable_dir(out)
        except OSError as e:
            print(f"error: --out: {out} cannot be written: {e.strerror or e}", file=sys.stderr)
            raise SystemExit(2) from None
    return Path(tempfile.mkdtemp(prefix=f"tracin-{name}-quick-")) if quick else RESULTS_DIR


def add_output_options(parser, quick_help: str | None = None) -> None:
    """--out (and, with `quick_help`, --quick) as every benchmark script has them; see output_dir. An
    --out that cannot be written (writable_dir) is a usage error when the arguments are parsed."""
    default = f"default: {RESULTS_DIR}"
    if quick_help is not None:
        parser.add_argument("--quick", action="store_true", help=quick_help)
        default += ", or a new temporary folder with --quick"
    parser.add_argument("--out", type=_out_type, default=None, help=f"output directory ({default})")


def write_json(name: str, payload: dict, directory: Path | None = None) -> Path:
    """Writes results/NAME.json (machine facts added) and returns its path."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    return path


def missing_modules(names: tuple[str, ...] | list[str]) -> list[str]:
    """The modules of `names` that are not installed (found without importing them)."""
    return [m for m in names if importlib.util.find_spec(m) is None]


def require_modules(prog: str, names: tuple[str, ...], extra: str) -> None:
    """Ends the program (exit code 1, as kernel / quality / fact_tracing do) with one line naming the
    modules of `names` that are not installed and `pip install 'tracin[EXTRA]'`, before any work."""
    missing = missing_modules(names)
    if missing:
        print(f"{prog}: error: needs {', '.join(missing)} (pip install 'tracin[{extra}]')", file=sys.stderr)
        raise SystemExit(1)


def peer_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution of `names` (None where it is not installed), for the
    record of a run that compares against them."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
