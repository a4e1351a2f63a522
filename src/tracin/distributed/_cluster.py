"""The Dask client to run on, and how many kernel threads each task may use."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import math
import multiprocessing
import numbers
import pkgutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Any

import dask
from dask.utils import parse_timedelta
from distributed import Client, LocalCluster, SpecCluster, WorkerPlugin, default_client, get_worker
from distributed.comm import CommClosedError, get_address_host
from distributed.utils import sync

from .._cpus import usable_cores


def check_client(client: Any) -> None:
    """A TypeError unless `client` is a distributed.Client or None; a ValueError if it is closed; a
    ConnectionError if it lost its scheduler and does not get it back (check_connected)."""
    if client is None:
        return
    if not isinstance(client, Client):
        raise TypeError(
            f"client must be a distributed.Client or None, got {type(client).__name__}{_client_hint(client)}"
        )
    if client.status in ("closing", "closed"):
        raise ValueError(
            f"client is closed (status {client.status!r}; closed, or it lost its scheduler and could not "
            "reconnect): pass a running distributed.Client"
        )
    check_connected(client)


def _client_hint(client: Any) -> str:
    """What to pass instead of a cluster object or a scheduler's address given as client=."""
    if isinstance(client, str):
        if client.strip().lower() == "local":  # the CLI's --scheduler local: no address
            return (
                f" ({client!r}): leave client=None to run on a LocalCluster made for the call (or the default client)"
            )
        return f" ({client!r}): pass distributed.Client({client!r}) to use the scheduler at that address"
    try:  # an object's own property may raise anything (a cluster not started): the TypeError still stands
        cluster = callable(getattr(client, "scale", None)) and hasattr(client, "scheduler_address")
    except Exception:
        cluster = False
    if cluster:
        return " (a cluster object): pass distributed.Client(cluster), a client of that cluster"
    return ""


@contextmanager
def client_for(client: Any) -> Iterator[Client]:
    """`client` if given; else the default client if one exists; else a LocalCluster for the call:
    one single-threaded worker process per core, on loopback only, its dashboard link printed."""
    if client is None:
        client = default_client_or_none()
    if client is not None:
        check_client(client)
        yield client
        return
    with local_client(usable_cores()) as local:
        yield local


@contextmanager
def local_client(n_workers: int) -> Iterator[Client]:
    """A client of a new LocalCluster: `n_workers` single-threaded worker processes on loopback
    only, its dashboard link printed on stderr; closed at the end. Its logs show warnings and errors
    (why a worker died or was restarted: out of memory, killed) but not a task's error, which reaches
    the caller as it is (the worker would also log it, with its traceback, before: QuietTaskErrors).
    Left by an exception (Ctrl-C, an error), the cluster is closed quietly: its nannies would log each
    worker process still running a task 4 s after they asked it to close, before they kill it. A Ctrl-C
    while the cluster closes at the end lets that close finish (_close_uncancelled)."""
    logging.getLogger("tornado.application").addFilter(_no_unstarted_sync_cancel)  # added once: the same function
    cluster = _new_local_cluster(n_workers)
    closing: concurrent.futures.Future | None = None
    try:
        with Client(cluster) as local:
            local.register_plugin(QuietTaskErrors())  # on every worker, restarted ones included
            needs = "" if importlib.util.find_spec("bokeh") else " (its plots need: pip install bokeh)"
            print(
                f"tracin.distributed: LocalCluster of {len(cluster.workers)} workers, dashboard "
                f"{local.dashboard_link}{needs}",
                file=sys.stderr,
            )
            yield local
        closing = _close_uncancelled(cluster)
        closing.result()
    except BaseException:
        _close_quietly(cluster, closing)
        raise
    cluster.close()  # closed by now: stops the thread of its event loop


def _no_unstarted_sync_cancel(record: logging.LogRecord) -> bool:
    """False for tornado's log of the NameError that Dask's sync() raises on its event loop when a Ctrl-C
    interrupts the caller's wait before the awaited call began there (its cancel callback reads a future not
    yet assigned): nothing was running to cancel; the caller's KeyboardInterrupt goes on as it is."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, NameError) and "sync.<locals>.cancel" in record.getMessage())


def _close_uncancelled(cluster: SpecCluster) -> concurrent.futures.Future:
    """The close of `cluster`, started on its event loop: a future that an interrupt of the caller's wait
    for it leaves running. (Interrupted, cluster.close() cancels its close there and leaves the cluster
    'closing' for good: every later close, Dask's exit hook's included, then waits out its whole timeout,
    10 s, for that state to end.)"""
    return asyncio.run_coroutine_threadsafe(cluster._close(), cluster.loop.asyncio_loop)


def _new_local_cluster(n_workers: int) -> LocalCluster:
    """LocalCluster(n_workers single-threaded processes on loopback). Interrupted while it starts (Ctrl-C,
    or SIGTERM raised as an exception), the half-started cluster, which the caller never got, is closed
    here, quietly, before the interrupt goes on: left to Dask's exit hook (close_clusters), its close
    fails on the cluster's unfinished state and prints a traceback of some 30-50 lines after the
    caller's own one-line message; the worker processes its nannies had started by then, which that
    close leaves running, are ended too (_end_processes); other processes started meanwhile (by another
    thread of the caller's) are left alone. Its worker processes never see a SIGINT or SIGHUP (dask_setup),
    so that a terminal's Ctrl-C or hangup, sent to the whole process group, reaches the caller alone."""
    before = {id(c) for c in list(SpecCluster._instances)}
    children = set(multiprocessing.active_children())
    try:
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
            **nanny_preloads(),  # dask_setup
        )
    except BaseException:
        for cluster in [c for c in list(SpecCluster._instances) if id(c) not in before]:
            _close_quietly(cluster)
        _end_processes(
            [p for p in multiprocessing.active_children() if p not in children and p.name == NANNY_PROCESS_NAME]
        )
        raise


def dask_setup(nanny: Any) -> None:
    """Dask's preload hook, run by each nanny of _new_local_cluster as it starts, in this process, on the
    cluster's event-loop thread, before it spawns its worker process: blocks SIGINT and SIGHUP in that
    thread. The threads that thread starts, those that spawn the worker processes included, inherit the
    blocked signals, and so do the processes they spawn: a blocked signal stays blocked across fork and
    exec, where a Python handler does not. So every worker process, from its first instruction (importing
    the caller's main module) to its end, and those the nanny restarts later, leaves a SIGINT pending
    instead of raising KeyboardInterrupt with a traceback of its own (and a SIGHUP instead of dying, which
    its nanny would log and restart): a terminal's Ctrl-C or hangup, sent to the whole foreground process
    group, reaches the caller alone, whose main thread keeps both unblocked and closes the cluster (a
    worker process ends on SIGTERM). Multiprocessing's resource tracker, where this thread starts it,
    keeps SIGHUP blocked too (it ignores SIGINT itself); starting it unblocks SIGINT in the thread that
    does, so SIGINT is blocked after. The caller's own threads are unchanged. (POSIX only.)"""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def nanny_preloads() -> dict[str, list]:
    """LocalCluster's preload_nanny and preload_nanny_argv: those of Dask's config (distributed.nanny.preload
    and preload-argv), then this module (its dask_setup, which takes no arguments)."""
    preload = dask.config.get("distributed.nanny.preload", default=None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = list(dask.config.get("distributed.nanny.preload-argv", default=None) or [])
    if argv and not isinstance(argv[0], str):  # a list of arguments per preload
        argv.append([])
    return {"preload_nanny": [*preload, __name__], "preload_nanny_argv": argv}


NANNY_PROCESS_NAME = "Dask Worker process (from Nanny)"  # a Dask nanny's worker process: those alone are ended
CLOSE_TIMEOUT_S = 10  # the longest an interrupted or half-started LocalCluster's close may take (as Dask's exit hook's)


def _close_quietly(cluster: Any, closing: concurrent.futures.Future | None = None) -> None:
    """Closes `cluster` (its workers' processes, its scheduler, its event loop's thread), whatever state
    it is in, without raising or logging; Dask's exit hook is told to leave it alone. `closing`: its
    close already under way (_close_uncancelled), which is waited for instead."""
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)  # 'Nanny failed to start' and the like, of a close we asked for
    try:
        if closing is not None:
            closing.result(timeout=CLOSE_TIMEOUT_S)
        else:
            cluster.close(timeout=CLOSE_TIMEOUT_S)
    except BaseException:  # its unfinished state (AssertionError: Status.init), a timeout, another Ctrl-C
        pass
    finally:
        cluster.shutdown_on_close = False  # close_clusters, at exit, skips it
        try:
            cluster._loop_runner.stop()
        except BaseException:
            pass
        quiet.setLevel(level)


def _end_processes(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Terminates `processes` (SIGTERM), then kills those still alive after CLOSE_TIMEOUT_S seconds
    (SIGKILL), and reaps them, whatever interrupts this meanwhile. Their nanny's watcher thread, joining
    them too, may find them reaped here: Dask's warning of that is dropped from then on (_not_reaped_here)."""
    logging.getLogger("distributed.process").addFilter(_not_reaped_here)  # added once: the same function
    for p in processes:
        with contextlib.suppress(BaseException):
            p.terminate()
    for p in processes:
        with contextlib.suppress(BaseException):
            p.join(CLOSE_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join(CLOSE_TIMEOUT_S)


def _not_reaped_here(record: logging.LogRecord) -> bool:
    """False for Dask's warning that a worker process's exit status was already read (by _end_processes,
    which a nanny's watcher thread raced to reap it); the process still ended: nothing to act on."""
    return "exit status was already read" not in str(record.msg)


HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"  # distributed.worker's log of an OSError


class QuietTaskErrors(WorkerPlugin):
    """Drops the worker's 'Compute Failed' log of a task's error (which the caller gets, with its
    remote traceback), its log of a running task that its close cancelled (the caller closed the
    cluster, as on Ctrl-C), and its traceback of a heartbeat that found the scheduler gone (which lives
    in the caller's process: gone as the caller closes the cluster, before the worker is told to close),
    and nothing else of the worker's logs."""

    name = "tracin-quiet-task-errors"

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed.worker").addFilter(_no_task_error)
        logging.getLogger("distributed.worker.state_machine").addFilter(_no_cancelled_task)


def _no_task_error(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Compute Failed") or message.startswith(HEARTBEAT_FAILED))


def _no_cancelled_task(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Async instruction for") and message.endswith("ended with CancelledError"))


def default_client_or_none() -> Client | None:
    """Dask's default client of this process, if there is one."""
    try:
        return default_client()
    except ValueError:  # no client in this process
        return None


def check_connected(client: Client, address: str | None = None) -> None:
    """Returns once `client` is running. While it reconnects to a scheduler it lost (status
    'connecting'), waits until Dask's reconnection ends (the client's connect timeout, 30 s by
    default), then a ConnectionError naming the scheduler and the client's status unless it got back:
    a client whose scheduler died fails with it, not with what its emptied state makes of later calls.
    `address`: the scheduler's, when known from before (a closed client forgets it)."""
    if client.status == "running":
        return
    address = address or scheduler_address(client)
    if client.status == "connecting":
        deadline = time.monotonic() + reconnect_s(client) + RECONNECT_MARGIN_S
        while client.status == "connecting" and time.monotonic() < deadline:
            time.sleep(0.05)
        if client.status == "running":
            return
        raise ConnectionError(
            f"the client lost its scheduler at {address} and could not reconnect (status {client.status!r} "
            "now): pass a client of a running scheduler"
        )
    raise ConnectionError(
        f"the client of the scheduler at {address} is not connected (status {client.status!r}): pass a running "
        "distributed.Client"
    )


RECONNECT_MARGIN_S = 5.0  # waited beyond the client's own reconnect timeout for its status to settle


def scheduler_address(client: Client) -> str:
    """The address of `client`'s scheduler, as far as it still knows it."""
    scheduler = getattr(client, "scheduler", None)
    return getattr(scheduler, "address", None) or "(its address is no longer known)"


def reconnect_s(client: Client) -> float:
    """How long `client` tries to reconnect to a lost scheduler: its timeout (Client(timeout=)),
    else Dask's connect timeout."""
    timeout = getattr(client, "_timeout", None)
    if isinstance(timeout, numbers.Real) and math.isfinite(timeout):
        return float(timeout)
    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds"))


def check_worker_timeout(worker_timeout: Any) -> float | None:
    """worker_timeout as a float of seconds (a finite number > 0), or None (no limit)."""
    if worker_timeout is None:
        return None
    if isinstance(worker_timeout, bool) or not isinstance(worker_timeout, numbers.Real):
        raise TypeError(f"worker_timeout must be a number of seconds or None, got {worker_timeout!r}")
    if not (math.isfinite(worker_timeout) and worker_timeout > 0):
        raise ValueError(
            f"worker_timeout must be a finite number of seconds > 0, or None for no limit, got {worker_timeout!r}"
        )
    return float(worker_timeout)


def slots_by_host(client: Client, worker_timeout: float | None = None, wait: bool = False) -> dict[str, int]:
    """Task slots (worker threads) per host: tasks that may run there at once. A cluster with no
    worker yet (say dask-jobqueue right after scale(), or one scaled by cluster.adapt(minimum=0)) is
    named on stderr, and its first worker is waited for up to `worker_timeout` seconds (then a
    TimeoutError naming worker_timeout). With worker_timeout None: without limit if `wait` (an export,
    which cuts one row range per slot), else not at all: the call goes on with no slots and its tasks
    wait in the scheduler's queue. While it waits, a placeholder task is pending on the scheduler, so
    that an adaptive cluster, which starts workers only for pending work, starts one; it is released
    once a worker has come (or the wait ends). The workers found are then asked for their tracin
    version (check_workers_tracin)."""
    where = scheduler_address(client)
    workers = _workers(client, where)
    if not workers:
        if worker_timeout is None and not wait:
            print(
                f"tracin.distributed: the cluster at {where} has no workers yet; its tasks start when workers join "
                "(worker_timeout= bounds the wait)",
                file=sys.stderr,
            )
            return {}
        limit = "" if worker_timeout is None else f" up to {worker_timeout:g} s (worker_timeout)"
        print(
            f"tracin.distributed: the cluster at {where} has no workers yet; waiting{limit} for one "
            "(interrupt to stop)",
            file=sys.stderr,
        )
        # int() does nothing, and is the standard library's: a first worker without tracin runs it and stays (a
        # function of tracin would break its connection, before check_workers_tracin could name it)
        placeholder = client.submit(int, pure=False, key=f"tracin-wait-for-a-worker-{uuid.uuid4().hex}")
        try:
            client.wait_for_workers(1, timeout=worker_timeout)
        except TimeoutError:
            raise TimeoutError(
                f"the cluster at {where} still has no workers after worker_timeout={worker_timeout:g} s: start "
                "some (cluster.scale(n); an adaptive cluster had a task pending to start one for), pass a client "
                "whose cluster has workers, or a larger worker_timeout (None: no limit)"
            ) from None
        finally:
            placeholder.release()
        workers = _workers(client, where)
    check_workers_tracin(client, where)
    slots: Counter[str] = Counter()
    for w in workers.values():
        slots[w["host"]] += w["nthreads"]
    return dict(slots)


class WorkersTracinError(RuntimeError):
    """Workers that cannot import tracin, or run another version than the client's (check_workers_tracin)."""


def check_workers_tracin(client: Client, address: str) -> None:
    """A WorkersTracinError (a RuntimeError) naming each worker of the cluster at `address` that cannot
    import tracin, or whose tracin.__version__ differs from this process's: the tasks travel as references
    to tracin's own functions, which such a worker fails to unpickle (Dask then drops its connection and
    the call waits for good, printing nothing) or runs as another release. The probe,
    pkgutil.resolve_name, is the standard library's, so any worker can run it. Workers that join after
    this check are not probed."""
    from .. import __version__ as ours

    found = client.run(pkgutil.resolve_name, "tracin:__version__", on_error="return")
    bad = {w: v for w, v in found.items() if v != ours and not _left(v)}
    if not bad:
        return
    named = "; ".join(
        f"{w}: {_probe_failure(v)}" if isinstance(v, BaseException) else f"{w}: tracin {v}"
        for w, v in sorted(bad.items())
    )
    raise WorkersTracinError(
        f"tracin.distributed needs tracin {ours}, this client's version, on every worker; "
        f"{len(bad)} of the {len(found)} workers of the cluster at {address} differ ({named}): install "
        f"tracin=={ours} in the workers' environment"
    )


def _left(answer: Any) -> bool:
    """Whether a worker's answer to the probe is the scheduler's failure to reach it (it left since: the
    connection closed, or Dask's connect timed out), not an error of its own import (a PermissionError
    reading tracin's files is an OSError too, and such a worker cannot read the tasks either)."""
    return isinstance(answer, CommClosedError) or type(answer) is OSError


def _probe_failure(e: BaseException) -> str:
    """A worker's failure to import tracin, in words."""
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "tracin":
        return "no tracin (cannot import it)"
    return f"cannot import tracin ({type(e).__name__}: {e})"


def _workers(client: Client, address: str) -> dict[str, Any]:
    """The scheduler's record of each worker, fetched now; a ConnectionError naming the scheduler at
    `address` when the client lost it (Dask then answers with the state it last had, or none)."""
    check_connected(client, address)
    info = client.scheduler_info(n_workers=-1)
    check_connected(client, address)
    if "workers" not in info:  # (an emptied record: the client closed meanwhile)
        raise ConnectionError(
            f"the client of the scheduler at {address} got no record of its workers (status {client.status!r}): "
            "pass a client of a running scheduler"
        )
    return info["workers"]


def worker_name() -> str:
    """This Dask worker's address, or the host's name outside a worker (say a task called directly)."""
    try:
        return get_worker().address
    except ValueError:  # not in a worker
        return f"{socket.gethostname()} (not a Dask worker)"


def kernel_threads(num_threads: int | None) -> int:
    """On a worker: num_threads if given, else this host's cores shared evenly among the task slots
    (worker threads) on it as the scheduler records them now (host_slots; 1 with the default
    LocalCluster), so that tasks running at once do not oversubscribe, workers that joined after the
    call began included."""
    if num_threads is not None:
        return num_threads
    return max(1, usable_cores() // host_slots(get_worker()))


HOST_SLOTS_TTL_S = 5.0  # how long a worker process reuses its count of its host's task slots
SCHEDULER_ASK_S = 10.0  # the longest a worker waits for the scheduler's answer (then: its last count)
HOST_SLOTS_RETRY_S = 60.0  # how long a worker process goes on with that count before asking again
_HOST_SLOTS_LOCK = threading.Lock()
_host_slots: dict[str, tuple[float, int]] = {}  # worker address -> (time.monotonic() to ask again by, slots)


def host_slots(worker: Any) -> int:
    """The threads of all workers on `worker`'s host, this one's included, as the scheduler records
    them (its ncores: one small reply), asked at most once every HOST_SLOTS_TTL_S per worker process,
    not per task. Where the scheduler does not answer within SCHEDULER_ASK_S: the last count (the
    worker's own threads if none), kept HOST_SLOTS_RETRY_S, so that its tasks do not each wait."""
    now = time.monotonic()
    with _HOST_SLOTS_LOCK:
        known = _host_slots.get(worker.address)
    if known is not None and now < known[0]:
        return known[1]
    own, host = worker.state.nthreads, get_address_host(worker.address)
    try:
        threads = sync(worker.loop, worker.scheduler.ncores, callback_timeout=SCHEDULER_ASK_S)
    except Exception:  # the scheduler gone or slow: the task runs, sharing its host as far as known here
        count = known[1] if known is not None else own
        with _HOST_SLOTS_LOCK:
            _host_slots[worker.address] = (time.monotonic() + HOST_SLOTS_RETRY_S, count)
        return count
    count = sum(n for address, n in threads.items() if get_address_host(address) == host)
    count = max(count, own)
    with _HOST_SLOTS_LOCK:
        _host_slots[worker.address] = (now + HOST_SLOTS_TTL_S, count)
    return count


def planned_slots(client: Client, slots: dict[str, int]) -> int:
    """The task slots the cluster heads for: those seen now (`slots`, per host), or more where this
    client holds its cluster object (a LocalCluster, dask-jobqueue's clusters): the workers it was asked
    for (scale(n), jobs still queued included), or its adaptive maximum when finite (adapt(maximum=n)),
    each counted with the threads of the workers seen (on average; 1 with none)."""
    seen = sum(slots.values())
    cluster = getattr(client, "cluster", None)
    if cluster is None:
        return seen
    threads = list(client.nthreads().values())
    per_worker = max(1, round(sum(threads) / len(threads))) if threads else 1
    requested = len(getattr(cluster, "plan", ()))  # the workers asked for, started or not
    adaptive = getattr(cluster, "_adaptive", None)
    maximum = getattr(adaptive, "maximum", math.inf)
    planned = max(requested, maximum if isinstance(maximum, int) else 0)
    return max(seen, planned * per_worker)
