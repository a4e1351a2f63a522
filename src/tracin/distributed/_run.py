"""One distributed job: tasks retried on I/O errors only, a tree of merges, progress, clear failures."""

from __future__ import annotations

import itertools
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future, KilledWorker, as_completed

from .._progress import progress_bar
from ..scoring import _NON_FINITE, _OVERFLOW_PAIR, _SELF_OVERFLOW, _pass_rows, rows_shifted
from ..store import GradientStore, StoreChangedError, StoreFormatError
from ._cluster import scheduler_address
from ._shards import StoreNotVisible, StoreRows

# A task that raises OSError (a file system hiccup) is run again this often, on its worker; any other
# exception (bad input: the ValueError / TypeError of a validation) fails the job at once, and so do a
# missing file and a refused permission (NO_RETRY), which another try would only meet again. A worker
# that dies is Dask's to handle: it reschedules the task, up to distributed.scheduler.allowed-failures.
RETRIES = 2
NO_RETRY = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)
FAN_IN = 8  # results merged per merge task (tree depth log_8 of the shard count)


class TaskFailedError(RuntimeError):
    """A task of a distributed job failed because the workers running it kept dying (Dask's
    KilledWorker, after distributed.scheduler.allowed-failures reruns), or its result was cancelled
    on the cluster (say by client.restart()); the message names its shard."""


@dataclass(frozen=True)
class RowOrder:
    """The order in which tracin's own function (one process) meets the rows of a call, to tell which
    shard's NaN/Inf or float32-overflow error it would have raised: test chunks of `test_step` rows
    (0: one chunk of all `test_rows`) outer, train pieces of `train_step` rows (0: one piece) inner,
    each a kernel call that passes over its test rows in passes of _pass_rows(chunk rows, `width`)
    (the test side's columns), train rows first within a pass. per_checkpoint: self-influence
    per checkpoint, a kernel call per checkpoint of each piece."""

    test_rows: int = 0
    test_step: int = 0
    train_step: int = 0
    width: int = 1
    per_checkpoint: bool = False

    def chunk(self, t: int) -> int:
        return t // self.test_step if self.test_step else 0

    def piece(self, i: int) -> int:
        return i // self.train_step if self.train_step else 0

    def kernel_pass(self, t: int) -> int:
        start = self.chunk(t) * self.test_step
        rows = min(self.test_step, self.test_rows - start) if self.test_step else self.test_rows
        return (t - start) // _pass_rows(max(rows, 1), self.width)


@dataclass(frozen=True)
class _RowError:
    """A shard's NaN/Inf or overflow ValueError (rows counted in the caller's sets), placed in RowOrder:
    `key` sorts errors as one process would meet them; errors with the same `group` name rows of
    one list (one kernel call's, up to ROWS_NAMED), which `span` of the message holds."""

    key: tuple
    group: tuple
    rows: tuple[int, ...]
    message: str
    span: tuple[int, int]


ROWS_NAMED = 5  # rows the kernel names in a NaN/Inf or self-influence overflow message


def _row_error(message: str, first_rows: tuple[int, int], order: RowOrder) -> _RowError | None:
    """`message` (from a shard whose first (test, train) rows are `first_rows`) as a _RowError; None
    for any other message. Within one kernel call the C++ kernel names NaN/Inf inputs (test side
    first, then each side's blocks in order) before an overflow of finite ones; per_checkpoint
    self-influence calls it once per checkpoint."""
    t0, i0 = first_rows
    found = _NON_FINITE.match(message)
    if found is not None:
        side, block, listed = found.groups()
        rows = tuple(int(r) for r in listed.split(", "))
        checkpoint = int(block.rsplit(" ", 1)[1])
        at = (order.chunk(rows[0]), order.piece(i0)) if side == "test" else (order.chunk(t0), order.piece(rows[0]))
        call = checkpoint if order.per_checkpoint else 0
        group = (*at, call, 0, side != "test", checkpoint, block.startswith("right"))
        return _RowError((*group, rows[0]), group, rows, message, found.span(3))
    own = _SELF_OVERFLOW.match(message)
    if own is not None:
        rows = tuple(int(r) for r in own[3].split(", "))
        checkpoint = int(own[1].rsplit(" ", 1)[1]) if " in checkpoint " in own[1] else 0
        group = (order.chunk(t0), order.piece(rows[0]), checkpoint, 1)
        return _RowError((*group, rows[0]), group, rows, message, own.span(3))
    pair = _OVERFLOW_PAIR.search(message)
    if pair is not None:
        t, i = int(pair[1]), int(pair[2])
        key = (order.chunk(t), order.piece(i), 0, 1, order.kernel_pass(t), i, t)
        return _RowError(key, key, (), message, (0, 0))
    return None


def _merged(errors: list[_RowError]) -> str:
    """The message of the first of `errors` in one process's order, naming (up to ROWS_NAMED) the rows
    all the errors of its kernel call name, in row order, as that call would have."""
    first = min(errors, key=lambda e: e.key)
    if not first.rows:
        return first.message
    rows = sorted({r for e in errors if e.group == first.group for r in e.rows})[:ROWS_NAMED]
    a, b = first.span
    return first.message[:a] + ", ".join(map(str, rows)) + first.message[b:]


class Job:
    """The tasks of one call on `client` (a context manager); every future it made is released when it ends.
    order: how one process meets the rows, to raise the shards' NaN/Inf or overflow errors as it would."""

    def __init__(self, client: Client, what: str, order: RowOrder | None = None):
        self.client = client
        self.what = what
        self.order = order or RowOrder()
        self.token = uuid.uuid4().hex[:12]
        self.numbers = itertools.count()  # task keys: never reused, though release() drops futures
        self.futures: list[Future] = []
        self.labels: dict[str, str] = {}  # task key -> the shard it works on
        self.first_rows: dict[str, tuple[int, int]] = {}  # task key -> its shard's first test, train row
        self.stores: dict[str, GradientStore] = {}  # path -> the call's store there (rows_of)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        """Releases every future still held: those of a call that failed before wait (say a store
        changed since it was opened, found after an in-memory side was sent), which its traceback's
        frames would otherwise keep alive on the cluster."""
        self.release(*self.futures)

    def rows_of(self, store: GradientStore) -> StoreRows:
        """The rows of `store`, for tasks to open by path, once the client has checked that it is still
        the store opened, its data files unchanged: removed, re-created, or a file removed, resized
        or rewritten in place since, the StoreChangedError tracin's own functions raise, at once. The
        rows carry each data file's size and modification time as the client recorded them at
        opening, which each task compares with the files it opens (StoreRows.open). A task that does
        not see the store has the client check again (_raise)."""
        store._check_unchanged()
        self.stores[str(store.path)] = store
        return StoreRows.of(store)

    def send(self, value: Any) -> Future:
        """`value` (an in-memory side) as the result of a task, so that each worker fetches it once
        and the scheduler can compute it again when every worker holding it dies (scattered data
        would be lost with them: the call would fail). The value travels in the task graph, so
        Dask's 'Sending large graph' warning, which advises scattering instead, is silenced here."""
        with warnings.catch_warnings():  # submit sends the graph, and warns, before it returns
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            return self.submit(_value, value)

    def submit(
        self, fn: Callable, *args: Any, label: str | None = None, first_rows: tuple[int, int] = (0, 0)
    ) -> Future:
        """fn(*args) as a task; label names its shard in errors, first_rows are the shard's first
        (test, train) rows in the caller's sets, which its NaN/Inf errors count rows from."""
        key = f"tracin_{fn.__name__}-{self.token}-{next(self.numbers)}"  # grouped by fn on the dashboard
        future = self.client.submit(_retrying, fn, first_rows, *args, key=key, pure=False)
        self.futures.append(future)
        if label is not None:
            self.labels[key] = label
        self.first_rows[key] = first_rows
        return future

    def reduce(self, parts: list[Future], merge: Callable, *args: Any) -> Future:
        """merge(list of results, *args) applied as a tree on the cluster until one result is left."""
        while len(parts) > 1:
            parts = [self.submit(merge, parts[i : i + FAN_IN], *args) for i in range(0, len(parts), FAN_IN)]
        return parts[0]

    def wait(self, shards: list[Future], progress: bool | None, final: Future | None = None) -> Any:
        """Waits for the shard tasks (a bar as progress_bar(enabled=progress) shows), then returns final's result, or
        the shards' results in order. A failure is raised as is, at once; a task that kept killing
        its workers, or one cancelled on the cluster, as a TaskFailedError naming its shard. A shard's
        NaN/Inf or float32-overflow ValueError waits for the shards that one process would have
        scored in the same kernel call or before it (self.order), and the first such error in that
        order is raised, naming the rows all of that call's shards name (_merged): the message
        tracin's own function gives, whichever shard finishes first. With
        `final`, each shard's future is released once done (the tasks after it hold its result only
        until they have used it). Releases the job's futures either way, which drops the tasks not
        started (client.cancel would trip on those released already: Dask asserts someone wants each
        task it cancels a dependent of)."""
        bar = progress_bar(len(shards), progress, f"tracin.distributed {self.what}", unit="shard", unit_scale=False)
        rows: list[_RowError] = []  # the row errors met so far
        finished: set[str] = set()
        try:
            for done in as_completed(shards, loop=self.client.loop):
                finished.add(done.key)
                if done.status == "error":
                    found = self._row_error(done)
                    if found is None:
                        self._raise(done)
                    rows.append(found)
                if done.status == "cancelled":
                    raise self._cancelled(done.key)
                if final is not None and done.key != final.key:
                    self.release(done)
                bar.update(1)
                if rows and not any(self._may_precede(f.key, rows) for f in shards if f.key not in finished):
                    break
            if rows:
                raise ValueError(_merged(rows))
            return final.result() if final is not None else self.client.gather(shards)
        except CancelledError as e:
            raise self._cancelled(getattr(e, "key", None)) from e  # Dask's FutureCancelledError names it
        except KilledWorker as e:
            task = self.labels.get(e.task, e.task)
            deaths = e.allowed_failures + 1
            raise TaskFailedError(
                f"tracin.distributed {self.what}: the task on {task} failed because the workers "
                f"running it died {deaths} time{'s' if deaths > 1 else ''} (out of memory? a file "
                "changed while mapped?)"
            ) from e
        finally:
            bar.close()
            self.release(*self.futures)

    def then(self, fn: Callable, part: Future, *args: Any) -> Future:
        """fn(part's result, *args) as a task, named in errors as part's shard."""
        return self.submit(fn, part, *args, label=self.labels.get(part.key), first_rows=self.first_rows[part.key])

    def release(self, *futures: Future) -> None:
        """Drops the job's hold on `futures`: their results are freed once no task waits for them."""
        keys = {f.key for f in futures}
        self.futures = [f for f in self.futures if f.key not in keys]
        for f in futures:
            f.release()

    def _cancelled(self, key: str | None) -> TaskFailedError:
        task = self.labels.get(key, key) if key is not None else "one of its shards"
        status = getattr(self.client, "status", "running")
        if status != "running":  # Dask cancels every future of a client that lost its scheduler
            return TaskFailedError(
                f"tracin.distributed {self.what}: the task on {task} was cancelled because the client lost its "
                f"scheduler at {scheduler_address(self.client)} (status {status!r}); call again once it is back, "
                "or with a client of a running scheduler"
            )
        return TaskFailedError(
            f"tracin.distributed {self.what}: the task on {task} was cancelled on the cluster (client.restart(), "
            "or its data lost with a worker?); call again"
        )

    def _row_error(self, failed: Future) -> _RowError | None:
        """The failed task's NaN/Inf or overflow ValueError (not a subclass: StoreNotVisible and the
        like) as a _RowError; None for any other failure."""
        e = failed.exception()
        if type(e) is not ValueError:
            return None
        return _row_error(str(e), self.first_rows.get(failed.key, (0, 0)), self.order)

    def _may_precede(self, key: str, rows: list[_RowError]) -> bool:
        """Whether the shard of task `key`, from its first_rows (test, train) on, may hold an error of
        a kernel call one process makes no later than the first of `rows`' (a shard of train rows is
        scored in every test chunk, from its first train row's piece on; one of test rows in every
        train piece, from its first test row's chunk on)."""
        t0, i0 = self.first_rows.get(key, (0, 0))
        return (self.order.chunk(t0), self.order.piece(i0)) <= min(e.key for e in rows)[:2]

    def _raise(self, failed: Future) -> None:
        """The failed task's exception; for a worker that does not see a store of the call, the
        client's check of it first (a store removed since: the StoreChangedError of rows_of); for a
        worker's StoreFormatError (a worker reopens a store by its path), the client's check of the
        call's stores and their files first, so that a store changed since it was opened is the
        StoreChangedError tracin.top_k and the others raise on one machine."""
        try:
            failed.result()
        except StoreNotVisible as e:
            if e.path in self.stores:
                self.stores[e.path]._check_same_store()
            raise
        except StoreChangedError:
            raise
        except StoreFormatError:
            for store in self.stores.values():
                store._check_unchanged()
            raise


def _retrying(fn: Callable, first_rows: tuple[int, int], *args: Any) -> Any:
    """fn(*args), called again up to RETRIES times while it raises an OSError other than NO_RETRY's.
    A NaN/Inf error counts its rows from the shard's first (test, train) rows `first_rows` in the
    caller's sets, here, so that a worker's log of it names the rows the caller gets."""
    try:
        for _ in range(RETRIES):
            try:
                return fn(*args)
            except NO_RETRY:
                raise
            except OSError:
                pass
        return fn(*args)
    except ValueError as e:
        message = rows_shifted(str(e), *first_rows) if type(e) is ValueError else None
        if message is None:
            raise
        raise ValueError(message) from None


def _value(x: Any) -> Any:
    return x
