"""Distributed export on a real LocalCluster: the finished store is byte for byte a single-process
export's, also when a worker is killed mid-export (docs/format.md, "Several writers: row ranges")."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import UserDict
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream, get_worker

torch = pytest.importorskip("torch")

import tracin  # noqa: E402
import tracin.distributed as td  # noqa: E402
import tracin.torch  # noqa: E402
from tracin._export import driver  # noqa: E402
from tracin._export.driver import store_rows  # noqa: E402
from tracin.distributed import _export  # noqa: E402
from tracin.store._range_writer import GradientStoreRangeWriter  # noqa: E402

from .conftest import own_client  # noqa: E402


def _setup(n_rows: int, width: int, seed: int = 0) -> tuple:
    """(model, two in-memory checkpoints, (inputs, targets), per-example loss)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    checkpoints = []
    for lr in (0.1, 0.05):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        checkpoints.append(({k: v.clone() for k, v in model.state_dict().items()}, lr))
    inputs = torch.randn(n_rows, 10)
    targets = torch.randint(0, 3, (n_rows,))
    return model, checkpoints, (inputs, targets), torch.nn.CrossEntropyLoss(reduction="none")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Single-process exports here use one torch thread, as each task does (torch's bits depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sent(args: tuple, kwargs: dict, adapter: str = "torch") -> bytes:
    """The bytes a task gets of the export's args and kwargs."""
    into = io.BytesIO()
    _export.pickle_arguments((args, kwargs), into, adapter)
    return into.getvalue()


def _same_store(found: tracin.GradientStore, expected: tracin.GradientStore) -> None:
    """Every data file equal byte for byte, and the same metadata and weights."""
    files = sorted(p.name for p in Path(expected.path).glob("*.npy"))
    assert files and files == sorted(p.name for p in Path(found.path).glob("*.npy"))
    for name in files:
        assert (Path(found.path) / name).read_bytes() == (Path(expected.path) / name).read_bytes(), name
    assert found.metadata == expected.metadata
    assert not list(Path(found.path).glob("rows-*"))  # range progress merged and removed at finalize


@pytest.mark.parametrize("kw", [{"batch_size": 16}, {"mode": "factored", "batch_size": 7, "dtype": "float16"}])
def test_export_equals_single_process_export(client, tmp_path, kw, monkeypatch):
    model, checkpoints, data, loss = _setup(203, 8)
    expected = tracin.torch.export_gradients(
        model, checkpoints, data, loss, store=tmp_path / "one", progress=False, **kw
    )
    computed = []  # rows the client computes itself (its final pass only checks and finalizes: none)
    rows = driver._Loop._rows
    monkeypatch.setattr(driver._Loop, "_rows", lambda self, c, *a, **k: computed.append(c) or rows(self, c, *a, **k))
    with get_task_stream(client) as tasks:
        found = td.export_gradients(
            "torch",
            model,
            checkpoints,
            data,
            loss,
            store=tmp_path / "many",
            client=client,
            shards=5,
            num_threads=1,
            progress=False,
            **kw,
        )
    assert sum("export_part" in t["key"] for t in tasks.data) == 5  # the rows were written by the tasks
    assert computed == []  # all of them: none left for the client (review256 F6: a range one row short was)
    assert found.complete
    _same_store(found, expected)
    if "mode" not in kw:  # and the rows are the gradients (not only equal files): self-influence in float64
        grads = [np.load(Path(found.path) / f"checkpoint_{c:03d}.npy").astype(np.float64) for c in (0, 1)]
        ref = sum(lr * (g * g).sum(1) for g, (_, lr) in zip(grads, checkpoints, strict=True))
        np.testing.assert_allclose(td.self_influence(found, client=client, progress=False), ref, rtol=1e-5)


def test_interrupted_export_resumes_with_other_shards(client, tmp_path):
    model, checkpoints, data, loss = _setup(150, 8)
    expected = tracin.torch.export_gradients(
        model, checkpoints, data, loss, store=tmp_path / "one", batch_size=10, progress=False
    )
    store = tmp_path / "many"
    with store_rows(0, 0):
        tracin.torch.export_gradients(model, checkpoints, data, loss, store=store, batch_size=10, progress=False)
    with store_rows(25, 80):  # what a task runs: rows [25, 80) only, left unfinalized
        assert (
            tracin.torch.export_gradients(model, checkpoints, data, loss, store=store, batch_size=10, progress=False)
            is None
        )
    with pytest.warns(UserWarning, match=r"range writers record rows past the 0 usable .*55, 55 more"):
        assert not tracin.GradientStore.open(store, allow_partial=True).complete
    found = td.export_gradients(
        "torch", model, checkpoints, data, loss, store=store, client=client, shards=3, batch_size=10, progress=False
    )
    _same_store(found, expected)


def test_rerun_while_tasks_of_an_interrupted_export_still_write_is_explained(client, tmp_path, monkeypatch):
    """A range writer still running (here in a thread, held in its first write) refuses the rerun with a message
    naming its range and what to do; once it ends, the rerun resumes and finishes the store."""
    model, checkpoints, data, loss = _setup(60, 8)
    kw = {"batch_size": 10, "progress": False}
    expected = tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "one", **kw)
    store, inside, release = tmp_path / "many", threading.Event(), threading.Event()
    write = GradientStoreRangeWriter.write

    def held_write(self, *args):
        if threading.current_thread().name == "task":
            inside.set()
            assert release.wait(60)
        write(self, *args)

    monkeypatch.setattr(GradientStoreRangeWriter, "write", held_write)
    with store_rows(0, 0):
        tracin.torch.export_gradients(model, checkpoints, data, loss, store=store, **kw)

    def task():
        with store_rows(20, 40):
            tracin.torch.export_gradients(model, checkpoints, data, loss, store=store, **kw)

    running = threading.Thread(target=task, name="task")
    running.start()
    assert inside.wait(60)
    try:
        with pytest.raises(
            RuntimeError, match=r"rows-20-40\.lock\) may be the tasks of an interrupted .*client\.restart"
        ):
            td.export_gradients("torch", model, checkpoints, data, loss, store=store, client=client, **kw)
    finally:
        release.set()
        running.join(60)
    found = td.export_gradients("torch", model, checkpoints, data, loss, store=store, client=client, **kw)
    _same_store(found, expected)


def test_interrupted_export_says_its_running_tasks_go_on(client, tmp_path, monkeypatch):
    def interrupted(job, parts, progress):
        job.client.cancel(job.futures)
        raise KeyboardInterrupt

    monkeypatch.setattr(td._export.Job, "wait", interrupted)
    model, checkpoints, data, loss = _setup(20, 4)
    with pytest.raises(KeyboardInterrupt) as e:
        td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client)
    assert "tasks already running on the workers go on until their rows are written" in "".join(e.value.__notes__)
    assert e.value.__notes__[-1].endswith("before calling again to resume, or call client.restart()")  # running


@pytest.mark.parametrize(
    ("raised", "outside", "noted"),
    [
        (td.TaskFailedError("workers died"), True, True),
        (ValueError("data: bad"), True, False),
        (KeyboardInterrupt(), False, False),
    ],
)
def test_interruption_note_only_where_running_tasks_go_on(client, tmp_path, monkeypatch, raised, outside, noted):
    """The note on tasks running on: for an interruption or lost workers on the caller's cluster; not for a
    task's own error (the data must be fixed first), nor when the call's own LocalCluster is closed."""

    def interrupted(job, parts, progress):
        job.client.cancel(job.futures)
        raise raised

    monkeypatch.setattr(td._export.Job, "wait", interrupted)
    monkeypatch.setattr(td._cluster, "usable_cores", lambda: 1)  # the call's own LocalCluster: one worker
    model, checkpoints, data, loss = _setup(20, 4)
    with pytest.raises(type(raised)) as e:
        td.export_gradients(
            "torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client if outside else None
        )
    assert ("tasks already running on the workers go on" in "".join(getattr(e.value, "__notes__", []))) == noted


class _BeforeNotes(KeyboardInterrupt):
    """A KeyboardInterrupt as Python 3.10 raises it: without add_note."""

    def __getattribute__(self, name: str):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_interrupted_export_prints_its_note_before_python_3_11(client, tmp_path, monkeypatch, capsys):
    def interrupted(job, parts, progress):
        job.client.cancel(job.futures)
        raise _BeforeNotes

    monkeypatch.setattr(td._export.Job, "wait", interrupted)
    model, checkpoints, data, loss = _setup(20, 4)
    with pytest.raises(_BeforeNotes):
        td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client)
    assert "tasks already running on the workers go on until their rows are written" in capsys.readouterr().err


def test_worker_killed_mid_export(tmp_path):
    model, checkpoints, data, loss = _setup(2000, 256, seed=1)
    kw = {"batch_size": 25}
    expected = tracin.torch.export_gradients(
        model, checkpoints, data, loss, store=tmp_path / "one", progress=False, **kw
    )
    with own_client() as client:
        pids = client.run(os.getpid)
        store = tmp_path / "many"
        out: dict = {}
        job = threading.Thread(
            target=lambda: out.update(
                found=td.export_gradients(
                    "torch", model, checkpoints, data, loss, store=store, client=client, shards=2, progress=False, **kw
                )
            )
        )
        job.start()
        victim = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until a range has written rows, then kill a worker exporting one
            written = [json.loads(p.read_text()) for p in store.glob("rows-*.json")] if store.exists() else []
            busy = [w for w, keys in client.processing().items() if any("export_part" in str(k) for k in keys)]
            if written and busy:
                victim = busy[0]
                break
            time.sleep(0.01)
        assert victim is not None and job.is_alive()
        os.kill(pids[victim], signal.SIGKILL)
        job.join(timeout=300)
        assert not job.is_alive()
        _same_store(out["found"], expected)


def test_bad_arguments_are_named(client, tmp_path):
    model, checkpoints, data, loss = _setup(20, 4)
    with pytest.raises(ValueError, match=r"adapter must be one of \('torch', 'jax'\), got 'tf'"):
        td.export_gradients("tf", model, checkpoints, data, loss, store=tmp_path / "s", client=client)
    with pytest.raises(TypeError, match="store must be a directory path that every worker sees, got NoneType"):
        td.export_gradients("torch", model, checkpoints, data, loss, store=None, client=client)
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client, shards=0)
    with pytest.raises(ValueError, match="worker_timeout must be a finite number of seconds > 0, or None"):
        td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", worker_timeout=-1.0)
    assert not (tmp_path / "s").exists()  # refused before anything was written


class _Counted(torch.utils.data.Dataset):
    """A data set that counts the items read from it (in this process)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets, self.read = inputs, targets, 0

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple:
        self.read += 1
        return self.inputs[i], self.targets[i]


def test_a_bad_client_is_refused_before_the_data_is_read_or_the_store_created(tmp_path):
    """As the scoring functions refuse it: not after the client's pass over the data (review64 F2)."""
    model, checkpoints, (inputs, targets), loss = _setup(20, 4)
    data = _Counted(inputs, targets)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        closed = Client(cluster)
        closed.close()
    for bad, error, message in (
        (closed, ValueError, r"^client is closed \(status 'closed'"),
        (
            "tcp://127.0.0.1:1",
            TypeError,
            r"^client must be a distributed.Client or None, got str \('tcp://127.0.0.1:1'\): "
            r"pass distributed.Client\('tcp://127.0.0.1:1'\) to use the scheduler at that address$",
        ),
    ):
        with pytest.raises(error, match=message):
            td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=bad)
        assert data.read == 0 and not (tmp_path / "s").exists()


def test_data_loader_with_worker_processes_is_named(client, tmp_path):
    model, checkpoints, (inputs, targets), loss = _setup(20, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=5, num_workers=2)
    with pytest.raises(ValueError, match=r"^data: .*DataLoader with num_workers=0 .*distributed.worker.daemon=False"):
        td.export_gradients("torch", model, checkpoints, loader, loss, store=tmp_path / "s", client=client, shards=2)


def test_cluster_that_never_gets_a_worker_is_named(tmp_path, capsys):
    model, checkpoints, data, loss = _setup(20, 4)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as c,
        pytest.raises(TimeoutError, match=r"the cluster at \S+ still has no workers after worker_timeout=0.5 s"),
    ):
        td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=c, worker_timeout=0.5)
    assert "waiting up to 0.5 s (worker_timeout) for one" in capsys.readouterr().err


def test_export_waits_for_its_first_worker_without_limit(tmp_path, capsys):
    model, checkpoints, data, loss = _setup(20, 4)
    expected = tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "one", progress=False)
    with (
        LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        threading.Timer(1.0, cluster.scale, [1]).start()
        found = td.export_gradients(
            "torch", model, checkpoints, data, loss, store=tmp_path / "s", client=c, num_threads=1
        )
    _same_store(found, expected)
    assert "has no workers yet; waiting for one (interrupt to stop)" in capsys.readouterr().err


def test_export_lets_an_adaptive_cluster_start_its_first_worker(tmp_path, capsys):
    """cluster.adapt(minimum=0) starts workers only for pending tasks: a task is pending while the export waits
    for its first worker, so one comes (the old code waited until worker_timeout, or forever with None)."""
    model, checkpoints, data, loss = _setup(20, 4)
    expected = tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "one", progress=False)
    with (
        LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        cluster.adapt(minimum=0, maximum=1, interval="100ms", wait_count=20)
        start = time.monotonic()
        found = td.export_gradients(
            "torch", model, checkpoints, data, loss, store=tmp_path / "s", client=c, num_threads=1, worker_timeout=60
        )
        took = time.monotonic() - start
    _same_store(found, expected)
    assert "waiting up to 60 s (worker_timeout) for one" in capsys.readouterr().err
    assert took < 30, f"an adaptive cluster's first worker came only after {took:.1f} s"


def test_overlapping_tasks_of_one_process_keep_the_thread_count_until_the_last_ends(monkeypatch):
    """Task A ends while task B still runs: A's thread has its count back, B's stays 1 until B ends, then the
    default from before A is back (torch keeps one per thread, and a default for new threads: a fresh thread
    reads it)."""
    torch.set_num_threads(3)
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def export(name, store, progress):
        if name == "a":
            a_in.set()
            assert b_in.wait(30)
        else:
            b_in.set()
            assert a_done.wait(30)
        seen[name] = torch.get_num_threads()

    monkeypatch.setattr(_export, "_export_function", lambda adapter: export)
    monkeypatch.setattr(_export, "refuse_unseen", lambda path: None)  # no store: the export is a stand-in

    def task(name):
        _export.export_part("torch", _sent((name,), {}), "unused", 0, 1, 1, None)

    b = threading.Thread(target=lambda: (a_in.wait(30), task("b")))
    b.start()
    task("a")
    assert torch.get_num_threads() == 3  # A's thread, while B still runs
    a_done.set()
    b.join(30)
    fresh = []
    reader = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    reader.start()
    reader.join(30)
    assert seen == {"a": 1, "b": 1} and fresh == [3]


def _fresh_thread_count() -> int:
    fresh = []
    reader = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    reader.start()
    reader.join(30)
    return fresh[0]


def test_a_task_gives_its_thread_back_its_own_count(monkeypatch):
    """A worker thread whose count differs from the default has its own back after a task, not the default."""
    default = _fresh_thread_count()
    monkeypatch.setattr(_export, "_export_function", lambda adapter: lambda store, progress: None)
    monkeypatch.setattr(_export, "refuse_unseen", lambda path: None)  # no store: the export is a stand-in
    after: list[int] = []

    def worker_thread():
        torch.set_num_threads(default + 1)  # this thread's count; the default for new threads follows it
        assert torch.get_num_threads() == default + 1  # read once: torch has set this thread up (as a task would)
        reset = threading.Thread(target=torch.set_num_threads, args=(default,))
        reset.start()
        reset.join(30)
        _export.export_part("torch", _sent((), {}), "unused", 0, 1, 1, None)
        after.append(torch.get_num_threads())

    thread = threading.Thread(target=worker_thread)
    thread.start()
    thread.join(30)
    assert after == [default + 1] and _fresh_thread_count() == default


def _jax_loss(params, inputs, targets):
    """Per-example squared error of a linear model (sent to the workers by value, through cloudpickle)."""
    return ((inputs @ params["w"] + params["b"] - targets) ** 2).sum(-1)


def test_jax_export_equals_single_process_export(client, tmp_path):
    pytest.importorskip("jax")
    import cloudpickle

    import tracin.jax

    cloudpickle.register_pickle_by_value(__import__(__name__))  # the workers cannot import this test module
    rng = np.random.default_rng(5)
    ckpts = [
        ({"w": rng.standard_normal((6, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}, lr)
        for lr in (0.2, 0.1)
    ]
    data = (rng.standard_normal((90, 6)).astype(np.float32), rng.standard_normal((90, 3)).astype(np.float32))
    expected = tracin.jax.export_gradients(
        _jax_loss, ckpts, data, store=tmp_path / "one", batch_size=16, progress=False
    )
    found = td.export_gradients(
        "jax", _jax_loss, ckpts, data, store=tmp_path / "many", client=client, shards=4, batch_size=16, progress=False
    )
    _same_store(found, expected)
    x, y = (a.astype(np.float64) for a in data)
    for c, (params, _) in enumerate(ckpts):  # and the rows are the gradients, b then w: 2 r and 2 x r^T
        r = x @ params["w"].astype(np.float64) + params["b"] - y
        exact = np.concatenate([2 * r, (2 * x[:, :, None] * r[:, None, :]).reshape(90, -1)], axis=1)
        got = np.load(Path(found.path) / f"checkpoint_{c:03d}.npy")
        np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)


def _jax_setup(n_rows: int = 90) -> tuple:
    """(two in-memory checkpoints of _jax_loss's linear model, (inputs, targets)), float32; this test
    module pickled by value (the workers cannot import it)."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rng = np.random.default_rng(5)
    ckpts = [
        ({"w": rng.standard_normal((6, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}, lr)
        for lr in (0.2, 0.1)
    ]
    return ckpts, (
        rng.standard_normal((n_rows, 6)).astype(np.float32),
        rng.standard_normal((n_rows, 3)).astype(np.float32),
    )


def test_jax_export_of_a_jitted_loss_equals_single_process_export(client, tmp_path):
    """r245 F2: a jax.jit loss unpickled on a worker lost __wrapped__, was fingerprinted as another
    loss, and every task failed ("the data or checkpoints ... differ")."""
    jax = pytest.importorskip("jax")
    import tracin.jax

    ckpts, data = _jax_setup()
    loss = jax.jit(_jax_loss)
    expected = tracin.jax.export_gradients(loss, ckpts, data, store=tmp_path / "one", batch_size=16, progress=False)
    found = td.export_gradients(
        "jax", loss, ckpts, data, store=tmp_path / "many", client=client, shards=4, batch_size=16, progress=False
    )
    _same_store(found, expected)


def _where() -> str:
    try:
        get_worker()
    except ValueError:
        return "client"
    return "worker"


class _Log:
    """A file path that writes "unpickled on <client or worker>" into the file when it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def __reduce__(self) -> tuple:
        return _unpickled_log, (self.path,)


def _unpickled_log(path: str) -> _Log:
    log = _Log(path)
    log.write(f"unpickled on {_where()}")
    return log


def _tracing_loss(log: _Log):
    """_jax_loss writing "traced on <client or worker>" into `log` each time JAX traces it (a closure:
    pickled by value, a new function object wherever it is unpickled)."""

    def loss(params, inputs, targets):
        log.write(f"traced on {_where()}")
        return _jax_loss(params, inputs, targets)

    return loss


def test_tasks_of_a_jax_export_on_one_worker_unpickle_and_compile_its_loss_once(tmp_path):
    """r245 F1: each task unpickled the loss as a new function object, which tracin.jax's compile
    cache (per loss object) traced and compiled again in every task on the worker. A worker's next
    task with the same bytes reuses the objects unpickled: it unpickles them once, and traces the loss
    as one process exporting again with the same loss object does after its first export."""
    pytest.importorskip("jax")
    import tracin.jax

    ckpts, data = _jax_setup()
    log = _Log(str(tmp_path / "log"))
    loss = _tracing_loss(log)
    first = tracin.jax.export_gradients(loss, ckpts, data, store=tmp_path / "one", batch_size=16, progress=False)
    traced = [len(Path(log.path).read_text().splitlines())]
    tracin.jax.export_gradients(loss, ckpts, data, store=tmp_path / "two", batch_size=16, progress=False)
    traced.append(len(Path(log.path).read_text().splitlines()) - traced[0])
    assert traced[0] > traced[1]  # the first export traces more (what it compiles): the test tells reuse apart
    os.remove(log.path)
    with own_client(n_workers=1) as c, get_task_stream(c) as stream:
        found = td.export_gradients(
            "jax", loss, ckpts, data, store=tmp_path / "many", client=c, shards=4, batch_size=16, progress=False
        )
    _same_store(found, first)
    tasks = sum("export_part" in t["key"] for t in stream.data)
    lines = Path(log.path).read_text().splitlines()
    assert tasks == 4 and lines.count("unpickled on worker") == 1
    assert lines.count("traced on worker") == traced[0] + (tasks - 1) * traced[1]


def test_unpickled_jax_arguments_are_reused_for_equal_bytes_only(monkeypatch):
    """A worker keeps one JAX export's unpickled arguments: equal bytes (the same object or a copy)
    reuse them, other bytes are unpickled (and kept instead); torch's are unpickled per task."""
    unpickled: list[bytes] = []
    unpickle = _export.unpickle_arguments

    def counted(sent: bytes, adapter: str) -> tuple:
        unpickled.append(sent)
        return unpickle(sent, adapter)

    monkeypatch.setattr(_export, "unpickle_arguments", counted)
    monkeypatch.setattr(_export, "_unpickled", [])
    first, other = _sent(([1.0], "a"), {}, "jax"), _sent(([1.0], "b"), {}, "jax")
    got = _export._unpickled_once(first, "jax")
    assert got == ((([1.0], "a")), {}) and len(unpickled) == 1
    _export._release(got)
    assert _export._unpickled_once(first, "jax") is got
    # a task running while another uses them (a worker's second thread) gets its own objects (fr247)
    mine = _export._unpickled_once(bytes(bytearray(first)), "jax")
    assert mine == got and mine is not got and len(unpickled) == 2
    _export._release(mine)
    _export._release(got)
    assert _export._unpickled_once(bytes(bytearray(first)), "jax") is got and len(unpickled) == 2
    _export._release(got)
    found = _export._unpickled_once(other, "jax")
    assert found[0] == ([1.0], "b") and len(unpickled) == 3
    _export._release(found)
    assert _export._unpickled_once(first, "jax") is not got and len(unpickled) == 4
    assert _export._unpickled_once(first, "torch") is not _export._unpickled_once(first, "torch")
    assert len(unpickled) == 6


def test_other_inputs_on_a_jax_worker_name_both_sides_jax_version_and_x64(tmp_path):
    """r245 F3: workers with another jax_enable_x64 unpickle float64 checkpoints as float32: the error
    blamed the files alone. It names both sides' JAX version and jax_enable_x64, and the fix where
    they differ."""
    jax = pytest.importorskip("jax")
    import tracin.jax

    ckpts, data = _jax_setup(32)
    with store_rows(0, 0):  # the store as the client creates it, no row written
        tracin.jax.export_gradients(_jax_loss, ckpts, data, store=tmp_path / "s", batch_size=16, progress=False)
    other = [({k: v + 1 for k, v in params.items()}, lr) for params, lr in ckpts]
    here = f"here jax {jax.__version__} with jax_enable_x64={bool(jax.config.jax_enable_x64)}"
    sent = _sent((_jax_loss, other, data), {"batch_size": 16}, "jax")
    for client_jax, fix in [(("0.0.1", True), True), (_export.jax_settings(), False)]:
        with pytest.raises(ValueError) as raised:
            _export.export_part("jax", sent, str(tmp_path / "s"), 0, 16, None, client_jax)
        message = str(raised.value)
        assert re.search(
            r"^the data or checkpoints as read on worker .* differ from the client's \(checkpoints\[0\] differ", message
        )
        assert message.count(here) == 1
        assert f"on the client jax {client_jax[0]} with jax_enable_x64={client_jax[1]}" in message
        assert message.endswith("; set the same on the workers (JAX_ENABLE_X64 in their environment)") == fix


class _Encoding(UserDict):
    """A Mapping that is no dict, as transformers' BatchEncoding (what a tokenizer returns)."""


def _running_mean_module():
    """tests/torch/_models.py (RunningMean: a forward that updates its buffers in place), imported by
    file and pickled by value: the workers cannot import the test directories."""
    spec = importlib.util.spec_from_file_location(
        "tracin_test_models", Path(__file__).resolve().parent.parent / "torch" / "_models.py"
    )
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module


@pytest.mark.parametrize("kw", [{"batch_size": 8}, {"mode": "factored", "batch_size": 8}])
def test_export_of_mapping_inputs_and_buffers_changed_in_forward_equals_single_process_export(client, tmp_path, kw):
    """BatchEncoding-like inputs (model(**inputs)) and a model whose forward updates its buffers: every
    batch starts from the checkpoint's buffers, so tasks that compute other batches write the same bytes."""
    cloudpickle.register_pickle_by_value(__import__(__name__))  # _Encoding, by value
    torch.manual_seed(1)
    model = _running_mean_module().RunningMean()
    checkpoints = []
    for lr in (0.1, 0.05):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            model.mean.add_(torch.randn(4))
            model.calls.add_(1)  # scales the outputs by 2, then 3
        checkpoints.append(({k: v.clone() for k, v in model.state_dict().items()}, lr))
    x, y = torch.randn(45, 4), torch.randint(0, 3, (45,))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    pair = (_Encoding({"x": x}), y)
    batches = [(_Encoding({"x": x[i : i + 8]}), y[i : i + 8]) for i in range(0, 45, 8)]
    expected = tracin.torch.export_gradients(
        model, checkpoints, pair, loss, store=tmp_path / "one", progress=False, **kw
    )
    stores = {}
    for form, data in (("pair", pair), ("batches", batches)):
        stores[form] = td.export_gradients(
            "torch",
            model,
            checkpoints,
            data,
            loss,
            store=tmp_path / form,
            client=client,
            shards=3,
            num_threads=1,
            progress=False,
            **kw,
        )
        _same_store(stores[form], expected)
    if "mode" not in kw:  # the rows are the gradients at the checkpoint's buffers (float64, by hand)
        for c, (state, _) in enumerate(checkpoints):
            w, b = state["lin.weight"].double().numpy(), state["lin.bias"].double().numpy()
            centred, scale = x.double().numpy() - state["mean"].double().numpy(), 1 + state["calls"].item()
            logits = scale * (centred @ w.T + b)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(45), y.numpy()] -= 1
            exact = np.hstack([(scale * p[:, :, None] * centred[:, None, :]).reshape(45, -1), scale * p])
            got = np.load(Path(stores["pair"].path) / f"checkpoint_{c:03d}.npy")
            np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)


def test_an_argument_warning_is_warned_once_per_call(client, tmp_path):
    """A warning of the export's arguments (an optimizer state with preconditioner=None) is raised by the
    client's first pass, by each task and by the client's finalizing pass: warned once, as by one process
    (it came 3 times: review327 F3)."""
    model, checkpoints, data, loss = _setup(40, 4)
    opt = torch.optim.Adam(model.parameters())
    model(data[0]).sum().backward()
    opt.step()
    with_state = [(c[0], c[1], opt.state_dict()) for c in checkpoints]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        td.export_gradients("torch", model, with_state, data, loss, store=tmp_path / "s", client=client, shards=2)
    assert [str(w.message).startswith("checkpoints[0][2] is an optimizer state") for w in record] == [True], [
        str(w.message)[:120] for w in record
    ]
