""".ci/gpu-check stopped part-way (as a lent GPU's command limit stops it): what finished is already in
--out, the running part is stopped with what it started and recorded, nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_check_stopped_during_the_build_keeps_what_finished_and_leaves_nothing_running(tmp_path):
    """A Python whose `pip` (the build) starts a long child that ignores TERM: TERM to gpu-check's bash
    alone (not its process group) while it runs kills that child too (the build's log stays open until
    it ends), and the record names the build as stopped. The preflight is faked as well: it needs build
    tools that a venv set up as the README says lacks."""
    pid_file, out = tmp_path / "build.pid", tmp_path / "results"
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == */preflight.py ]]; then echo "preflight (faked)"; exit 0; fi\n'
        'if [[ "$1 $2" == "-m pip" ]]; then echo "building"; (trap "" TERM; exec sleep 300) & echo $! >'
        + f"{pid_file}; wait; exit 0; fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    check = subprocess.Popen(
        ["bash", str(ROOT / ".ci" / "gpu-check"), "--cpu", "--out", str(out)],
        env={**os.environ, "PYTHON": str(python)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for(pid_file.exists, 60) and wait_for(lambda: pid_file.read_text().strip() != "", 5)
        child = int(pid_file.read_text())
        assert alive(child)
        record = json.loads((out / "gpu_quick.json").read_text())  # written after the preflight already
        assert list(record["gpu_check"]["parts"]) == ["preflight"]
        check.send_signal(signal.SIGTERM)
        printed, _ = check.communicate(timeout=30)
    finally:
        check.kill()
    assert check.returncode == 128 + signal.SIGTERM, printed
    assert wait_for(lambda: not alive(child), 15), "the build's child outlived gpu-check"
    record = json.loads((out / "gpu_quick.json").read_text())
    assert record["error"] == "no benchmark record"
    parts = record["gpu_check"]["parts"]
    assert list(parts) == ["preflight", "build"] and record["gpu_check"]["passed"] is False
    assert parts["preflight"]["exit"] == 0 and parts["preflight"]["last_lines"] == ["preflight (faked)"]
    assert parts["build"]["exit"] == 128 + signal.SIGTERM
    assert parts["build"]["last_lines"] == ["building", "gpu-check: stopped by SIGTERM while build ran"]
    logs = out / "gpu-check-logs"
    assert sorted(p.name for p in logs.iterdir()) == ["build.log", "preflight.log"]
    assert "build      FAILED (143)" in printed
