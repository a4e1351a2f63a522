"""Ctrl-C while a call starts its own LocalCluster (client=None) leaves no worker process behind (review141 F4);
while it closes that cluster at the end, the close finishes, without Dask's exit hook waiting 10 s (fr261)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

# Interrupts this process with a real SIGINT `delay` seconds after the LocalCluster's nannies have started
# their worker processes, then reports whether the interrupt landed while the cluster started, and which
# worker processes (children of this process, the multiprocessing resource tracker aside) are still alive.
SCRIPT = """
import json, multiprocessing, os, signal, sys, threading, time, traceback
import psutil
from tracin.distributed._cluster import local_client

delay = float(sys.argv[1])

user = []  # a process of the caller's own, started by another thread while the cluster starts


def interrupt():
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.01)
    user.append(multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,)))
    user[0].start()
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
starting = False
try:
    with local_client(2):
        time.sleep(60)  # the interrupt lands here if the cluster was up before it
except KeyboardInterrupt as e:
    starting = any(f.name == "_new_local_cluster" for f in traceback.extract_tb(e.__traceback__))
user_alive = user[0].is_alive()
user[0].kill()
user[0].join()
alive = [
    p.pid for p in psutil.Process().children()
    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    and "resource_tracker" not in " ".join(p.cmdline())
]
print(json.dumps({"starting": starting, "alive": alive, "user_alive": user_alive}))
"""


def test_interrupted_cluster_start_leaves_no_worker_process(tmp_path):
    """At a few points of the start (right after the worker processes were spawned, and later), the
    KeyboardInterrupt reaches the caller and no worker process of the half-started cluster is left; a
    process the caller's own thread started meanwhile is left running."""
    script = tmp_path / "interrupt.py"
    script.write_text(SCRIPT)
    landed = 0
    for delay in (0.0, 0.2, 0.5):
        done = subprocess.run([sys.executable, str(script), str(delay)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["alive"] == [], (delay, done.stderr)
        assert report["user_alive"], (delay, done.stderr)  # only the cluster's own processes are ended
        landed += report["starting"]
    if not landed:
        pytest.skip("no interrupt landed while the cluster started (a fast machine): nothing was tested")


# Interrupts this process with a real SIGINT as the LocalCluster's close at the end of local_client begins (the main
# thread waits for it), then reports, before Dask's exit hook runs, whether the cluster closed and its worker pids.
CLOSE_SCRIPT = """
import json, multiprocessing, os, signal, sys
from distributed import SpecCluster
from distributed.core import Status
from tracin.distributed._cluster import NANNY_PROCESS_NAME, local_client

if __name__ == "__main__":  # (the spawned worker processes import this script too)
    close, sent = SpecCluster._close, []

    async def interrupted_close(self):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return await close(self)

    SpecCluster._close = interrupted_close
    workers = []
    try:
        with local_client(2):
            workers = [p.pid for p in multiprocessing.active_children() if p.name == NANNY_PROCESS_NAME]
    except KeyboardInterrupt:
        print("script: interrupted", file=sys.stderr, flush=True)
    closed = all(c.status == Status.closed or not c.shutdown_on_close for c in SpecCluster._instances)
    print(json.dumps({"sent": bool(sent), "closed": closed, "workers": workers}), flush=True)
"""

CLOSING_S = 5.0  # the close at most, from the report to the process's end (Dask's exit hook waited 10 s: fr261)


def test_ctrl_c_while_the_cluster_closes_at_the_end_lets_that_close_finish(tmp_path):
    """fr261: a Ctrl-C as the LocalCluster closes at the end of the call (right after a short job's tasks)
    cancelled Dask's close and left the cluster 'closing': Dask's exit hook then waited its whole 10 s timeout
    before the process could exit. Now the close under way finishes: the cluster is closed before the exit hook,
    the process ends soon after, quietly, and no worker process is left."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # the report, printed after the interrupt, before the exit hook
        reported = time.monotonic()
        out, err = p.communicate(timeout=60)
        ended = time.monotonic() - reported
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    report = json.loads(line)
    assert report["sent"] and len(report["workers"]) == 2, (report, err)
    assert report["closed"], err
    assert ended < CLOSING_S, (ended, err)
    lines = err.strip().splitlines()  # the dashboard's line, then the interrupt's: no traceback or log of Dask's
    assert len(lines) == 2 and lines[0].startswith("tracin.distributed: LocalCluster of 2 workers"), err
    assert lines[1] == "script: interrupted", err
    alive = [pid for pid in report["workers"] if _alive(pid)]
    assert alive == [], err


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
