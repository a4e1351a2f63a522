"""One distributed job: tasks retried on I/O errors only, a tree of merges, progress, clear failures."""

from __future__ import annotations

import itertools
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from distributed import Client, Future, KilledWorker, as_completed

from .._progress import progress_bar
from ..scoring import _NON_FINITE, rows_shifted
from ..store import GradientStore, StoreChangedError, StoreFormatError
from . import _warnings
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


class Job:
    """The tasks of one call on `client` (a context manager); every future it made is released when it ends."""

    def __init__(self, client: Client, what: str, warned: set[str] | None = None):
        self.client = client
        self.what = what
        self.warned = warned or set()  # messages the client warned already: the tasks' copies are not shown
        self.address = scheduler_address(client)  # a closed client forgets it: named in _cancelled
        self.token = uuid.uuid4().hex[:12]
        self.numbers = itertools.count()  # task keys: never reused, though release() drops futures
        self.futures: list[Future] = []
        self.labels: dict[str, str] = {}  # task key -> the shard it works on
        self.first_rows: dict[str, tuple[int, int]] = {}  # task key -> its shard's first test, train row
        self.shards: set[tuple[str, int, int]] = set()  # the row shards of the tasks' shard arguments
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
        self,
        fn: Callable,
        *args: Any,
        label: str | None = None,
        first_rows: tuple[int, int] = (0, 0),
        shard: tuple[str, int, int] | None = None,
    ) -> Future:
        """fn(*args) as a task; label names its shard in errors, first_rows are the shard's first
        (test, train) rows in the caller's sets, which its NaN/Inf errors count rows from; shard
        (side, start, stop): its rows in the caller's set, which those errors name (_raise)."""
        key = f"tracin_{fn.__name__}-{self.token}-{next(self.numbers)}"  # grouped by fn on the dashboard
        future = self.client.submit(_retrying, fn, first_rows, shard, *args, key=key, pure=False)
        self.futures.append(future)
        if label is not None:
            self.labels[key] = label
        self.first_rows[key] = first_rows
        if shard is not None:
            self.shards.add(shard)
        return future

    def reduce(self, parts: list[Future], merge: Callable, *args: Any) -> Future:
        """merge(list of results, *args) applied as a tree on the cluster until one result is left."""
        while len(parts) > 1:
            parts = [self.submit(merge, parts[i : i + FAN_IN], *args) for i in range(0, len(parts), FAN_IN)]
        return parts[0]

    def wait(self, shards: list[Future], progress: bool | None, final: Future | None = None) -> Any:
        """Waits for the shard tasks (a bar as progress_bar(enabled=progress) shows), then returns final's result, or
        the shards' results in order. The first failure to arrive is raised at once (the other
        shards are dropped, not waited for), as is but for a shard's NaN/Inf or float32-overflow
        ValueError, which also names the shard's rows (_raise); a task that kept killing its
        workers, or one cancelled on the cluster, as a TaskFailedError naming its shard. With
        `final`, each shard's future is released once done (the tasks after it hold its result only
        until they have used it). Releases the job's futures either way, which drops the tasks not
        started (client.cancel would trip on those released already: Dask asserts someone wants each
        task it cancels a dependent of). The warnings the tasks raised on the workers, which travel
        with the results, are then warned here once each (_warnings.show)."""
        bar = progress_bar(len(shards), progress, f"tracin.distributed {self.what}", unit="shard", unit_scale=False)
        try:
            for done in as_completed(shards, loop=self.client.loop):
                if done.status == "error":
                    self._raise(done)
                if done.status == "cancelled":
                    raise self._cancelled(done.key)
                if final is not None and done.key != final.key:
                    self.release(done)
                bar.update(1)
            result = final.result() if final is not None else self.client.gather(shards)
        except CancelledError as e:
            raise self._cancelled(getattr(e, "key", None)) from e  # Dask's FutureCancelledError names it
        except KilledWorker as e:
            task = self.labels.get(e.task, e.task)
            deaths = e.allowed_failures + 1
            raise TaskFailedError(
                f"tracin.distributed {self.what}: the task on {task} failed because the workers "
                f"running it died {deaths} time{'s' if deaths > 1 else ''} ({self._why_killed()})"
            ) from e
        finally:
            bar.close()
            self.release(*self.futures)
        (value,), raised, more = _warnings.unwrapped((result,))
        _warnings.show([r for r in raised if r.message not in self.warned], more, self.what, self.labels, len(shards))
        return value

    def _why_killed(self) -> str:
        """The likely causes of a task that killed its workers: for an export, the user's code it runs
        (the data loader, the model, the loss, or a native library under them); for scoring, memory or
        a store file changed under its mapping."""
        if self.what.split()[0] == "export":
            return (
                "a crash in the data loader, the model or the loss as run there: native code that crashed "
                "(a segfault), os._exit, or out of memory? Run the same export in one process, on those rows "
                "alone (the data cut to them, into another store), to see the crash"
            )
        return "out of memory? a file changed while mapped?"

    def then(self, fn: Callable, part: Future, *args: Any) -> Future:
        """fn(part's result, *args) as a task, named in errors as part's shard (a NaN/Inf error of
        part reaches this task's future as part's task raised it, naming part's rows)."""
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
        if status in ("closing", "closed"):  # closed during the call, here or after a lost scheduler
            return TaskFailedError(
                f"tracin.distributed {self.what}: the task on {task} was cancelled because the client of the "
                f"scheduler at {self.address} was closed during the call (client.close(), or it lost the scheduler "
                "and gave up reconnecting); call again with a running client"
            )
        if status != "running":  # Dask cancels every future of a client that lost its scheduler
            return TaskFailedError(
                f"tracin.distributed {self.what}: the task on {task} was cancelled because the client lost its "
                f"scheduler at {self.address} (status {status!r}); call again once it is back, "
                "or with a client of a running scheduler"
            )
        return TaskFailedError(
            f"tracin.distributed {self.what}: the task on {task} was cancelled on the cluster (client.restart(), "
            "or its data lost with a worker?); call again"
        )

    def _raise(self, failed: Future) -> None:
        """The failed task's exception; for a worker that does not see a store of the call, the
        client's check of it first (a store removed since: the StoreChangedError of rows_of); for a
        worker's StoreFormatError (a worker reopens a store by its path), the client's check of the
        call's stores and their files first, so that a store changed since it was opened is the
        StoreChangedError tracin.top_k and the others raise on one machine. A shard's NaN/Inf or
        float32-overflow ValueError (its rows already counted in the caller's sets by _retrying) is
        raised with a sentence naming the shard's rows: the first shard to fail, raised without
        waiting for the others, so the rows it names are those the shard's own call meets first, not
        necessarily those tracin's own function names in one process. A call of one shard raises it as
        is: its rows are those one process names; so is a NaN/Inf error of the side sent whole, whose
        rows are no shard's (the client checks that side before sending it: _api._check_finite)."""
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
        except ValueError as e:
            shard = getattr(e, "tracin_shard", None) if type(e) is ValueError else None
            if shard is None or len(self.shards) == 1:  # one shard: no other shard may hold more such rows
                raise
            side, start, stop = shard
            if _other_sides_rows(str(e), side):  # the rows of the side sent whole, not of this shard
                raise
            rows = f"{side} row {start}" if stop - start == 1 else f"{side} rows {start} to {stop - 1}"
            error = ValueError(
                f"{str(e).rstrip('.')}. These rows are from the shard of {rows}, the first shard to fail; other "
                f"shards may hold more such rows (tracin.{self.what.split()[0]} in one process names the first ones)"
            )
            for note in getattr(e, "__notes__", ()):  # the warnings the task raised before it
                _warnings.add_note(error, note)
            raise error.with_traceback(e.__traceback__) from None


def _other_sides_rows(message: str, cut: str) -> bool:
    """Whether `message` is a NaN/Inf error naming rows of the side not cut into shards (not `cut`)."""
    found = _NON_FINITE.match(message)
    return found is not None and found[1] != cut


def _retrying(fn: Callable, first_rows: tuple[int, int], shard: tuple[str, int, int] | None, *args: Any) -> Any:
    """fn(*args), called again up to RETRIES times while it raises an OSError other than NO_RETRY's.
    A NaN/Inf error counts its rows from the shard's first (test, train) rows `first_rows` in the
    caller's sets, here, so that a worker's log of it names the rows the caller gets; it carries
    `shard` (side, start, stop in the caller's set) as tracin_shard, for Job._raise to name. The
    warnings fn raises are recorded (not shown on the worker) and travel with the result, with those
    of the tasks whose results are its arguments (_warnings.carried), for Job.wait to show; those
    raised before an error, in a note on it."""
    args, earlier, more = _warnings.unwrapped(args)
    with _warnings.recorded() as caught:
        try:
            value = _tried(fn, first_rows, shard, args)
        except Exception as e:
            _warnings.note_raised(e, caught)
            raise
    return _warnings.carried(value, earlier, more, caught)


def _tried(fn: Callable, first_rows: tuple[int, int], shard: tuple[str, int, int] | None, args: tuple) -> Any:
    """fn(*args) as _retrying runs it, its warnings aside."""
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
        error = ValueError(message)
        error.tracin_shard = shard  # pickled with the exception (its __dict__)
        raise error from None


def _value(x: Any) -> Any:
    return x
