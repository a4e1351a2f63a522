"""tracin.top_k / self_influence / aggregate over shards of a GradientStore on a Dask cluster."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from distributed import Future

from .._arrays import is_torch_tensor
from .._caller import user_stacklevel
from .._progress import check_progress, shows_automatically
from .._tunables import AUTO_PROGRESS_MACS
from .._validate import flag, positive_int, thread_count
from ..backends.placement import check_precision
from ..gradients import GradientSet, non_finite_message, non_finite_rows
from ..scoring import (
    _SIDES,
    NO_SELF_NORMALIZE,
    BothSides,
    TopK,
    _check_side,
    _normalize_run,
    _pair,
    _refuse_float32_overflow,
    _width,
    as_gradient_set,
    check_self_influence_rows,
    pair_warnings_told,
)
from ..store import GradientStore
from . import _tasks
from ._cluster import check_worker_timeout, client_for, planned_slots, slots_by_host
from ._run import Job
from ._shards import StoreRows, as_side, shard_ranges


def top_k(
    test: Any,
    train: Any,
    k: int = 10,
    side: str = "proponents",
    *,
    client: Any = None,
    worker_timeout: float | None = None,
    shards: int | None = None,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    normalize: bool = False,
) -> TopK | BothSides:
    """tracin.top_k on a Dask cluster, the same result bit for bit (ties included) where the workers'
    kernels run the same instruction set (tracin.detect_isa()) as the process compared with, else
    within the error bound (see the tracin.distributed docstring).

    test, train: gradient sets as for tracin.top_k, at least one a GradientStore (or a path to
    one). The train side is cut into row shards if it is a store, else the test side; each task
    opens its shard by path, so every worker must see the store at the same path. An in-memory
    side is sent to each worker once. Per shard the values float32 (m, <= k) and indices int64
    travel back, merged by a tree of merge_top_k tasks on the cluster.
    client: a distributed.Client; None: the default client, else a LocalCluster for this call.
    worker_timeout: seconds to wait for the cluster's first worker when it has none yet (say
    dask-jobqueue before its jobs start), then a TimeoutError naming worker_timeout; None (the
    default): no limit, the tasks queue until workers join. While it waits, a placeholder task is
    pending, so that an adaptive cluster (cluster.adapt(minimum=0)) starts one. Only the first
    worker is waited for: a cluster that loses its workers mid-call waits for new ones, as Dask does.
    shards: number of equal row shards, at most one per row (more warns, and runs one per row;
    None: by bytes, at most 256 MiB, large ones first and
    small ones last so that the task slots finish together: those of the workers at the call's start,
    or of the workers the cluster heads for where this client holds its cluster object (scale(n),
    adapt(maximum=n)); 16 MiB each when the cluster has no workers then and none are known to come).
    num_threads: kernel threads per task (None: each host's cores shared among the worker threads on
    it, as the scheduler records them when the task runs: workers that joined later count too).
    progress: a tqdm bar over shards (None: after a few seconds, if tqdm is installed).
    device, precision: the tasks run the C++ CPU kernel: None or "cpu", and "float32" (a ValueError
    names anything else).
    normalize: cosine scores, as in tracin.top_k (each train row's norms are its own, so shards
    change nothing).
    Warnings the tasks raise on the workers are warned here once the call is done, once each (not
    left in the workers' logs): the message is prefixed with the call, the first shard that raised
    it, its worker and how many shards did; those of a failed task are in a note on its error.
    """
    _check_cpu(device, precision)
    test, train = as_side(test, "test"), as_side(train, "train")
    test_set, train_set, _ = _pair(test, train)
    k = positive_int(k, "k")
    _check_side(side, _SIDES)
    _normalize_run(normalize, test_set, train_set)
    shards, num_threads, progress = _options(
        shards, num_threads, progress, test_set.n_rows * train_set.n_rows * _width(train_set)
    )
    _check_cuttable(test_set, train_set)
    _check_usable(test_set, train_set)
    _check_finite(test_set, train_set)
    worker_timeout = check_worker_timeout(worker_timeout)
    with client_for(client) as c, Job(c, f"top_k ({side})") as job:
        slots = planned_slots(c, slots_by_host(c, worker_timeout))  # 0: no workers yet, none planned
        if isinstance(train_set, GradientStore):
            other = _sent(job, test_set)
            parts = _per_shard(
                job,
                _tasks.top_k_part,
                train_set,
                shards,
                slots,
                lambda rows, first: (other, rows, k, side, first, num_threads, normalize),
            )
            found = job.wait(parts, progress, job.reduce(parts, _tasks.merge_parts, k, side))
        else:
            other = _sent(job, train_set)
            parts = _per_shard(
                job,
                _tasks.top_k_part,
                test_set,
                shards,
                slots,
                lambda rows, _: (rows, other, k, side, 0, num_threads, normalize),
                side="test",
            )
            pieces = job.wait(parts, progress)
            found = tuple(
                TopK(*(np.concatenate([p[s][f] for p in pieces]) for f in (0, 1)))
                for s in range(len(_tasks.SIDE_NAMES[side]))
            )
    return BothSides(*found) if side == "both" else found[0]


def self_influence(
    train: Any,
    *,
    per_checkpoint: bool = False,
    client: Any = None,
    worker_timeout: float | None = None,
    shards: int | None = None,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    whitening: Any = None,
    normalize: bool = False,
) -> np.ndarray:
    """tracin.self_influence (float32 (n,), or (n, C) with per_checkpoint) of a GradientStore (or a
    path to one) on a Dask cluster, the same result bit for bit where the workers run the same
    instruction set (tracin.detect_isa()), else within the error bound. Options (and the
    workers' warnings) as for tracin.distributed.top_k (worker_timeout included); whitening is not
    run on a cluster (a ValueError: use tracin.self_influence), normalize=True is refused as by
    tracin.self_influence."""
    _check_cpu(device, precision)
    per_checkpoint = flag(per_checkpoint, "per_checkpoint")
    if whitening is not None:
        raise ValueError(
            "whitening: tracin.distributed.self_influence does not whiten; use tracin.self_influence(train, "
            "whitening=...) on one machine"
        )
    if flag(normalize, "normalize"):
        raise ValueError(NO_SELF_NORMALIZE)
    train_set = as_gradient_set(as_side(train, "train"), "train")
    _check_store(train_set, "train")
    _check_usable(train_set)
    check_self_influence_rows(train_set)
    shards, num_threads, progress = _options(shards, num_threads, progress, train_set.n_rows * _width(train_set))
    worker_timeout = check_worker_timeout(worker_timeout)
    with client_for(client) as c, Job(c, "self_influence") as job:
        slots = planned_slots(c, slots_by_host(c, worker_timeout))  # 0: no workers yet, none planned
        parts = _per_shard(
            job,
            _tasks.self_influence_part,
            train_set,
            shards,
            slots,
            lambda rows, _: (rows, num_threads, per_checkpoint),
        )
        return np.concatenate(job.wait(parts, progress))


def aggregate(
    test: Any,
    train: Any,
    *,
    client: Any = None,
    worker_timeout: float | None = None,
    shards: int | None = None,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    normalize: bool = False,
) -> np.ndarray:
    """tracin.aggregate (float32 (n,), summed in float64) on a Dask cluster, the same result bit
    for bit. Sides and options (normalize and worker_timeout included), and the workers' warnings,
    as for tracin.distributed.top_k. Full gradients, as tracin.aggregate: the test side's float64
    column sums first, carried in row order (one task; a test store that is the side cut: a chain of
    tasks over its shards in order, each adding its rows to the sums before it), then a task per train
    shard (or one over an in-memory train side) for its rows' products with them, so each side is read
    once. Factored gradients: each train shard sends back its rows' float64 sums; when the test side is
    the one cut, its per-chunk float64 sums are added in order by a chain of tasks on the cluster.
    Only the (n,) total reaches the client. A test side that is cut follows the store's row chunks,
    at most one shard per chunk (for factored gradients a chunk's sum is one kernel call of
    tracin.aggregate): shards= asking for more warns and gets that many; open the test store with a
    smaller chunk_bytes to cut it finer (tracin.aggregate of that opening is the result, bit for bit)."""
    _check_cpu(device, precision)
    test, train = as_side(test, "test"), as_side(train, "train")
    test_set, train_set, _ = _pair(test, train)
    _normalize_run(normalize, test_set, train_set)
    macs = test_set.n_rows * train_set.n_rows if train_set.factored else test_set.n_rows + train_set.n_rows
    shards, num_threads, progress = _options(shards, num_threads, progress, macs * _width(train_set))
    _check_cuttable(test_set, train_set)
    _check_usable(test_set, train_set)
    _check_finite(test_set, train_set)
    worker_timeout = check_worker_timeout(worker_timeout)
    with client_for(client) as c, Job(c, "aggregate") as job:
        slots = planned_slots(c, slots_by_host(c, worker_timeout))  # 0: no workers yet, none planned
        if not train_set.factored:
            total = _full_aggregate(job, test_set, train_set, shards, slots, num_threads, normalize, progress)
        elif isinstance(train_set, GradientStore):
            other = _sent(job, test_set)
            parts = _per_shard(
                job,
                _tasks.aggregate_part,
                train_set,
                shards,
                slots,
                lambda rows, _: (other, rows, num_threads, normalize, False),
            )
            total = np.concatenate(job.wait(parts, progress))  # (n,) float64 in all
        else:  # test shards start on the store's row chunks, so their chunk sums are tracin.aggregate's
            _warn_chunks(test_set, shards)
            other = _sent(job, train_set)
            parts = _per_shard(
                job,
                _tasks.aggregate_part,
                test_set,
                shards,
                slots,
                lambda rows, _: (rows, other, num_threads, normalize, True),
                align=test_set.row_chunks(),
                side="test",
            )
            summed: Future | None = None  # added on the cluster shard after shard: only (n,) reaches the client
            links = []
            for part in parts:
                summed = job.then(_tasks.add_in_order, part, summed)
                links.append(summed)
            job.release(*parts)  # each (test chunks, n) partial is freed once its link has added it
            total = job.wait(links, progress, summed)
    return _float32(total)


def _full_aggregate(
    job: Job,
    test: GradientSet,
    train: GradientSet,
    shards: int | None,
    slots: int,
    num_threads: int | None,
    normalize: bool,
    progress: bool | None,
) -> np.ndarray:
    """aggregate of full gradients as tracin.aggregate computes it, float64 (n,): the test side's column
    sums carried from chunk to chunk in row order (one task over an in-memory or uncut test side; for a
    test store that is the side cut, a chain of tasks over its shards in order, each adding its rows
    to the sums of the shards before it), then the train rows' products with them (a task per train
    shard, or one over the in-memory train side)."""
    with pair_warnings_told():  # aggregate's own _pair warned of the pair's records
        _, _, weights = _pair(test, train)
    run = _normalize_run(normalize, test, train)
    if isinstance(train, GradientStore):
        whole = _sent(job, test)
        label = str(whole) if isinstance(test, GradientStore) else None
        sums = job.submit(_tasks.column_sums_part, whole, None, num_threads, run, label=label)
        parts = _per_shard(
            job,
            _tasks.aggregate_sums_part,
            train,
            shards,
            slots,
            lambda rows, _: (sums, rows, weights, num_threads, run),
        )
        return np.concatenate(job.wait(parts, progress))
    assert isinstance(test, GradientStore)
    _warn_chunks(test, shards)
    if test.row_chunks() == 1:  # chunks of one row: shards= above the rows is _per_shard's case (a chain here)
        _warn_above_rows("aggregate", test, shards, "test")
    whole, links = job.rows_of(test), []
    summed: Future | None = None
    for a, b in shard_ranges(test.n_rows, test.row_bytes, slots, shards, test.row_chunks()):
        rows = whole.rows(a, b)
        summed = job.submit(
            _tasks.column_sums_part,
            rows,
            summed,
            num_threads,
            run,
            label=str(rows),
            first_rows=(a, 0),
            shard=("test", a, b),
        )
        links.append(summed)
    final = job.submit(_tasks.aggregate_sums_part, summed, _sent(job, train), weights, num_threads, run)
    return job.wait(links, progress, final)


def _warn_chunks(test: GradientStore, shards: int | None) -> None:
    """A warning when shards= asks for more test shards than the test store has row chunks, and it
    has more rows than chunks (an empty or one-row store cannot be cut finer)."""
    chunks = max(1, -(-test.n_rows // test.row_chunks()))
    if shards is not None and shards > chunks and test.n_rows > chunks:
        warnings.warn(
            f"tracin.distributed.aggregate: shards={shards}, but the test store (the side cut) has {chunks} row "
            f"chunk(s) (up to {min(test.row_chunks(), test.n_rows)} rows each), and its shards start on them: "
            f"{chunks} shard(s) run; "
            "open it with a smaller chunk_bytes (GradientStore.open(path, chunk_bytes=...)) to cut it finer",
            stacklevel=user_stacklevel(),  # the user's line: called one level deeper for full gradients
        )


def _float32(total: np.ndarray) -> np.ndarray:
    """The float64 sums as float32, refusing sums beyond float32's range (as tracin.aggregate does)."""
    _refuse_float32_overflow(total)
    return total.astype(np.float32)


def _options(shards: Any, num_threads: Any, progress: Any, macs: float) -> tuple[int | None, int | None, bool | None]:
    """Checked shards and num_threads (None or a positive int), and whether to show a bar."""
    shards = None if shards is None else positive_int(shards, "shards")
    num_threads = thread_count(num_threads) or None  # the shared check and bound (_validate.MAX_THREADS)
    check_progress(progress)
    if progress is None and macs >= AUTO_PROGRESS_MACS and shows_automatically():
        progress = True  # long by its multiply-adds alone; None: a bar after _progress.AUTO_DELAY_S seconds
    return shards, num_threads, progress


def _check_cpu(device: Any, precision: Any) -> None:
    """ValueError (TypeError for a wrong type) unless device is None or "cpu" and precision "float32"."""
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a str or None, got {type(device).__name__}")
    if device not in (None, "cpu"):
        raise ValueError(
            f"device: tracin.distributed runs the C++ CPU kernel on the workers; device must be None or 'cpu', "
            f"got {device!r} (score on a GPU with tracin's own functions)"
        )
    check_precision(precision)
    if precision != "float32":
        raise ValueError(f"precision: the CPU kernel of tracin.distributed computes in float32, got {precision!r}")


def _check_store(s: GradientSet, name: str) -> None:
    if not isinstance(s, GradientStore):
        raise TypeError(
            f"{name} must be a GradientStore (or a path to one), got {type(s).__name__}: tasks "
            "open their shard of it by path; for in-memory gradient sets use tracin's own functions"
        )


def _check_cuttable(test: GradientSet, train: GradientSet) -> None:
    """The train side is cut into shards if it is a store, else the test side, which must be one."""
    if not isinstance(train, GradientStore):
        _check_store(test, "test or train")


def _check_usable(*sides: GradientSet) -> None:
    """The ValueError tracin's own functions raise for an unfinished store not opened with
    allow_partial=True, raised here on the client, before any cluster is started or task scheduled
    (each task would raise it, and a user's cluster would log every one)."""
    for s in sides:
        if isinstance(s, GradientStore):
            s.kernel_side(0, 0)  # no rows: checks the store's state, opens no file


def _per_shard(
    job: Job,
    fn: Callable,
    cut: GradientStore,
    shards: int | None,
    slots: int,
    args: Callable[[StoreRows, int], tuple],
    align: int = 1,
    side: str = "train",
) -> list[Future]:
    """One task fn(*args(rows, first row)) per row shard of `cut` (the `side`, "test" or "train"),
    in row order; `slots`: the task slots the cluster heads for (planned_slots; 0: no workers yet, none
    planned)."""
    whole, futures = job.rows_of(cut), []
    if align == 1:  # (aligned shards: _warn_chunks)
        _warn_above_rows(job.what.split()[0], cut, shards, side)
    for a, b in shard_ranges(cut.n_rows, cut.row_bytes, slots, shards, align):
        rows = whole.rows(a, b)
        first = (a, 0) if side == "test" else (0, a)
        futures.append(job.submit(fn, *args(rows, a), label=str(rows), first_rows=first, shard=(side, a, b)))
    return futures


def _warn_above_rows(call: str, cut: GradientStore, shards: int | None, side: str) -> None:
    """A warning when shards= asks for more shards than the side cut has rows: they are capped at one
    row each, every one a task, whose fixed cost (scheduling, opening the store) is far above a row's
    work: such a call is much slower than one of a few large shards, which the user should hear of."""
    if shards is not None and shards > cut.n_rows > 1:  # (one row: a single shard, nothing to say)
        warnings.warn(
            f"tracin.distributed.{call}: shards={shards}, but the {side} store (the side cut) has {cut.n_rows} "
            f"rows: {cut.n_rows} shards of one row run, each a task of its own (some milliseconds of fixed "
            "cost each, far more than a row's work): pass fewer shards, or shards=None to cut the store by bytes",
            stacklevel=user_stacklevel(),
        )


def _sent(job: Job, s: GradientSet) -> Any:
    """A store side by path; an in-memory side copied to the workers once."""
    return job.rows_of(s) if isinstance(s, GradientStore) else job.send(s)


def _check_finite(test: GradientSet, train: GradientSet) -> None:
    """The ValueError tracin's own functions raise for NaN or Inf in the in-memory side (the one not a
    store), raised on the client before it is sent: every task would meet it, and name its own shard."""
    name, s = ("test", test) if isinstance(train, GradientStore) else ("train", train)
    if isinstance(s, GradientStore):
        return
    side = s.kernel_side(0, s.n_rows)
    for b, (block, code) in enumerate(zip(side.blocks, side.dtypes, strict=True)):
        bad = _non_finite_rows(block, code)
        if bad:
            raise ValueError(non_finite_message(name, side.factored, b, bad))


def _non_finite_rows(block: Any, code: int) -> list[int]:
    """The first rows (up to 5, as the C++ kernel names them) of a kernel block holding NaN or Inf."""
    if is_torch_tensor(block):  # a side on a GPU
        import torch

        return torch.nonzero(~torch.isfinite(block).all(dim=1)).flatten()[:5].tolist()
    return non_finite_rows(np.asarray(block), code)
