"""Faults during a distributed job on a real LocalCluster: a worker killed, a shard file missing or corrupt."""

from __future__ import annotations

import concurrent.futures
import functools
import io
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import dask
import numpy as np
import pytest
from distributed import Client, Event, LocalCluster

import tracin
import tracin.distributed as td
from store_files import write_with_nonfinite
from tracin.distributed import _tasks
from tracin.distributed._cluster import local_client, slots_by_host
from tracin.distributed._run import Job, TaskFailedError, _retrying
from tracin.store import StoreChangedError, StoreFormatError

from .conftest import ALLOWED_FAILURES, own_client, read_on_workers, write_store


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store whose distributed top_k takes a few seconds on two single-threaded workers."""
    rng = np.random.default_rng(3)
    train = [rng.standard_normal((24000, 256)).astype(np.float32)]
    test = tracin.Gradients(rng.standard_normal((600, 256)).astype(np.float32))
    return {"store": write_store(tmp_path_factory.mktemp("slow") / "store", train, None), "test": test}


def test_worker_killed_mid_top_k(slow):
    expected = tracin.top_k(slow["test"], slow["store"], 25, "both")
    with own_client() as client:
        _kill_a_worker_mid_top_k(client, slow, expected)


def _kill_a_worker_mid_top_k(client: Client, slow: dict, expected: list) -> None:
    pids = client.run(os.getpid)
    out: dict = {}
    job = threading.Thread(
        target=lambda: out.update(found=td.top_k(slow["test"], slow["store"], 25, "both", client=client, shards=12))
    )
    job.start()
    victim = None
    for _ in range(2000):  # wait for a shard task to be running, then kill its worker
        busy = [w for w, keys in client.processing().items() if any("top_k_part" in str(k) for k in keys)]
        if busy:
            victim = busy[0]
            break
        time.sleep(0.005)
    assert victim is not None and job.is_alive()
    os.kill(pids[victim], signal.SIGKILL)
    job.join(timeout=120)
    assert not job.is_alive()
    assert victim not in client.scheduler_info()["workers"]  # the killed worker is gone
    for f, e in zip(out["found"], expected, strict=True):
        np.testing.assert_array_equal(f.values, e.values)
        np.testing.assert_array_equal(f.indices, e.indices)


def _copy(store: tracin.GradientStore, path) -> tracin.GradientStore:
    shutil.copytree(store.path, path)
    return tracin.GradientStore.open(path)


def test_missing_shard_file_is_named(client, tied, tmp_path):
    store = _copy(tied["store"], tmp_path / "s")  # opened while complete, as by a user before the loss
    lost = store.path / "checkpoint_001.npy"
    lost.unlink()
    # removed after opening: tracin.top_k's StoreChangedError (workers find the file missing, the client why)
    with pytest.raises(StoreChangedError, match=f"{lost} was removed after the gradient store was opened"):
        td.top_k(tied["test"], store, 3, client=client, shards=4)
    with pytest.raises(StoreFormatError, match=str(lost)):  # by path: found on the client already
        td.self_influence(str(store.path), client=client)


def test_corrupt_shard_file_is_named(client, tied, tmp_path):
    store = _copy(tied["store"], tmp_path / "s")
    bad = store.path / "checkpoint_000.npy"
    with open(bad, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(StoreChangedError, match=f"{bad} was replaced or modified after the gradient store was opened"):
        td.aggregate(tied["test"], store, client=client, shards=4)
    _copy(tied["store"], tmp_path / "t")
    truncated = tmp_path / "t" / "checkpoint_001.npy"
    store = tracin.GradientStore.open(tmp_path / "t")
    os.truncate(truncated, truncated.stat().st_size - 12)
    with pytest.raises(StoreFormatError, match=str(truncated)):
        td.top_k(tied["test"], store, 3, client=client, shards=4)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_task_that_keeps_killing_workers_is_named():
    with own_client(1) as own:
        job = Job(own, "test")
        doomed = job.submit(_die, label="rows [0, 10) of /some/store")
        with pytest.raises(RuntimeError, match=rf"rows \[0, 10\) of /some/store .* died {ALLOWED_FAILURES + 1} times"):
            job.wait([doomed], progress=False)


def _local_error(call) -> str:
    with pytest.raises(StoreChangedError) as e:
        call()
    return str(e.value)


def test_store_recreated_or_removed_after_opening_is_the_local_error_at_once(client, tied, tmp_path):
    """Checked on the client before any task: tracin.top_k's StoreChangedError, without the 5 s a worker
    looks again for a store it does not see and its advice on sharing the file system."""
    store = _copy(tied["store"], tmp_path / "s")
    write_store(tmp_path / "s", [m[::-1].copy() for m in tied["train"]], [0.5, 2.0], overwrite=True)
    local = _local_error(lambda: tracin.top_k(tied["test"], store, 3))
    assert "was re-created after it was opened" in local
    with pytest.raises(StoreChangedError, match=re.escape(local)):
        td.top_k(tied["test"], store, 3, client=client, shards=2)
    shutil.rmtree(tmp_path / "s")
    local = _local_error(lambda: tracin.self_influence(store[5:]))
    assert f"gradient store {store.path} was removed after it was opened" in local
    for call in (
        lambda: td.self_influence(store[5:], client=client, shards=2),
        lambda: td.aggregate(store, tied["test"], client=client),
    ):
        began = time.monotonic()
        with pytest.raises(StoreChangedError, match=re.escape(local)):
            call()
        assert time.monotonic() - began < 2


@pytest.mark.parametrize("change", ["removed", "truncated"])
def test_a_data_file_changed_after_opening_is_the_local_error_too(client, tied, tmp_path, change):
    """The manifest unchanged but a data file removed or cut short: workers reopen the store by its
    path and find it inconsistent (a StoreFormatError); the client's check of its files then gives
    tracin.top_k's StoreChangedError, which callers catch to open the store again (review23 F1)."""
    store = _copy(tied["store"], tmp_path / "s")
    data = max((p for p in (tmp_path / "s").iterdir() if p.suffix == ".npy"), key=lambda p: p.stat().st_size)
    if change == "removed":
        data.unlink()
    else:
        os.truncate(data, data.stat().st_size - 32)
    local = _local_error(lambda: tracin.top_k(tied["test"], store, 3))
    with pytest.raises(StoreChangedError, match=re.escape(local)):
        td.top_k(tied["test"], store, 3, client=client, shards=2)


def _tracin_tasks(dask_scheduler) -> list[str]:
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith("tracin_")]


def test_a_side_sent_before_the_store_check_fails_is_released(client, tied, tmp_path):
    """The in-memory side is sent, then the store is found removed (StoreChangedError before any wait):
    nothing of the call stays on the scheduler, even while the exception (and its frames, which hold
    the side's future) is kept, as a REPL keeps sys.last_value."""
    store = _copy(tied["store"], tmp_path / "s")
    shutil.rmtree(tmp_path / "s")
    kept = []
    for call in (
        lambda: td.top_k(tied["test"], store, 3, client=client),
        lambda: td.aggregate(tied["test"], store, client=client),
    ):
        with pytest.raises(StoreChangedError) as e:
            call()
        kept.append(e.value)
    left, held = client.run_on_scheduler(_tracin_tasks), client.who_has()
    for _ in range(50):  # releases reach the scheduler asynchronously, the tasks' and their data's apart
        if not left and not held:
            break
        time.sleep(0.1)
        left, held = client.run_on_scheduler(_tracin_tasks), client.who_has()
    assert left == [] and held == {}
    assert len(kept) == 2


def test_a_store_recreated_since_the_clients_check_is_refused_by_the_task(client, tied, tmp_path):
    store = _copy(tied["store"], tmp_path / "s")
    job = Job(client, "test")
    rows = job.rows_of(store)  # checked on the client
    write_store(tmp_path / "s", [m[::-1].copy() for m in tied["train"]], [0.5, 2.0], overwrite=True)
    task = job.submit(rows.open)  # the task opens the store by path there
    with pytest.raises(StoreChangedError, match=f"gradient store {store.path} here is not the one opened"):
        job.wait([task], progress=False)


def test_failure_on_the_default_client_is_raised_as_is(client, tied, tmp_path):
    store = _copy(tied["store"], tmp_path / "s")
    lost = store.path / "checkpoint_000.npy"
    lost.unlink()
    with client.as_current(), pytest.raises(StoreChangedError, match=f"{lost} was removed after the gradient"):
        td.self_influence(store, shards=2)


def test_a_workers_store_error_is_raised_as_is_when_the_clients_stores_are_unchanged(tied, tmp_path):
    """Job._raise on its own: a worker's StoreFormatError about a store the client still finds as it
    opened it is the worker's error; once one of its files is removed, the client's StoreChangedError."""

    class Failed:
        def result(self):
            raise StoreFormatError("made up on a worker")

    job = Job(object(), "top_k")
    store = _copy(tied["store"], tmp_path / "s")
    job.rows_of(store)
    with pytest.raises(StoreFormatError, match="^made up on a worker$"):
        job._raise(Failed())
    (store.path / "checkpoint_001.npy").unlink()
    with pytest.raises(StoreChangedError, match="checkpoint_001.npy was removed after the gradient store was opened"):
        job._raise(Failed())


@pytest.mark.parametrize(
    ("what", "why"),
    [
        ("self_influence", r"\(out of memory\? a file changed while mapped\?\)$"),
        ("export (torch)", r"\(a crash in the data loader, the model or the loss .*os\._exit.*in one process"),
    ],
)
def test_killed_worker_is_a_task_failed_error_naming_the_shard(monkeypatch, what, why):
    # KilledWorker injected where Job.wait collects results: no cluster needed for the error class.
    import tracin.distributed._run as run

    class FakeClient:
        loop = None

        def cancel(self, futures):
            pass

    def killed(futures, loop):
        raise run.KilledWorker(task="k-0", last_worker=None, allowed_failures=0)

    monkeypatch.setattr(run, "as_completed", killed)
    job = Job(FakeClient(), what)
    job.labels["k-0"] = "rows [0, 4) of /some/store"
    with pytest.raises(td.TaskFailedError, match=r"rows \[0, 4\) of /some/store .* died 1 time \(") as e:
        job.wait(["shard"], progress=False)
    assert isinstance(e.value, RuntimeError) and isinstance(e.value.__cause__, run.KilledWorker)
    assert re.search(why, str(e.value)), str(e.value)
    assert ("mapped" in str(e.value)) == (what == "self_influence")  # not a scoring cause for an export


def test_an_export_whose_data_kills_its_workers_names_the_users_code(tmp_path):
    """Review110 F4: for an export the suspects are the data loader, the model and the loss (a crash in native
    code, os._exit), and the way to see the crash: the same export in one process; not a mapped file."""
    pytest.importorskip("torch")
    from .test_export import _setup

    model, checkpoints, (inputs, targets), loss = _setup(20, 4)
    data = read_on_workers([(inputs[i : i + 10], targets[i : i + 10]) for i in (0, 10)], functools.partial(os._exit, 3))
    store = tmp_path / "s"
    with own_client(1) as own, pytest.raises(TaskFailedError) as e:
        td.export_gradients("torch", model, checkpoints, data, loss, store=store, client=own, shards=1)
    message = str(e.value)
    assert re.search(
        rf"the task on rows \[0, 20\) of {re.escape(str(store))} failed because the workers running it died "
        rf"{ALLOWED_FAILURES + 1} times \(a crash in the data loader, the model or the loss as run there: native "
        r"code that crashed \(a segfault\), os\._exit, or out of memory\? Run the same export in one process",
        message,
    ), message
    assert "mapped" not in message


def test_non_finite_rows_are_named_in_the_callers_sets(client, tmp_path):
    """A shard's NaN/Inf error counts rows from the start of the set passed in, not of the shard."""
    rng = np.random.default_rng(5)
    rows = [rng.standard_normal((400, 16)).astype(np.float32)]
    rows[0][[250, 251]] = np.nan
    store = write_store(tmp_path / "bad", rows, None)
    by_100 = tracin.GradientStore.open(store.path, chunk_bytes=100 * store.row_bytes)
    small = tracin.Gradients(rng.standard_normal((3, 16)).astype(np.float32))
    as_train = r"train checkpoint 0 contains NaN or Inf values, first in rows \[250, 251\]"
    as_test = as_train.replace("train", "test")
    for call, message in (
        (lambda: td.top_k(small, store, 2, client=client, shards=4), as_train),
        (lambda: td.self_influence(store, client=client, shards=4), as_train),
        (lambda: td.aggregate(small, store, client=client, shards=4), as_train),
        (lambda: td.top_k(store, small, 2, client=client, shards=4), as_test),
        (lambda: td.aggregate(by_100, small, client=client, shards=4), as_test),  # cut on its 4 row chunks
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("shards", [1, 2])
def test_full_aggregate_names_non_finite_train_rows_in_a_shards_later_chunks(client, tmp_path, shards):
    """Full gradients: a train shard's task takes its dot products chunk by chunk (chunks of 100 rows here): a
    NaN/Inf error in a later chunk counts its train rows from the set's start, not from the chunk's (review332)."""
    rng = np.random.default_rng(5)
    rows = [rng.standard_normal((400, 16)).astype(np.float32)]
    rows[0][[250, 251]] = np.nan
    store = write_store(tmp_path / "bad", rows, None, chunk_bytes=100 * 64)
    small = tracin.Gradients(rng.standard_normal((3, 16)).astype(np.float32))
    message = r"train checkpoint 0 contains NaN or Inf values, first in rows \[250, 251\]"
    with pytest.raises(ValueError, match=message):
        tracin.aggregate(small, store)
    with pytest.raises(ValueError, match=message):
        td.aggregate(small, store, client=client, shards=shards)
    sums = _tasks.column_sums_part(small, None, 1, 0)  # the task alone, without the cluster
    with pytest.raises(ValueError, match=message):
        _tasks.aggregate_sums_part(sums, store, [1.0], 1, 0)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_factored_aggregate_names_non_finite_rows_in_a_shards_later_chunks(client, tmp_path, shards):
    """A factored aggregate task scores its shard chunk by chunk: a NaN/Inf error in a later chunk counts
    its rows from the set's start, not from the chunk's (rows 44 and 70, in chunks of 7 rows)."""
    rng = np.random.default_rng(6)
    left, right = rng.standard_normal((91, 4)).astype(np.float32), rng.standard_normal((91, 5)).astype(np.float32)
    left[[44, 70]] = np.nan
    writer = tracin.GradientStore.create(tmp_path / "bad", 91, [(4, 5)], factored=True)
    write_with_nonfinite(writer, 0, 0, (left, right))
    writer.finalize()
    store = tracin.GradientStore.open(tmp_path / "bad", chunk_bytes=7 * 36)
    small = tracin.FactoredGradients([np.ones((3, 4), np.float32)], [right[:3]])
    named = r" left factor of checkpoint 0 contains NaN or Inf values, first in rows \[(44|70)\b"
    with pytest.raises(ValueError, match="train" + named):
        td.aggregate(small, store, client=client, shards=shards)
    with pytest.raises(ValueError, match="test" + named):
        td.aggregate(store, small, client=client, shards=shards)


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stores of 400 rows x 16 (4 shards of 100 rows) with bad rows in shards 0, 2 and 3: NaN rows,
    and finite rows whose products with the in-memory test row 1 overflow float32."""
    rng = np.random.default_rng(12)
    rows = rng.standard_normal((400, 16)).astype(np.float32)
    nan, big = rows.copy(), rows.copy()
    nan[[30, 250, 251, 350]] = np.nan
    big[[30, 260, 350], :2] = (1e20, 0.0)  # products 1e40 with test row 1 below
    test = rng.standard_normal((2, 16)).astype(np.float32)
    test[1, :2] = (1e20, 0.0)
    return {
        "nan": write_store(tmp_path_factory.mktemp("bad") / "nan", [nan], None),
        "big": write_store(tmp_path_factory.mktemp("bad") / "big", [big], None),
        "small": tracin.Gradients(rng.standard_normal((3, 16)).astype(np.float32)),
        "test": tracin.Gradients(test),
    }


def _gated(fn, event: str):
    """fn, run once the distributed.Event `event` is set; the task secedes while it waits, so that
    its worker's thread runs the other shards meanwhile."""

    def gated(*args):
        from distributed import Event, rejoin, secede

        secede()
        Event(event).wait(300)
        rejoin()
        return fn(*args)

    gated.__name__ = fn.__name__
    return gated


NAN_TRAIN = "train checkpoint 0 contains NaN or Inf values, first in rows "


@pytest.mark.parametrize(
    "call, fn, named",
    [
        (lambda s, kw: td.self_influence(s["nan"], **kw), "self_influence", NAN_TRAIN),
        (lambda s, kw: td.top_k(s["small"], s["nan"], 2, **kw), "top_k", NAN_TRAIN),
        (lambda s, kw: td.aggregate(s["small"], s["nan"], **kw), "aggregate", NAN_TRAIN),
        (lambda s, kw: td.top_k(s["nan"], s["small"], 2, **kw), "top_k", NAN_TRAIN.replace("train", "test")),
        (lambda s, kw: td.top_k(s["test"], s["big"], 2, **kw), "top_k", "first for test row 1 and train row 260;"),
    ],
    ids=["self_influence", "top_k train cut", "aggregate train cut", "top_k test cut", "top_k overflow pair"],
)
def test_a_shards_row_error_is_raised_at_once_naming_the_shard(client, bad_rows, monkeypatch, call, fn, named):
    """The first shard's NaN/Inf or overflow error to arrive is raised without waiting for the other
    shards, which here stay blocked until the error has reached the caller (review68 F2: 568d665 waited
    for them all); it names real bad rows of that shard in the caller's numbering, and the shard's
    rows, saying other shards may hold more (review68 F1: one process may name others first)."""
    event = f"tracin-test-{uuid.uuid4().hex}"
    submit = Job.submit

    def gating(self, task, *args, label=None, first_rows=(0, 0), **kw):
        if label is not None and max(first_rows) != 200:  # every shard task but that of rows [200, 300)
            task = _gated(task, event)
        return submit(self, task, *args, label=label, first_rows=first_rows, **kw)

    monkeypatch.setattr(Job, "submit", gating)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        found = pool.submit(call, bad_rows, {"client": client, "shards": 4, "progress": False})
        try:
            error = found.exception(timeout=60)
        except concurrent.futures.TimeoutError:
            pytest.fail("the error waited for the shards still running")
        finally:
            Event(event, client=client).set()
    assert type(error) is ValueError
    message = str(error)
    assert named in message
    if "NaN" in named:  # the shard's own bad rows, counted as the caller counts them
        assert message.startswith(f"{named}[250, 251]. ")
    side = "test" if named.startswith("test") else "train"
    assert message.endswith(
        f". These rows are from the shard of {side} rows 200 to 299, the first shard to fail; other shards "
        f"may hold more such rows (tracin.{fn} in one process names the first ones)"
    )


@pytest.mark.parametrize(
    "distributed, local",
    [
        (lambda s, kw: td.self_influence(s["nan"], **kw), lambda s: tracin.self_influence(s["nan"])),
        (lambda s, kw: td.top_k(s["small"], s["nan"], 2, **kw), lambda s: tracin.top_k(s["small"], s["nan"], 2)),
        (lambda s, kw: td.aggregate(s["small"], s["nan"], **kw), lambda s: tracin.aggregate(s["small"], s["nan"])),
        (lambda s, kw: td.top_k(s["nan"], s["small"], 2, **kw), lambda s: tracin.top_k(s["nan"], s["small"], 2)),
        (lambda s, kw: td.top_k(s["test"], s["big"], 2, **kw), lambda s: tracin.top_k(s["test"], s["big"], 2)),
    ],
    ids=["self_influence", "top_k train cut", "aggregate train cut", "top_k test cut", "top_k overflow pair"],
)
def test_a_one_shard_calls_row_error_is_one_process_error(client, bad_rows, distributed, local):
    """With one shard there is no other shard to hold more such rows (review71): the error is the one
    tracin's own function raises in one process, with no sentence about shards."""
    with pytest.raises(ValueError) as want:
        local(bad_rows)
    with pytest.raises(ValueError) as got:
        distributed(bad_rows, {"client": client, "shards": 1, "progress": False})
    assert type(got.value) is ValueError and "shard" not in str(got.value)
    assert str(got.value) == str(want.value)


def _non_finite(n: int) -> None:
    raise ValueError(f"train checkpoint 0 contains NaN or Inf values, first in rows [{n}, {n + 1}]")


def test_a_task_names_non_finite_rows_in_the_callers_sets_itself():
    """On the worker, so that its log of the error (Dask's 'Compute Failed') names the caller's rows."""
    with pytest.raises(ValueError, match=r"first in rows \[253, 254\]$"):
        _retrying(_non_finite, (0, 250), None, 3)
    with pytest.raises(ValueError, match=r"first in rows \[3, 4\]$"):  # a test shard's rows: train not shifted
        _retrying(_non_finite, (250, 0), None, 3)
    with pytest.raises(ValueError, match=r"first in rows \[253, 254\]$") as e:  # the shard travels for Job._raise
        _retrying(_non_finite, (0, 250), ("train", 250, 300), 3)
    assert e.value.tracin_shard == ("train", 250, 300)


def test_the_calls_own_local_cluster_logs_no_task_failure(tmp_path, capfd):
    """client=None: tracin's LocalCluster is silent; the caller gets the error (rows in its set) alone."""
    rows = [np.random.default_rng(6).standard_normal((40, 4)).astype(np.float32)]
    rows[0][33, 1] = np.nan
    store = write_store(tmp_path / "bad", rows, None)
    with pytest.raises(ValueError, match=r"first in rows \[33\]"):
        td.self_influence(store, shards=4)
    err = capfd.readouterr().err
    assert "tracin.distributed: LocalCluster of" in err and "Compute Failed" not in err and "Traceback" not in err


def _kill_own_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_calls_own_local_cluster_logs_why_a_worker_died():
    """A worker killed (as by the OOM killer): besides the TaskFailedError, the scheduler's and nanny's
    lines on it reach the stream handlers of Dask's loggers (which the cluster would silence below them)."""
    shown = io.StringIO()
    handler = logging.StreamHandler(shown)
    handler.setLevel(logging.WARNING)
    logging.getLogger("distributed").addHandler(handler)
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}), local_client(1) as own:
            job = Job(own, "test")
            doomed = job.submit(_kill_own_worker, label="rows [0, 10) of /some/store")
            with pytest.raises(TaskFailedError, match=r"rows \[0, 10\) of /some/store .* died 1 time"):
                job.wait([doomed], progress=False)
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    assert "marked as failed because 1 workers died" in shown.getvalue()
    assert "Restarting worker" in shown.getvalue()


def test_sent_side_is_made_again_when_the_only_worker_holding_it_dies():
    """An in-memory side is the result of a task: when its only worker dies, Dask computes it again
    (scattered data would be lost, and the call fail with 'already forgotten')."""
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster, set_as_default=False) as own,
    ):
        job = Job(own, "test")
        sent = job.send(np.arange(10.0))
        assert own.gather(job.submit(np.sum, sent)) == 45.0  # held by the worker now
        ((address, pid),) = own.run(os.getpid).items()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while set(own.scheduler_info()["workers"]) in (set(), {address}) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the nanny's new worker has replaced the dead one
        assert job.wait([job.submit(np.sum, sent, label="rows [0, 10) of /x")], progress=False) == [45.0]


@pytest.mark.parametrize("cancelled", ["shard", "final"])
def test_cancelled_task_is_named_with_advice_to_call_again(client, cancelled):
    job = Job(client, "test")
    shard = job.submit(time.sleep, 0.2 if cancelled == "final" else 5, label="rows [0, 3) of /some/store")
    final = job.submit(time.sleep, 5, label="rows [3, 6) of /some/store")
    client.cancel([shard if cancelled == "shard" else final])
    which = r"rows \[0, 3\)" if cancelled == "shard" else r"rows \[3, 6\)"
    with pytest.raises(td.TaskFailedError, match=rf"{which} of /some/store was cancelled .*; call again"):
        job.wait([shard], progress=False, final=final)


def test_failed_job_drops_the_tasks_not_started(client):
    """Job.wait releases the job's futures on a failure: the queued tasks are dropped, not run."""
    job = Job(client, "test")
    slow = [job.submit(time.sleep, 2, label=f"rows [{i}, {i + 1}) of /x") for i in range(8)]  # 8 s on 2 workers
    with pytest.raises(ValueError, match="invalid literal"):
        job.wait([job.submit(int, "x", label="rows [8, 9) of /x"), *slow], progress=False)

    def left() -> int:
        return client.run_on_scheduler(
            lambda dask_scheduler, t=job.token: sum(t in str(k) for k in dask_scheduler.tasks)
        )

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == 0


def _client_of_a_lost_scheduler(reconnect_s: float) -> tuple[Client, str]:
    """A client (reconnecting for `reconnect_s`) whose scheduler has just stopped: status 'connecting'."""
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp", dashboard_address=":0"
    )
    address = cluster.scheduler_address
    lost = Client(address, timeout=reconnect_s, set_as_default=False)
    assert lost.status == "running"
    cluster.close()
    deadline = time.monotonic() + 10
    while lost.status == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost.status == "connecting"
    return lost, address


def test_a_client_that_lost_its_scheduler_is_named(tied):
    """Called while Dask tries to reconnect: once it gives up, an error naming the scheduler and the
    client's status (the old code: KeyError 'workers', from the emptied record of the closed client)."""
    for call in (
        lambda c: td.self_influence(tied["store"], client=c, progress=False),
        lambda c: td.top_k(tied["test"], tied["store"], 3, client=c, progress=False),
        lambda c: td.aggregate(tied["test"], tied["store"], client=c, progress=False),
    ):
        lost, address = _client_of_a_lost_scheduler(2)
        began = time.monotonic()
        with pytest.raises(
            ConnectionError,
            match=rf"^the client lost its scheduler at {re.escape(address)} and could not reconnect \(status "
            r"'clos(ing|ed)' now\): pass a client of a running scheduler$",
        ):
            call(lost)
        assert time.monotonic() - began < 2 + 5 + 3  # the client's reconnect timeout, the margin, slack
        lost.close()


def test_an_export_whose_client_lost_its_scheduler_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tracin.torch")  # imported now, not within the client's 2 s of reconnecting (then 'closed')
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    data = (torch.randn(12, 4), torch.randint(0, 3, (12,)))
    lost, address = _client_of_a_lost_scheduler(2)
    lost_it = rf"the client lost its scheduler at {re.escape(address)} .*'clos(ing|ed)'"
    with pytest.raises(ConnectionError, match=lost_it):
        td.export_gradients(
            "torch",
            model,
            checkpoints,
            data,
            torch.nn.CrossEntropyLoss(reduction="none"),
            store=tmp_path / "s",
            client=lost,
            progress=False,
        )
    assert not (tmp_path / "s").exists()  # refused before the data pass and the store (review64 F2)
    lost.close()


def test_a_client_closed_while_its_workers_are_asked_for_is_named():
    """The scheduler found gone during slots_by_host's request (Dask then answers with an emptied record)."""

    class Closing:
        status = "running"
        scheduler = type("Rpc", (), {"address": "tcp://10.0.0.9:8786"})()

        def scheduler_info(self, n_workers):
            self.status, self.scheduler = "closed", None  # as a failed reconnection leaves a client
            return {}

    not_connected = r"^the client of the scheduler at tcp://10.0.0.9:8786 is not connected \(status 'closed'\)"
    with pytest.raises(ConnectionError, match=not_connected):
        slots_by_host(Closing())


def test_tasks_cancelled_with_a_lost_scheduler_are_named_so():
    class Reconnecting:
        status = "connecting"
        scheduler = type("Rpc", (), {"address": "tcp://10.0.0.9:8786"})()

    job = Job(Reconnecting(), "top_k")
    job.labels["k-0"] = "rows [0, 4) of /some/store"
    message = str(job._cancelled("k-0"))
    assert "rows [0, 4) of /some/store was cancelled because the client lost its scheduler at tcp://10" in message
    assert "(status 'connecting'); call again once it is back" in message


def _held(started: str, release: str):
    """A task body that sets the distributed.Event `started`, then waits for `release` and fails (no
    rows written): a call's task known to run when the test closes the call's client."""

    def held(*args):
        from distributed import Event

        Event(started).set()
        Event(release).wait(60)
        raise RuntimeError("released by the test")

    return held


@contextmanager
def _closed_once_started(client: Client) -> Iterator[tuple[Client, str, str]]:
    """(a second client of `client`'s scheduler, the names of two distributed.Events): the second client
    is closed from another thread once a task sets the first Event, as a notebook cell or an atexit hook
    could close it during a call; the second Event, which ends the task, is set on the way out."""
    closing = Client(client.scheduler.address, set_as_default=False)
    started, release = (f"{what}-{uuid.uuid4().hex}" for what in ("started", "release"))

    def close() -> None:
        Event(started, client=client).wait(60)
        closing.close()

    closer = threading.Thread(target=close)
    closer.start()
    try:
        yield closing, started, release
    finally:
        Event(release, client=client).set()
        Event(started, client=client).set()  # a call that failed before its task started: no 60 s wait
        closer.join(60)
        closing.close()


def test_a_client_closed_during_a_call_is_named_so(client):
    """Not a lost scheduler, whose address a closed client no longer knows (review175 F1): the client
    was closed, and the scheduler it was a client of is named."""
    with _closed_once_started(client) as (closing, started, release):
        job = Job(closing, "top_k")
        shard = job.submit(_held(started, release), label="rows [0, 4) of /some/store")
        with pytest.raises(TaskFailedError) as e:
            job.wait([shard], progress=False)
    assert closing.status == "closed"
    assert str(e.value) == (
        "tracin.distributed top_k: the task on rows [0, 4) of /some/store was cancelled because the client of "
        f"the scheduler at {client.scheduler.address} was closed during the call (client.close(), or it lost "
        "the scheduler and gave up reconnecting); call again with a running client"
    )


def test_an_export_whose_client_is_closed_during_the_call_gives_no_restart_advice(client, tmp_path):
    """A closed client cannot restart: the export's note says to call again with a running client."""
    pytest.importorskip("torch")
    from .test_export import _setup

    model, checkpoints, (inputs, targets), loss = _setup(8, 4)
    batches = [(inputs, targets)]
    store = tmp_path / "s"
    with _closed_once_started(client) as (closing, started, release):
        data = read_on_workers(batches, _held(started, release))
        with pytest.raises(TaskFailedError, match=r"client of the scheduler at .* was closed during the call") as e:
            td.export_gradients(
                "torch", model, checkpoints, data, loss, store=store, client=closing, shards=1, progress=False
            )
    assert e.value.__notes__ == [
        f"tracin.distributed export of {store}: its tasks already running on the workers go on until their rows "
        "are written, or they fail (cancelling stops only those not started); wait for them before calling again "
        "to resume (with a running client)"
    ]
