"""tracin.torch / tracin.jax export_gradients on a Dask cluster: row ranges written into one store."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import cloudpickle

from .._export.driver import store_rows
from .._progress import check_progress
from .._validate import positive_int
from ..store import GradientStore
from ._cluster import client_for, default_client_or_none, kernel_threads, slots_by_host
from ._run import Job, TaskFailedError
from ._shards import shard_ranges

ADAPTERS = ("torch", "jax")
_THREADS_LOCK = threading.Lock()
_threads_users = [0, 0]  # [tasks inside torch_threads in this process, torch's default count before the first]


def export_gradients(
    adapter: str,
    *args: Any,
    store: str | os.PathLike,
    client: Any = None,
    shards: int | None = None,
    num_threads: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> GradientStore:
    """tracin.<adapter>.export_gradients(*args, store=store, **kwargs) on a Dask cluster: the finished
    store, byte for byte the one a single-process export writes with the tasks' thread count (torch
    splits a batch's rows differently over 2 threads than over 1: such exports differ in the last bits).

    adapter: "torch" (args: model, checkpoints, data, loss_fn) or "jax" (args: loss_fn, checkpoints,
        data); kwargs: that function's keyword options (layers, mode, projection, dtype, batch_size...).
    store: the store's directory; every worker must see it at this path (a shared file system).
    The client creates the store, each task exports one row range for every checkpoint into it (a
    range writer: every batch is computed whole, as in one export, and cut to the range), and the
    client finally merges the ranges' progress and finalizes the store. A task whose worker dies is
    run again by Dask and resumes after its last written block; running the same call again after
    an interruption resumes the store. args and kwargs travel to the workers pickled (cloudpickle:
    lambdas and torch modules pickle; checkpoints given as paths must be readable there), once per
    worker; each task reads all the data but computes only its rows.
    client: a distributed.Client; None: the default client, else a LocalCluster for this call. A
        cluster with no worker yet is waited for, without limit (_cluster.WORKER_WAIT_S sets one).
    shards: number of row ranges (None: one per worker thread, at most one per row). Each task reads
        all the data once per checkpoint, plus once to check its fingerprint, so more shards read more.
    num_threads: torch intra-op threads per task (None: each host's cores shared among its worker
        threads, 1 on the default LocalCluster); the JAX adapter leaves its threads as they are.
    progress: a tqdm bar over shards (None: after a few seconds, if tqdm is installed).
    """
    fn = _export_function(adapter)
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a directory path that every worker sees, got {type(store).__name__}")
    shards = None if shards is None else positive_int(shards, "shards")
    num_threads = None if num_threads is None else positive_int(num_threads, "num_threads", maximum=4096)
    check_progress(progress)
    path = os.path.abspath(store)
    with _range_writers_named(path), store_rows(0, 0):  # creates the store (or checks the one there)
        fn(*args, store=path, progress=False, **kwargs)
    n_rows = GradientStore.open(path, allow_partial=True).info()["rows"]  # all rows, not the written prefix
    outside = client is not None or default_client_or_none() is not None  # else a LocalCluster of the call's own
    with client_for(client) as c:
        job, slots = Job(c, f"export ({adapter})"), slots_by_host(c, wait=True)
        # pickled here as they are: Dask's own serializer of torch modules loses their hook dicts' type
        sent = job.send(cloudpickle.dumps((args, kwargs)))
        slot_count = sum(slots.values())
        ranges = shard_ranges(n_rows, 1, slot_count, shards or slot_count)
        parts = [
            job.submit(export_part, adapter, sent, path, a, b, num_threads, slots, label=f"rows [{a}, {b}) of {path}")
            for a, b in ranges
        ]
        try:
            job.wait(parts, progress)
        except (KeyboardInterrupt, TaskFailedError) as e:  # interrupted, or workers lost: a rerun resumes
            if outside:  # else the call's own LocalCluster, closed on the way out, stops its tasks
                _noted(
                    e,
                    f"tracin.distributed export of {path}: its tasks already running on the workers go on until "
                    "their rows are written (cancelling stops only those not started); wait for them before "
                    "calling again to resume, or call client.restart()",
                )
            raise
    with _range_writers_named(path):
        return fn(*args, store=path, progress=False, **kwargs)  # merges the ranges' progress and finalizes


def _noted(e: BaseException, note: str) -> None:
    """`note` added to e's notes (shown after its traceback), or printed on stderr before Python 3.11."""
    if hasattr(e, "add_note"):
        e.add_note(note)
    else:
        print(note, file=sys.stderr)


@contextmanager
def _range_writers_named(path: str) -> Iterator[None]:
    """The store's lock refusing a writer of the whole store while range writers (tasks) hold it: a
    RuntimeError saying which, and that they may be the tasks of an interrupted export."""
    try:
        yield
    except RuntimeError as e:
        ranges = sorted(p.name for p in Path(path).glob("rows-*.lock"))
        if "is being written by" not in str(e) or not ranges:
            raise
        raise RuntimeError(
            f"{e}. Range writers of this store ({', '.join(ranges)}) may be the tasks of an interrupted or failed "
            "tracin.distributed export, still running on the workers (cancelling a Dask task does not stop one "
            "that started, and the scheduler no longer lists it): wait for them to finish, or call "
            "client.restart(), then call again to resume"
        ) from e


def export_part(
    adapter: str, sent: bytes, path: str, start: int, stop: int, num_threads: int | None, slots: dict[str, int]
) -> None:
    """On a worker: rows [start, stop) of the export (args and kwargs cloudpickled in `sent`),
    written into the store at `path`."""
    args, kwargs = cloudpickle.loads(sent)
    export = _export_function(adapter)
    threads = torch_threads(kernel_threads(num_threads, slots)) if adapter == "torch" else nullcontext()
    try:
        with threads, store_rows(start, stop):
            export(*args, store=path, progress=False, **kwargs)
    except AssertionError as e:  # multiprocessing's, when data starts processes in a daemonic worker
        if "daemonic processes are not allowed to have children" not in str(e):
            raise
        raise ValueError(
            "data: reading it started worker processes (a torch DataLoader with num_workers > 0?), which a "
            "Dask worker process cannot start (it is daemonic): pass a DataLoader with num_workers=0 (each "
            "task reads all the data and computes only its rows), or start the workers with the Dask config "
            "distributed.worker.daemon=False"
        ) from e


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count n for the task running inside, on its thread. torch keeps a count
    per thread, and a default that threads started later take (set by any thread's set_num_threads):
    each task gives its thread back its own count, and once the last task of this process has left,
    the default from before the first is set again, from a fresh thread (no task's count changes)."""
    import torch

    mine = torch.get_num_threads()
    with _THREADS_LOCK:
        if _threads_users[0] == 0:
            _threads_users[1] = _on_new_thread(torch.get_num_threads)
        _threads_users[0] += 1
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            torch.set_num_threads(mine)
            _threads_users[0] -= 1
            if _threads_users[0] == 0:
                before = _threads_users[1]
                _on_new_thread(lambda: torch.set_num_threads(before))


def _on_new_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a new thread (what torch.get_num_threads reads there is the default, not a task's leftover)."""
    found: list[Any] = []
    reader = threading.Thread(target=lambda: found.append(fn()))
    reader.start()
    reader.join()
    return found[0]


def _export_function(adapter: Any) -> Callable[..., Any]:
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    return importlib.import_module(f"tracin.{adapter}").export_gradients
