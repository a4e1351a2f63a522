"""The README's first command on a fresh checkout: install time, size on disk, demo time.

    python -m benchmarks.first_install [--repo .] [--keep]

Clones the repository's committed HEAD into a temporary folder, runs the README's demo command
there (a new venv, `pip install --no-cache-dir ".[demo]"`, `tracin demo`), then every `tracin`
command the demo printed, and writes results/first_install.json: seconds for the install and the
demo, the venv's size in MB, and each printed command's exit status. The targets: install
under 90 s and 1 GB. Packages come from whatever index pip is configured with (a registry mirror
near the machine is faster than PyPI over the internet), so the time is a lower bound elsewhere.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, add_output_options, write_json

INSTALL_TARGET_S = 90.0
SIZE_TARGET_MB = 1024.0


def _run(command: str, cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def _checked(what: str, done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if done.returncode:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def _next_commands(demo_output: str) -> list[str]:
    """The `tracin ...` lines the demo printed after 'next, try'."""
    lines = demo_output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("next, try")), len(lines))
    return [line.strip() for line in lines[start + 1 :] if line.strip().startswith("tracin ")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.first_install",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="the git checkout to clone (default: .)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and its venv")
    add_output_options(parser)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="tracin-first-install-"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_CONSTRAINT")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    try:
        clone = root / "tracin"
        _checked("git clone", _run(f"git clone -q {shlex.quote(str(args.repo.resolve()))} {clone}", root, env)[1])
        activate = "python3 -m venv .venv && . .venv/bin/activate"
        install_s, done = _run(f'{activate} && pip install -q --no-cache-dir ".[demo]"', clone, env)
        _checked("install", done)
        demo_s, done = _run(". .venv/bin/activate && tracin demo", clone, env)
        _checked("tracin demo", done)
        commands = _next_commands(done.stdout)
        statuses = {c: _run(f". .venv/bin/activate && {c}", clone, env)[1].returncode for c in commands}
        payload = {
            "benchmark": "first_install",
            "command": f'{activate} && pip install ".[demo]" && tracin demo',
            "install_s": install_s,
            "venv_mb": _size_mb(clone / ".venv"),
            "demo_s": demo_s,
            "next_commands": statuses,
            "targets": {"install_s": INSTALL_TARGET_S, "venv_mb": SIZE_TARGET_MB},
            "load_average": os.getloadavg(),
        }
        payload["meets_targets"] = (
            payload["install_s"] < INSTALL_TARGET_S
            and payload["venv_mb"] < SIZE_TARGET_MB
            and bool(statuses)
            and not any(statuses.values())
        )
        path = write_json("first_install", payload, args.out or RESULTS_DIR)
        print(
            f"install {install_s:.1f} s, venv {payload['venv_mb']:.0f} MB, demo {demo_s:.1f} s, "
            f"{len(statuses)} next commands, failed: {[c for c, s in statuses.items() if s] or 'none'} -> {path}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
