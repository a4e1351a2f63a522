""".ci/gpu-check's own logic, without a GPU and without building: a part that fails does not stop the
record, which names every part with its exit status and last lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """.ci/gpu-check with a Python whose `pip` fails at once (so nothing is built)."""
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2" == "-m pip" ]]; then echo "simulated build failure"; exit 7; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python)}
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu-check"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_failed_build_skips_what_needs_it_and_still_writes_the_record(tmp_path):
    done = run_check(tmp_path, "--cpu", "--out", str(tmp_path / "results"))
    assert done.returncode == 1, done.stdout + done.stderr
    record = json.loads((tmp_path / "results" / "gpu_quick.json").read_text())
    assert record["error"] == "no benchmark record"
    check = record["gpu_check"]
    assert check["device"] == "cpu" and check["passed"] is False
    parts = check["parts"]
    assert list(parts) == ["preflight", "build", "tests", "benchmark", "tiles"]
    assert parts["build"]["exit"] == 7 and parts["build"]["last_lines"] == ["simulated build failure"]
    for name in ("tests", "benchmark", "tiles"):
        assert parts[name]["exit"] == "skipped" and parts[name]["last_lines"] == [
            f"== {name} skipped: the build failed"
        ]
    assert "build      FAILED (7)" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [(["--gpu"], "unknown argument '--gpu' (expected --cpu or --out DIR)"), (["--out"], "--out needs a folder")],
)
def test_bad_arguments_are_refused(tmp_path, args, message):
    done = run_check(tmp_path, *args)
    assert done.returncode != 0 and message in done.stderr and "== preflight" not in done.stdout
