"""tracin.torch / tracin.jax export_gradients on a Dask cluster: row ranges written into one store."""

from __future__ import annotations

import bisect
import hashlib
import heapq
import importlib
import inspect
import io
import os
import pickle
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

import cloudpickle

from .._export.driver import batch_starts, store_rows, store_state_unsaid
from .._progress import check_progress, progress_bar
from .._validate import positive_int
from ..store import GradientStore, _locks
from ..store._files import MAX_MANIFEST_BYTES, open_file, read_all, read_manifest
from ..store._format import Manifest, merge_ranges, strict_json
from ..store._locks import DirectoryLock, range_files
from . import _warnings
from ._cluster import (
    check_client,
    check_worker_timeout,
    client_for,
    default_client_or_none,
    kernel_threads,
    planned_slots,
    slots_by_host,
    worker_name,
)
from ._run import Job, TaskFailedError
from ._shards import refuse_unseen
from ._warnings import add_note as _noted_here  # also the notes of the warnings a task raised

ADAPTERS = ("torch", "jax")
# what resume.refuse_another_export says of a store exported from other inputs (the changes in group 1)
_OTHER_INPUTS = re.compile(r"holds gradients exported from other inputs: (.*?)\. Rows from both cannot be mixed", re.S)
JOIN_BELOW = 1000  # gaps this close (a fraction of the rows) share a task: see cut()
POLL_S = 1.0  # how often the bar of rows written reads the range writers' progress files
POLLER_JOIN_S = 5.0  # how long the end of rows_bar waits for a poll under way (a hung file system)
_THREADS_LOCK = threading.Lock()
_threads_users = [0, 0]  # [tasks inside torch_threads in this process, torch's default count before the first]


def export_gradients(
    adapter: str,
    *args: Any,
    store: str | os.PathLike,
    client: Any = None,
    worker_timeout: float | None = None,
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
    lambdas and torch modules pickle; something that does not is a TypeError naming it), once, as
    given, into a temporary file before anything is read (even for a finished store, for nothing),
    then sent once per worker; checkpoints and optimizer states given as relative paths are made
    absolute here, and must be readable at that path there. Each task reads all the data but
    computes only its rows; a worker that does not see the store, or reads other data or
    checkpoints than the client, fails the call with a ValueError naming it.
    client: a distributed.Client; None: the default client, else a LocalCluster for this call.
    worker_timeout: seconds to wait for the first worker of a cluster that has none yet (say
        dask-jobqueue before its jobs start; a placeholder task is pending meanwhile, so an adaptive
        cluster starts one), then a TimeoutError naming worker_timeout (the store is created, no row
        written: a later call resumes it); None (the default): no limit.
    shards: this many row ranges, one task each, of the rows some checkpoint lacks (None: one per
        worker thread of the cluster once its first worker is there, or of the cluster it heads for
        where this client holds its cluster object: the workers asked for with scale(n), queued jobs
        included, or adapt(maximum=n) when finite, each with the threads of those seen), at most one
        per batch of the data (as the client's first pass over it found them), cut on their edges
        (a task computes every batch its range touches whole); a rerun's gaps, when more,
        are packed together only where few written rows lie between them, else more tasks queue
        (see cut()). Each task reads all the data once per
        checkpoint it writes, plus once to check its fingerprint, so more shards read more. A
        finished store is returned once the client has checked it against these inputs; no task
        runs. Once every row is written, the client reads the data once more (its fingerprint) and
        finalizes the store.
    num_threads: torch intra-op threads per task (None: each host's cores shared among the worker
        threads on it as the scheduler records them when the task runs, 1 on the default
        LocalCluster); the JAX adapter leaves its threads as they are.
    progress: tqdm bars (None: after a few seconds, if tqdm is installed) of the client's pass over the
        data, then of the rows written (times the checkpoints), read from the tasks' progress files
        every POLL_S seconds.
    Warnings the tasks raise (the adapter's, the model's, the data's) are warned on the client once
    every row is written, once each, the message prefixed with the first row range that raised it,
    its worker and how many ranges did; those of a failed task are in a note on its error. Rows
    written before (by an earlier call, or by a task whose worker died: its rerun resumes after them)
    are not computed again, so their warnings are not raised again.
    """
    fn = _export_function(adapter)
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a directory path that every worker sees, got {type(store).__name__}")
    shards = None if shards is None else positive_int(shards, "shards")
    num_threads = None if num_threads is None else positive_int(num_threads, "num_threads", maximum=4096)
    check_progress(progress)
    worker_timeout = check_worker_timeout(worker_timeout)
    check_client(client)  # before the data pass and the store, as the other arguments
    path = os.path.abspath(store)
    args, kwargs = absolute_checkpoints(args, kwargs)
    with tempfile.TemporaryFile() as pickled:  # in TMPDIR, not in the client's memory through its pass
        pickle_arguments((args, kwargs), pickled, adapter)  # before anything is read or created, as they are given
        return _export(adapter, fn, args, kwargs, pickled, path, client, worker_timeout, shards, num_threads, progress)


def _export(
    adapter: str,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    pickled: IO[bytes],
    path: str,
    client: Any,
    worker_timeout: float | None,
    shards: int | None,
    num_threads: int | None,
    progress: bool | None,
) -> GradientStore:
    """export_gradients once its arguments are checked and `pickled` (a finished store: for nothing)."""
    seen: set[tuple[type[Warning], str]] = set()  # warned by the first pass: not again by the tasks or the last
    # creates the store (or checks the one there), reading the data once: where its batches begin
    with _shown_once(seen), _range_writers_named(path), store_rows(0, 0), batch_starts() as starts:
        fn(*args, store=path, progress=progress, **kwargs)
    checked = read_manifest(Path(path)).store_id  # the store the step above created or checked
    # the store's shared lock while the tasks run (range writers share it): another export, with other inputs,
    # cannot make it again under them while it records no rows (tasks still reading the data or queued)
    with _range_writers_named(path):
        shared = DirectoryLock(Path(path), shared=True)
    try:
        manifest = read_manifest(Path(path))  # every range writer's progress merged into it
        if manifest.store_id != checked:  # made again by another export between the check and the lock
            raise RuntimeError(
                f"gradient store {path} was made again by another export (store id {checked}, now "
                f"{manifest.store_id}) while this call began: call again once that export has ended"
            )
        if manifest.complete:  # finished before: checked against these inputs, nothing to write
            return GradientStore.open(path)
        missing = missing_rows(manifest)
        if missing:  # else every row is written (all ranges of an interrupted call were done): finalizing is left
            _write_ranges(
                adapter,
                pickled,
                path,
                manifest,
                missing,
                starts,
                client,
                worker_timeout,
                shards,
                num_threads,
                progress,
                {message for _, message in seen},
            )
    finally:
        shared.release()
    if progress:
        print(
            f"tracin.distributed export ({adapter}): every row written; the client reads the data once more, "
            "checking it against the store, and finalizes it",
            file=sys.stderr,
        )
    with _shown_once(seen), _range_writers_named(path), store_state_unsaid():  # said above
        # merges the ranges' progress and finalizes: its reading bar after a few seconds (None), not its
        # export bar, which would count passes at once that it does not compute
        return fn(*args, store=path, progress=None if progress is not False else False, **kwargs)


def _write_ranges(
    adapter: str,
    pickled: IO[bytes],
    path: str,
    manifest: Manifest,
    missing: list[tuple[int, int]],
    batch_starts: Sequence[int],
    client: Any,
    worker_timeout: float | None,
    shards: int | None,
    num_threads: int | None,
    progress: bool | None,
    warned: set[str],
) -> None:
    """The `missing` rows of the store at `path` written by tasks on the cluster, cut into about
    `shards` ranges (see cut(); `batch_starts`: the first row of each of the data's batches); `pickled`:
    a file holding the export's (args, kwargs), cloudpickled, whose bytes are sent once per worker;
    `warned`: the messages the client warned already (the tasks' copies are not shown)."""
    outside = client is not None or default_client_or_none() is not None  # else a LocalCluster of the call's own
    with client_for(client) as c, Job(c, f"export ({adapter})", warned) as job:
        slots = planned_slots(c, slots_by_host(c, worker_timeout, wait=True))
        # cloudpickled as they are: Dask's own serializer of torch modules loses their hook dicts' type
        pickled.seek(0)
        sent_once = job.send(pickled.read())  # bytes read only for tasks, not kept by this call
        client_jax = jax_settings() if adapter == "jax" else None  # named by a task reading other inputs
        parts = [
            job.submit(
                export_part, adapter, sent_once, path, a, b, num_threads, client_jax, label=f"rows [{a}, {b}) of {path}"
            )
            for a, b in cut(missing, shards or slots, manifest.n_rows, batch_starts)
        ]
        try:
            with rows_bar(path, manifest, progress, f"tracin.distributed export ({adapter})"):
                job.wait(parts, False)
        except (KeyboardInterrupt, TaskFailedError) as e:  # interrupted, or workers lost: a rerun resumes
            if outside:  # else the call's own LocalCluster, closed on the way out, stops its tasks
                restart = ", or call client.restart()" if c.status == "running" else " (with a running client)"
                _noted(
                    e,
                    f"tracin.distributed export of {path}: its tasks already running on the workers go on until "
                    "their rows are written, or they fail (cancelling stops only those not started); wait for them "
                    f"before calling again to resume{restart}",
                )
            raise
        except Exception as e:  # a task's own error: its note (worker, rows) is shown before Python 3.11 too
            _print_task_notes(e)
            raise


def absolute_checkpoints(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """args and kwargs with each checkpoint's path, and optimizer-state path, made absolute here
    (both adapters take checkpoints second): workers run in other directories. Anything else as given."""

    def absolute(entry: Any) -> Any:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            return entry  # the adapter's validation names it
        return _rebuilt(
            entry,
            [os.path.abspath(x) if i != 1 and isinstance(x, (str, os.PathLike)) else x for i, x in enumerate(entry)],
        )

    def each(checkpoints: Any) -> Any:
        if isinstance(checkpoints, (str, bytes, os.PathLike)) or not isinstance(checkpoints, (tuple, list)):
            return checkpoints
        return _rebuilt(checkpoints, [absolute(entry) for entry in checkpoints])

    if "checkpoints" in kwargs:
        return args, {**kwargs, "checkpoints": each(kwargs["checkpoints"])}
    if len(args) > 1:
        return (args[0], each(args[1]), *args[2:]), kwargs
    return args, kwargs


def _rebuilt(given: tuple | list, items: list) -> Any:
    """`items` in a sequence like `given`: `given` itself when they are its own items, one of its
    type for a NamedTuple (its fields) or a plain list or tuple, else a plain list or tuple."""
    if len(items) == len(given) and all(x is y for x, y in zip(items, given, strict=True)):
        return given
    if hasattr(given, "_make"):  # a NamedTuple, which takes its fields as arguments
        return given._make(items)
    if type(given) in (list, tuple):
        return type(given)(items)
    return list(items) if isinstance(given, list) else tuple(items)


def pickle_arguments(arguments: tuple[tuple, dict], file: IO[bytes], adapter: str) -> None:
    """The export's (args, kwargs), which travel to the workers, cloudpickled into `file` by one
    pickler: a header (the count of args, the names of kwargs), then each argument as a pickle of its
    own, in order (one memo: an object two arguments share is one object again once unpickled), so
    that a worker that cannot unpickle one names it (unpickle_arguments). When pickling fails, a
    TypeError naming the argument that does not pickle (and `adapter`'s parameter taking it)."""
    args, kwargs = arguments
    into = _Into(file)
    pickler = cloudpickle.CloudPickler(into, protocol=cloudpickle.DEFAULT_PROTOCOL)
    which, parameter = "the count of args and the names of kwargs", None
    try:
        pickler.dump((len(args), list(kwargs)))
        for name, given, value in _named(args, kwargs, adapter):
            which, parameter = name, given  # named in the error if this one does not pickle
            pickler.dump(value)
    except Exception as e:
        if into.failed is not None:  # the file, not the arguments (a full disk)
            raise OSError(
                into.failed.errno,
                f"cannot write the pickled args and kwargs into a temporary file in {tempfile.gettempdir()} "
                f"({into.failed}); point TMPDIR to a folder with room",
            ) from e
        advice = {
            "loss_fn": "pass a loss_fn that pickles (a module-level function, or one whose closure and "
            "defaults hold no open file, lock, connection or client: open those inside it)",
            "model": "pass a model that pickles (one whose attributes and hooks hold no open file, lock, "
            "connection or client)",
        }.get(
            parameter,
            "pass data and checkpoints that pickle (say a Dataset reading files by path, rather than one "
            "holding an open file, lock or connection)",
        )
        raise TypeError(
            f"{which} cannot be pickled ({type(e).__name__}: {e}): tracin.distributed sends the export's "
            f"args and kwargs to the workers with cloudpickle; {advice}"
        ) from e


def unpickle_arguments(sent: bytes, adapter: str) -> tuple[tuple, dict]:
    """On a worker: the export's (args, kwargs) from pickle_arguments' bytes `sent`. An argument that
    cannot be unpickled here (most often a module of the user's that only the client imports) is a
    ValueError naming it, this worker, the error, and the fix."""
    unpickler = pickle.Unpickler(io.BytesIO(sent))
    count, names = unpickler.load()
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for i, name in enumerate([*range(count), *names]):
        try:
            value = unpickler.load()
        except Exception as e:
            which = f"args[{i}]" if i < count else f"kwargs[{name!r}]"
            parameter = _parameter(adapter, i) if i < count else None
            advice = (  # a module or a name in it the worker lacks ("Can't get attribute ...")
                ": the workers must import the modules the model, loss and data are defined in, as the client "
                "does: install them on the workers (the same versions), or send a module of your own with "
                "client.upload_file"
                if isinstance(e, (ImportError, AttributeError))
                else ""
            )
            raise ValueError(
                f"{which}{f' ({parameter})' if parameter else ''} cannot be unpickled on worker {worker_name()} "
                f"({type(e).__name__}: {e}){advice}"
            ) from e
        if i < count:
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _named(args: tuple, kwargs: dict, adapter: str) -> Iterator[tuple[str, str | None, Any]]:
    """Each argument's name in an error ("args[0] (loss_fn)", "kwargs['data']"), the adapter's parameter
    taking it (None: none such) and its value."""
    for i, a in enumerate(args):
        parameter = _parameter(adapter, i)
        yield (f"args[{i}] ({parameter})" if parameter else f"args[{i}]"), parameter, a
    yield from ((f"kwargs[{k!r}]", k, v) for k, v in kwargs.items())


def _parameter(adapter: str, i: int) -> str | None:
    """The name of the adapter's export_gradients parameter that takes args[i] (None: none such)."""
    try:
        parameters = list(inspect.signature(_export_function(adapter)).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[i] if i < len(positional) else None


class _Into:
    """`file`'s write, recording an OSError it raised (`failed`)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.failed = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.failed = e
            raise


def missing_rows(manifest: Manifest) -> list[tuple[int, int]]:
    """The sorted, disjoint row ranges some checkpoint of the store lacks."""
    union = merge_ranges(r for c in range(len(manifest.dims)) for r in manifest.missing(c))
    return [(a, b) for a, b in union]


def cut(
    missing: list[tuple[int, int]], shards: int, n_rows: int, batch_starts: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Row ranges, one task each, covering the rows `missing` (sorted, disjoint gaps) of a store of
    `n_rows` rows, cut by by_rows in the data's batches, which begin at the rows `batch_starts`
    (sorted, from 0; None: a batch per row): no more ranges than the batches the missing rows touch,
    every range's ends on batch edges or gap edges (a task computes every batch its range touches
    whole: a batch cut by two ranges would be computed twice), a batch two gaps touch in one range,
    a gap's ranges of near-equal rows (balanced())."""
    edges = range(n_rows + 1) if batch_starts is None else [*batch_starts, n_rows]  # batch u: [edges[u], edges[u + 1])

    def batch_of(row: int) -> int:
        return bisect.bisect_right(edges, row) - 1

    units = merge_ranges((batch_of(a), batch_of(b - 1) + 1) for a, b in missing)  # the batches each gap touches
    ranges = balanced(by_rows(units, min(shards, sum(b - a for a, b in units)), len(edges) - 1), edges)
    starts, ends = [a for a, _ in missing], [b for _, b in missing]

    def rows(u0: int, u1: int) -> tuple[int, int]:  # batches [u0, u1) to the missing rows in them, and between
        first, last = bisect.bisect_right(ends, edges[u0]), bisect.bisect_left(starts, edges[u1]) - 1
        return max(starts[first], edges[u0]), min(ends[last], edges[u1])

    return [rows(u0, u1) for u0, u1 in ranges]


def balanced(ranges: list[tuple[int, int]], edges: Sequence[int]) -> list[tuple[int, int]]:
    """`ranges` of batches (by_rows' parts, in order) with each run of adjacent ones (the parts of one
    gap, near-equal in batches) cut again into as many parts, each of at least one batch, of near-equal
    rows (`edges`: batch u holds rows [edges[u], edges[u + 1])): batches of uneven sizes are shared out
    by their rows."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(ranges):
        j = i + 1
        while j < len(ranges) and ranges[j][0] == ranges[j - 1][1]:
            j += 1
        u0, u1, k = ranges[i][0], ranges[j - 1][1], j - i
        cuts = [u0]
        for p in range(1, k):  # the edge nearest the p-th k-th of the run's rows
            target = edges[u0] + p * (edges[u1] - edges[u0]) / k
            u = bisect.bisect_left(edges, target, u0, u1)
            if target - edges[u - 1] <= edges[u] - target:
                u -= 1
            cuts.append(min(max(u, cuts[-1] + 1), u1 - (k - p)))
        cuts.append(u1)
        out += zip(cuts[:-1], cuts[1:], strict=True)
        i = j
    return out


def by_rows(missing: list[tuple[int, int]], shards: int, n_rows: int) -> list[tuple[int, int]]:
    """Row ranges, one task each, covering the rows `missing` (sorted, disjoint gaps) of a store of
    `n_rows` rows. Fewer gaps than `shards`: each gap cut into near-equal parts, `shards` in all (none
    empty), a part more at a time to the gap whose parts are longest (the first of equals). More
    gaps: from left to right, a gap joins the range before it while more ranges than `shards` remain,
    only when the written rows between them (written again, the same bytes) are few: no more than the
    missing rows of the range or of the gap, whichever is fewer, or than n_rows // JOIN_BELOW (a task
    more reads all `n_rows` rows: those rows' gradients cost less), and the range's missing rows stay within
    1 / `shards` of all; a gap of more missing rows than that share is then cut into near-equal parts
    within it. Ranges beyond `shards` queue."""
    if len(missing) <= shards:
        parts = [1] * len(missing)
        spare = min(shards, sum(b - a for a, b in missing)) - len(missing)
        longest = [(-(b - a), i) for i, (a, b) in enumerate(missing) if b - a > 1]
        heapq.heapify(longest)
        for _ in range(spare):  # a part to the gap with the longest parts that has a row for one more
            _, i = heapq.heappop(longest)
            parts[i] += 1
            a, b = missing[i]
            if parts[i] < b - a:
                heapq.heappush(longest, (-(b - a) / parts[i], i))
        return [
            (a + j * (b - a) // k, a + (j + 1) * (b - a) // k)
            for (a, b), k in zip(missing, parts, strict=True)
            for j in range(k)
        ]
    share = -(-sum(b - a for a, b in missing) // shards)  # a task's missing rows, at most
    ranges, held = [missing[0]], [missing[0][1] - missing[0][0]]  # held: each range's missing rows
    for i, (a, b) in enumerate(missing[1:], 1):
        between = a - ranges[-1][1]
        if (
            len(ranges) + len(missing) - i > shards
            and between <= max(min(held[-1], b - a), n_rows // JOIN_BELOW)
            and held[-1] + b - a <= share
        ):
            ranges[-1], held[-1] = (ranges[-1][0], b), held[-1] + b - a
        else:
            ranges.append((a, b))
            held.append(b - a)
    return [  # a range over share missing rows is one gap (joins stay within share): cut it up
        (a + j * (b - a) // k, a + (j + 1) * (b - a) // k)
        for (a, b), rows in zip(ranges, held, strict=True)
        for k in [-(-rows // share)]
        for j in range(k)
    ]


@contextmanager
def rows_bar(path: str, manifest: Manifest, progress: bool | None, desc: str) -> Iterator[None]:
    """A bar (progress_bar(enabled=progress)) of the rows written into the store at `path`, times
    its checkpoints, polled from its range writers' progress files every POLL_S seconds while inside.
    Leaving waits up to POLLER_JOIN_S for a poll under way; one still reading then (a hung file
    system) is left behind, its count dropped, and the last count is not taken (nor with progress=False)."""
    rows = RowsWritten(Path(path), manifest)
    bar = progress_bar(rows.total, progress, desc, unit="row", unit_scale=False)
    shown, closed, lock = 0, False, threading.Lock()

    def show() -> None:
        nonlocal shown
        now = rows.count()
        with lock:
            if not closed:
                bar.update(now - shown)
                shown = now

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_S):
            show()

    poller = threading.Thread(target=poll, name="tracin export progress", daemon=True)
    if progress is not False:
        show()
        poller.start()
    done = False
    try:
        yield
        done = True
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(POLLER_JOIN_S)  # one thread at a time counts: the last count comes after the poller's
        try:
            if done and progress is not False and not poller.is_alive():
                show()
        finally:
            with lock:
                closed = True
                bar.close()


class RowsWritten:
    """Rows written into a store, summed over its checkpoints: those its manifest records, and those
    its range writers' progress files (rows-*.json) record so far."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.written = [[list(r) for r in manifest.written[c]] for c in range(len(manifest.dims))]
        n = _checkpoint_count(manifest)
        self.slots = len(manifest.dims) // n  # store columns per checkpoint (a factored export: one per layer)
        self.n_rows = manifest.n_rows
        self.total = manifest.n_rows * n

    def count(self) -> int:
        """The rows written so far. Progress files are read and parsed as the store reads its files
        (never through a link, nor a FIFO or device, at most MAX_MANIFEST_BYTES, strict JSON nested at
        most MAX_JSON_DEPTH levels); one refused, removed or corrupt is left for the next count."""
        for file in self.root.glob("rows-*.json"):
            try:
                written = strict_json(_read_progress_file(file), str(file), "progress file")["written"]
                for c, ranges in enumerate(written[: len(self.written)]):
                    clipped = [(max(int(a), 0), min(int(b), self.n_rows)) for a, b in ranges]
                    # a corrupt file's inverted or outlying range counts no row; one sort per file
                    self.written[c] = merge_ranges([*self.written[c], *((a, b) for a, b in clipped if a < b)])
            except (OSError, ValueError, KeyError, TypeError, OverflowError):  # replaced, removed, corrupt: next time
                continue
        return sum(b - a for ranges in self.written for a, b in ranges) // self.slots


def _read_progress_file(path: Path) -> bytes:
    fd = open_file(path)
    try:
        return read_all(fd, MAX_MANIFEST_BYTES, path)
    finally:
        os.close(fd)


def _checkpoint_count(manifest: Manifest) -> int:
    """The checkpoints an export's store holds (its metadata's fingerprints list one digest each);
    one per store column when that is not recorded."""
    metadata = manifest.metadata if isinstance(manifest.metadata, dict) else {}
    fingerprints = metadata.get("fingerprints")
    digests = fingerprints.get("checkpoints") if isinstance(fingerprints, dict) else None
    columns = len(manifest.dims)
    return len(digests) if isinstance(digests, list) and digests and columns % len(digests) == 0 else columns


def _noted(e: BaseException, note: str) -> None:
    """`note` added to e's notes (shown after its traceback), or printed on stderr before Python 3.11."""
    if hasattr(e, "add_note"):
        e.add_note(note)
    else:
        print(note, file=sys.stderr)


@contextmanager
def _shown_once(seen: set[tuple[type[Warning], str]]) -> Iterator[None]:
    """Warnings this thread shows inside are added to `seen` (category, message), and those in it already
    are not shown: the client's first and last passes over the data raise the same warnings of the
    arguments. The filters are left alone (catch_warnings is not thread-safe: two exports' passes in two
    threads would leave one's); warnings.showwarning is the one _warnings.handled() installs while any
    thread's pass or task recording runs (never one handing warnings to another: review343 H1)."""

    def once(message: Any, category: type[Warning], filename: str, lineno: int) -> bool:
        key = (category, str(message))
        if key in seen:
            return True  # shown already: dropped
        seen.add(key)
        return False

    with _warnings.handled(once):
        yield


_shown = _warnings._show  # warnings.showwarning while a pass runs


@contextmanager
def _range_writers_named(path: str) -> Iterator[None]:
    """The store's lock refusing a writer of the whole store while range writers (tasks) hold it: a
    RuntimeError saying which (the lock files held; how many others no process holds), and that they
    may be the tasks of an interrupted export."""
    try:
        yield
    except RuntimeError as e:
        if "is being written by" not in str(e):
            raise
        try:
            held, stale = _range_locks(Path(path))
        except OSError:  # the directory unreadable now: as the lock said
            raise e from None
        if not held and not stale and "held by pid" in str(e):  # a writer of the whole store, named by the lock
            raise
        whose = (  # no range lock file held: the holder may be another call's client, its tasks not started
            f"Range writers of this store ({', '.join(held)}) may be"
            if held
            else "It may be held by another tracin.distributed export of this store (its client holds it while its "
            "tasks run: wait for that call to end), or by"
        )
        running = (  # held range locks may also be those of a call still running: restarting would stop it
            "; if they are the tasks of another tracin.distributed export of this store still running, wait for "
            "that call to end instead (client.restart() would stop them too)"
            if held
            else ""
        )
        files, were = ("files", "were") if stale > 1 else ("file", "was")
        ignored = (
            f" ({stale}{' other' if held else ''} rows-*.lock {files} of this store, held by no process, {were} "
            "left by range writers that ended or died: not listed)"
            if stale
            else ""
        )
        raise RuntimeError(
            f"{e}. {whose} the tasks of an interrupted or failed "
            "tracin.distributed export, still running on the workers (cancelling a Dask task does not stop one "
            "that started, and the scheduler no longer lists it): wait for them to finish, or call "
            f"client.restart(), then call again to resume{running}{ignored}"
        ) from e


def _range_locks(root: Path) -> tuple[list[str], int]:
    """The names of the range writers' lock files (rows-<start>-<stop>.lock) in `root` that a writer
    holds, and how many no process holds (a flock dies with its process; the file stays until finalize)."""
    held, stale = [], 0
    for name, _, _, kind in range_files(root):
        if kind == "lock":
            found = _lock_held(root / name)
            if found:
                held.append(name)
            elif found is not None:
                stale += 1
    return held, stale


def _lock_held(path: Path) -> bool | None:
    """Whether a process holds the flock on the lock file at `path` (a shared flock tried without waiting
    fails; taken, it is released at once); True where that cannot be told, None if the file is gone."""
    if _locks.fcntl is None:  # no flocks here: none is known to be stale
        return True
    probe = _locks._Held()  # its descriptor is closed in a child forked meanwhile (never keeps the flock)
    try:
        fd = probe._open(path, os.O_RDONLY | _locks._NOFOLLOW)
    except FileNotFoundError:  # removed meanwhile (the store finalized)
        return None
    except OSError:
        return True
    try:
        return not _locks._try_flock(fd, exclusive=False)
    except OSError:
        return True
    finally:
        probe.release()


def export_part(
    adapter: str,
    sent: bytes,
    path: str,
    start: int,
    stop: int,
    num_threads: int | None,
    client_jax: tuple[str, bool] | None,
) -> None:
    """On a worker: rows [start, stop) of the export (args and kwargs as pickle_arguments wrote them
    into `sent`), written into the store at `path`, which the client created (a ValueError naming this
    worker, before any data is read, when it does not see it; another naming the argument when one
    cannot be unpickled here; another when it reads other inputs than the client, naming for JAX both
    sides' jax_settings(), `client_jax` the client's, None for torch). Any other error of the export (of
    the data, the model or the loss, as read and run here) is raised with a note naming this worker, the
    rows and the store."""
    refuse_unseen(path)
    arguments = _unpickled_once(sent, adapter)
    args, kwargs = arguments
    export = _export_function(adapter)
    threads = torch_threads(kernel_threads(num_threads)) if adapter == "torch" else nullcontext()
    try:
        with threads, store_rows(start, stop):
            export(*args, store=path, progress=False, **kwargs)
    except ValueError as e:  # the client created the store from its reading of the same arguments
        found = _OTHER_INPUTS.search(str(e))
        if found is None:
            _noted_here(e, _task_note(adapter, path, start, stop))
            raise
        raise ValueError(
            f"the data or checkpoints as read on worker {worker_name()} differ from the client's "
            f"({found.group(1)}): every worker must read identical data and checkpoint files"
            + (_jax_hint(client_jax) if client_jax is not None else "")
        ) from e
    except AssertionError as e:  # multiprocessing's, when data starts processes in a daemonic worker
        if "daemonic processes are not allowed to have children" not in str(e):
            _noted_here(e, _task_note(adapter, path, start, stop))
            raise
        raise ValueError(
            "data: reading it started worker processes (a torch DataLoader with num_workers > 0?), which a "
            "Dask worker process cannot start (it is daemonic): pass a DataLoader with num_workers=0 (each "
            "task reads all the data and computes only its rows), or start the workers with the Dask config "
            "distributed.worker.daemon=False"
        ) from e
    except Exception as e:  # the data, the model or the loss failing here (or the store's files)
        _noted_here(e, _task_note(adapter, path, start, stop))
        raise
    finally:
        _release(arguments)


def jax_settings() -> tuple[str, bool]:
    """This process's JAX version and jax_enable_x64, which change the arrays unpickled here."""
    import jax

    return jax.__version__, bool(jax.config.jax_enable_x64)


def _jax_hint(client_jax: tuple[str, bool]) -> str:
    """What export_part's error adds for JAX: both sides' jax_settings(), and the fix where they differ."""
    here = jax_settings()
    return (
        ", or in-memory ones unpickled alike, which JAX's version and jax_enable_x64 change (float64 arrays "
        f"become float32 without it): here jax {here[0]} with jax_enable_x64={here[1]}, on the client jax "
        f"{client_jax[0]} with jax_enable_x64={client_jax[1]}"
        + ("; set the same on the workers (JAX_ENABLE_X64 in their environment)" if here != client_jax else "")
    )


_UNPICKLED_LOCK = threading.Lock()
_unpickled: list[Any] = []  # [digest of sent, (args, kwargs), tasks using them] of this process's latest JAX task


def _unpickled_once(sent: bytes, adapter: str) -> tuple[tuple, dict]:
    """unpickle_arguments, for JAX reusing the objects of this process's previous task when its bytes
    were equal (the same export) and no other task of this process is using them: tracin.jax compiles
    once per loss_fn object, and a loss unpickled by value (defined in the client's script, a lambda, a
    closure) is a new object, traced and compiled again, in every task; tasks running at once (a worker
    with several threads) each get their own objects, as a data loader holding an open file or other
    state need not be thread-safe. One entry: the objects stay here until the next JAX export task
    (README, Dask). torch's arguments are unpickled per task (a model's hooks are per export call).
    Each call is paired with _release once the task ends."""
    if adapter != "jax":
        return unpickle_arguments(sent, adapter)
    digest = hashlib.blake2b(sent, digest_size=32).digest()  # not the bytes: Dask frees them when the export ends
    with _UNPICKLED_LOCK:
        if _unpickled and _unpickled[0] == digest and _unpickled[2] == 0:
            _unpickled[2] = 1
            return _unpickled[1]
        busy = bool(_unpickled) and _unpickled[2] > 0
    arguments = unpickle_arguments(sent, adapter)
    with _UNPICKLED_LOCK:
        if not busy and not (_unpickled and _unpickled[2] > 0):
            _unpickled[:] = [digest, arguments, 1]
    return arguments


def _release(arguments: tuple[tuple, dict]) -> None:
    """Marks the objects _unpickled_once gave a task as no longer used by it."""
    with _UNPICKLED_LOCK:
        if _unpickled and _unpickled[1] is arguments:
            _unpickled[2] = 0


def _task_note(adapter: str, path: str, start: int, stop: int) -> str:
    return (
        f"tracin.distributed export ({adapter}): raised on worker {worker_name()} while exporting rows "
        f"[{start}, {stop}) into the gradient store {path} (reading the data, running the model and the loss "
        "there). Does the same export work in one process on the client? Then the workers must read the "
        "same data: the same files at the same paths, the same packages, nothing kept only on the client"
    )


def _print_task_notes(e: BaseException) -> None:
    """Before Python 3.11, which does not show an exception's notes: those a task added, on stderr."""
    if not hasattr(e, "add_note"):
        for note in getattr(e, "__notes__", ()):
            print(note, file=sys.stderr)


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
