"""A worker that cannot import tracin, or runs another version of it, is named on the client before any
task is sent (review141 F1: such a worker failed to unpickle the tasks and the call waited forever)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

import tracin
import tracin.distributed as td

# A `dask worker` process (no nanny) whose tracin is missing (an import hook refuses it, as an
# environment without tracin would), unreadable (an OSError, as files without read permission give)
# or reports another version (as another release would).
WORKER = """
import sys
mode = sys.argv.pop(1)
if mode == "missing":
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tracin":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Refuse())
elif mode == "unreadable":
    class Unreadable:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tracin":
                raise PermissionError(13, "Permission denied", "tracin/__init__.py")
    sys.meta_path.insert(0, Unreadable())
else:
    import tracin
    tracin.__version__ = "0.0.9"
from distributed.cli.dask_worker import main
sys.argv[0] = "dask-worker"
main()
"""


def start_worker(tmp_path: Path, mode: str, scheduler: str) -> subprocess.Popen:
    """A worker process of the cluster at `scheduler` whose tracin is "missing", "unreadable" or "other"."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, str(script), mode, scheduler, "--nthreads", "1", "--no-nanny"]
        + ["--host", "127.0.0.1", "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "mode, named",
    [
        ("missing", "no tracin (cannot import it)"),
        ("unreadable", "cannot import tracin (PermissionError: [Errno 13] Permission denied: 'tracin/__init__.py')"),
        ("other", "tracin 0.0.9"),
    ],
)
def test_a_worker_without_the_clients_tracin_is_named(tied, tmp_path: Path, mode: str, named: str):
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        good = set(c.scheduler_info()["workers"])
        worker = start_worker(tmp_path, mode, cluster.scheduler_address)
        try:
            c.wait_for_workers(2, timeout=120)
            (bad,) = set(c.scheduler_info()["workers"]) - good
            calls = [
                lambda: td.top_k(tied["test"], tied["store"], 3, client=c, shards=4, progress=False),
                lambda: td.self_influence(tied["store"], client=c, shards=4, progress=False),
            ]
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                for call in calls:
                    try:
                        error = pool.submit(call).exception(timeout=120)
                    except concurrent.futures.TimeoutError:
                        pytest.fail("the call neither returned nor raised")
                    assert isinstance(error, RuntimeError), error
                    message = str(error)
                    assert f"{bad}: {named}" in message
                    assert f"needs tracin {tracin.__version__}, this client's version, on every worker" in message
                    assert "1 of the 2 workers" in message
                    assert not any(w in message for w in good)
        finally:
            worker.kill()
            worker.wait()


def test_a_first_worker_without_tracin_is_named_after_the_wait_for_it(tied, tmp_path: Path):
    """A cluster with no worker yet: the task kept pending while the first worker is waited for is
    the standard library's, so a first worker without tracin stays to be named (a task of tracin broke
    its connection before the check, and the call waited for good)."""
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,  # left last: closing the client ends a hung call
        LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        call = pool.submit(td.self_influence, tied["store"], client=c, shards=2, progress=False, worker_timeout=300)
        worker = start_worker(tmp_path, "missing", cluster.scheduler_address)
        try:
            error = call.exception(timeout=60)
        except concurrent.futures.TimeoutError:
            pytest.fail("the call neither returned nor raised")
        finally:
            worker.kill()
            worker.wait()
        assert isinstance(error, RuntimeError), error
        assert "1 of the 1 workers" in str(error) and ": no tracin (cannot import it)" in str(error)
