"""A distributed export whose workers differ from the client (a store they do not see, data read
otherwise, checkpoints by a path relative to the client's directory), arguments that do not pickle,
and the rows a rerun gives its tasks."""

from __future__ import annotations

import importlib
import io
import os
import re
import shutil
import threading
import tracemalloc
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import cloudpickle
import numpy as np
import pytest
from distributed import get_task_stream, get_worker

torch = pytest.importorskip("torch")

import tracin  # noqa: E402
import tracin.distributed as td  # noqa: E402
import tracin.torch  # noqa: E402
from tracin._export.driver import store_rows  # noqa: E402
from tracin.distributed import _export, _shards  # noqa: E402
from tracin.distributed._export import (  # noqa: E402
    absolute_checkpoints,
    cut,
    export_part,
    pickle_arguments,
    unpickle_arguments,
)
from tracin.distributed._run import Job  # noqa: E402
from tracin.store import StoreChangedError  # noqa: E402

from .conftest import read_on_workers  # noqa: E402
from .test_export import _same_store, _sent, _setup, one_torch_thread  # noqa: E402, F401 (an autouse fixture)

WORKER = r"worker tcp://127\.0\.0\.1:\d+"


def _passes(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _logged(batches: list, log: Path, bump_on_workers: float = 0.0) -> object:
    """Re-iterable batches (a local class: cloudpickled by value) writing a line to `log` per pass,
    wherever it runs; `bump_on_workers` is added to the inputs read on a Dask worker."""

    class Logged:
        def __len__(self) -> int:
            return len(batches)

        def __iter__(self):
            with open(log, "a") as f:
                f.write("pass\n")
            try:
                get_worker()
                bump = bump_on_workers
            except ValueError:  # the client
                bump = 0.0
            for inputs, targets in batches:
                yield inputs + bump, targets

    return Logged()


def _batches(data: tuple, size: int = 10) -> list:
    inputs, targets = data
    return [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]


def _set_rechecks(waits: tuple) -> tuple:
    before, _shards.UNSEEN_RECHECKS_S = _shards.UNSEEN_RECHECKS_S, waits
    return before


@pytest.fixture
def quick_rechecks(client):
    """Workers look again for a store they do not see for 20 ms only (5 s by default)."""
    before = client.run(_set_rechecks, (0.01, 0.01))
    yield
    for worker, waits in before.items():
        client.run(_set_rechecks, waits, workers=[worker])


def test_a_store_that_appears_while_a_worker_looks_again_is_seen(tmp_path, monkeypatch):
    """An NFS client may remember for seconds that a store (or its parents) created since was absent: it
    lists each ancestor up to one it sees, top first, then looks again, and stops once it sees the store."""
    path = tmp_path / "a" / "b" / "s"
    listed: list = []
    waits: list = []

    def listing(*dirs: str) -> None:  # the store appears once listed twice
        listed.append(dirs)
        if len(listed) == 2:
            tracin.GradientStore.create(path, 4, [2], None).close()

    monkeypatch.setattr(_shards, "_list", listing)
    monkeypatch.setattr(_shards.time, "sleep", waits.append)
    _shards.refuse_unseen(str(path))
    assert waits == list(_shards.UNSEEN_RECHECKS_S[:2]) and sum(_shards.UNSEEN_RECHECKS_S) <= 5
    assert listed == [(str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(path))] * 2


def test_a_store_seen_at_once_costs_no_wait_and_one_never_seen_is_refused_after_the_rechecks(tmp_path, monkeypatch):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 4, [2], None).close()
    monkeypatch.setattr(_shards, "time", None)  # no sleep, no listing: time.sleep would fail
    monkeypatch.setattr(_shards, "_list", None)
    _shards.refuse_unseen(str(path))
    monkeypatch.undo()
    monkeypatch.setattr(_shards, "UNSEEN_RECHECKS_S", (0.01, 0.02))
    waits: list = []
    monkeypatch.setattr(_shards.time, "sleep", waits.append)
    with pytest.raises(
        ValueError, match=r"no manifest.json there, though the client found it; looked again for 0\.03 s"
    ):
        _shards.refuse_unseen(str(tmp_path / "absent"))
    assert waits == [0.01, 0.02]


@pytest.mark.parametrize(
    ("missing", "shards", "expected"),
    [
        ([(0, 7), (196, 203)], 1, [(0, 7), (196, 203)]),  # 189 rows between: two tasks, not 203 rows again
        ([(i, i + 1) for i in range(0, 30000, 3)][:4], 1, [(0, 10)]),  # 2 rows between, n_rows // 1000 = 30
        ([(0, 6), (7, 11), (12, 20)], 2, [(0, 6), (7, 11), (12, 20)]),  # joined: over 9 of the 18 missing rows
        ([(0, 10), (20, 21)], 5, [(0, 2), (2, 5), (5, 7), (7, 10), (20, 21)]),
        ([(5, 7)], 5, [(5, 6), (6, 7)]),  # no empty range
        (  # more gaps than shards, one of them most of the work: cut into a task's share each
            [(0, 1200)] + [(20000 + 20 * i, 20005 + 20 * i) for i in range(5)],
            4,
            [(0, 300), (300, 600), (600, 900), (900, 1200), (20000, 20045), (20060, 20065), (20080, 20085)],
        ),
    ],
)
def test_cut_joins_gaps_only_across_few_written_rows(missing, shards, expected):
    assert cut(missing, shards, 30000) == expected


def test_a_task_whose_worker_does_not_see_the_store_fails_at_once_naming_it(client, tmp_path, quick_rechecks):
    """No shared file system: a ValueError naming the worker, before the data is read, and not retried."""
    model, checkpoints, data, loss = _setup(20, 4)
    log = tmp_path / "reads"
    sent = _sent((model, checkpoints, _logged(_batches(data), log), loss), {})
    job = Job(client, "test")
    task = job.submit(export_part, "torch", sent, str(tmp_path / "absent"), 0, 10, 1, None)
    with pytest.raises(ValueError, match=rf"store {tmp_path / 'absent'} is not visible on {WORKER} .*same path"):
        job.wait([task], progress=False)
    assert _passes(log) == 0


def test_a_scoring_task_whose_worker_does_not_see_the_store_names_it(client, tied, tmp_path, quick_rechecks):
    """The client still sees the store (checked again when a task says it does not): the worker's error."""
    shutil.copytree(tied["store"].path, tmp_path / "s")
    store = tracin.GradientStore.open(tmp_path / "s")
    job = Job(client, "test")
    rows = job.rows_of(store)
    (tmp_path / "s").rename(tmp_path / "elsewhere")  # not where the task looks
    task = job.submit(rows.open)
    client.gather([task], errors="skip")  # until it has failed
    (tmp_path / "elsewhere").rename(tmp_path / "s")  # where the client looks again
    with pytest.raises(_shards.StoreNotVisible, match=rf"store {tmp_path / 's'} is not visible on {WORKER}"):
        job.wait([task], progress=False)


def test_a_store_removed_during_a_call_is_the_local_error(client, tied, tmp_path, quick_rechecks):
    """A task that does not see a store the client no longer sees either: the StoreChangedError of
    tracin's own functions, not advice on sharing the file system."""
    shutil.copytree(tied["store"].path, tmp_path / "s")
    store = tracin.GradientStore.open(tmp_path / "s")
    job = Job(client, "test")
    rows = job.rows_of(store)  # checked on the client
    shutil.rmtree(tmp_path / "s")
    task = job.submit(rows.open)
    with pytest.raises(StoreChangedError, match=rf"store {tmp_path / 's'} was removed after it was opened"):
        job.wait([task], progress=False)


def test_data_read_otherwise_on_a_worker_is_named(client, tmp_path):
    model, checkpoints, data, loss = _setup(20, 4)
    differs = _logged(_batches(data), tmp_path / "reads", bump_on_workers=1.0)
    with pytest.raises(
        ValueError,
        match=rf"data or checkpoints as read on {WORKER} differ from the client's \(the data .*\): every worker "
        "must read identical data and checkpoint files$",
    ):
        td.export_gradients("torch", model, checkpoints, differs, loss, store=tmp_path / "s", client=client, shards=2)


def test_arguments_that_do_not_pickle_are_named_before_anything_is_read(client, tmp_path):
    model, checkpoints, data, loss = _setup(20, 4)
    log = tmp_path / "reads"
    batches = _logged(_batches(data), log)
    batches.lock = threading.Lock()
    with pytest.raises(
        TypeError, match=r"^args\[2\] \(data\) cannot be pickled \(.*_thread\.lock.*\): .* to the workers.*pass data"
    ):
        td.export_gradients("torch", model, checkpoints, batches, loss, store=tmp_path / "s", client=client)
    with pytest.raises(TypeError, match=r"^kwargs\['loss_fn'\] cannot be pickled .*; pass a loss_fn that pickles"):
        td.export_gradients(
            "torch", model, checkpoints, _batches(data), loss_fn=batches, store=tmp_path / "s", client=client
        )
    assert _passes(log) == 0 and not (tmp_path / "s").exists()


def test_an_unpicklable_loss_or_model_is_named_with_advice_about_it():
    """r245 F4: a JAX loss closing over a lock was "args[0]", with advice about data only."""
    lock = threading.Lock()

    def loss(params, inputs, targets):
        with lock:
            return inputs

    for adapter, args, named in [
        ("jax", (loss, [], []), r"args\[0\] \(loss_fn\)"),
        ("torch", (lock, [], [], loss), r"args\[0\] \(model\)"),
        ("torch", (torch.nn.Linear(1, 1), [], [], loss), r"args\[3\] \(loss_fn\)"),
    ]:
        advice = "loss_fn" if "loss_fn" in named else "model"
        with pytest.raises(
            TypeError, match=rf"^{named} cannot be pickled \(.*lock.*\): .*; pass a {advice} that pickles"
        ):
            pickle_arguments((args, {}), io.BytesIO(), adapter)


def test_relative_checkpoint_paths_are_found_by_workers_in_other_directories(client, tmp_path, monkeypatch):
    model, checkpoints, data, loss = _setup(30, 4)
    for c, (state, _) in enumerate(checkpoints):
        torch.save(state, tmp_path / f"m{c}.pt")
    files = [(f"m{c}.pt", lr) for c, (_, lr) in enumerate(checkpoints)]
    absolute = [(str(tmp_path / name), lr) for name, lr in files]
    expected = tracin.torch.export_gradients(model, absolute, data, loss, store=tmp_path / "one", progress=False)
    monkeypatch.chdir(tmp_path)
    before = client.run(os.getcwd)
    client.run(os.chdir, "/")  # workers started in another directory than the client
    try:
        found = td.export_gradients("torch", model, files, data, loss, store="many", client=client, progress=False)
    finally:
        for worker, cwd in before.items():
            client.run(os.chdir, cwd, workers=[worker])
    _same_store(found, expected)


def test_absolute_checkpoints_resolves_sources_and_optimizer_states_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state, opt = {"w": 1}, {"state": {}}
    given = [("a.pt", 0.1), (Path("b.pt"), 0.2, "opt.pt"), (state, 0.3, opt), [Path("c"), "0.4"]]
    expected = [
        (str(tmp_path / "a.pt"), 0.1),
        (str(tmp_path / "b.pt"), 0.2, str(tmp_path / "opt.pt")),
        (state, 0.3, opt),
        [str(tmp_path / "c"), "0.4"],  # a learning rate is never a path; its validation is the adapter's
    ]
    args, kwargs = absolute_checkpoints(("model", given, "data"), {"mode": "full"})
    assert args == ("model", expected, "data") and kwargs == {"mode": "full"}
    assert absolute_checkpoints(("loss",), {"checkpoints": given})[1] == {"checkpoints": expected}
    assert absolute_checkpoints(("model", "ckpt.pt"), {}) == (("model", "ckpt.pt"), {})  # the adapter refuses it


class _Entry(NamedTuple):
    source: Any
    lr: float


def test_absolute_checkpoints_keeps_named_tuple_entries(tmp_path, monkeypatch):
    """Entries (and a list of them) of a NamedTuple type, which the adapters take, keep their type."""
    monkeypatch.chdir(tmp_path)
    state = {"w": 1}
    args, _ = absolute_checkpoints(("model", [_Entry("a.pt", 0.1), _Entry(state, 0.2)]), {})
    assert args[1] == [_Entry(str(tmp_path / "a.pt"), 0.1), _Entry(state, 0.2)]
    assert all(type(entry) is _Entry for entry in args[1]) and args[1][1].source is state


def test_named_tuple_checkpoint_entries_export_as_on_one_machine(client, tmp_path, monkeypatch):
    model, checkpoints, data, loss = _setup(20, 4)
    monkeypatch.chdir(tmp_path)
    for c, (state, _) in enumerate(checkpoints):
        torch.save(state, tmp_path / f"m{c}.pt")
    entries = [_Entry(f"m{c}.pt", lr) for c, (_, lr) in enumerate(checkpoints)]
    expected = tracin.torch.export_gradients(model, entries, data, loss, store="one", progress=False)
    _same_store(td.export_gradients("torch", model, entries, data, loss, store="many", client=client), expected)


def _submitted(monkeypatch) -> list:
    """(start, stop) of each export task submitted from now on."""
    found: list = []
    submit = Job.submit

    def recorded(job, fn, *args, **kw):
        if kw.get("label"):
            found.append(tuple(map(int, re.match(r"rows \[(\d+), (\d+)\)", kw["label"]).groups())))
        return submit(job, fn, *args, **kw)

    monkeypatch.setattr(Job, "submit", recorded)
    return found


def test_rerun_on_a_finished_store_runs_no_task_and_reads_the_data_once(client, tmp_path, monkeypatch):
    model, checkpoints, data, loss = _setup(40, 4)
    log = tmp_path / "reads"
    logged = _logged(_batches(data), log)
    first = td.export_gradients(
        "torch", model, checkpoints, logged, loss, store=tmp_path / "s", client=client, shards=4
    )
    before, tasks = _passes(log), _submitted(monkeypatch)
    again = td.export_gradients(
        "torch", model, checkpoints, logged, loss, store=tmp_path / "s", client=client, shards=4
    )
    assert tasks == [] and _passes(log) - before == 1  # the client's check of its fingerprint, as on one machine
    assert again.complete and again.path == first.path


def _ranges_written(tmp_path: Path, setup: tuple, ranges: list[tuple[int, int]], **kw) -> tuple:
    """(a single-process export of `setup` into tmp_path/'one', a store at tmp_path/'many' holding only
    the rows of `ranges`, each written as a range task that finished it leaves them, unfinalized)."""
    model, checkpoints, data, loss = setup
    expected = tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "one", **kw)
    store = tmp_path / "many"
    for a, b in [(0, 0), *ranges]:  # (0, 0): creates the store without rows
        with store_rows(a, b):
            tracin.torch.export_gradients(model, checkpoints, data, loss, store=store, **kw)
    return expected, store


def test_rerun_of_an_interrupted_export_gives_tasks_only_the_missing_rows(client, tmp_path, monkeypatch):
    model, checkpoints, data, loss = setup = _setup(150, 8)
    kw = {"batch_size": 10, "progress": False}
    expected, store = _ranges_written(tmp_path, setup, [(25, 80)], **kw)  # an interrupted export's finished task
    tasks = _submitted(monkeypatch)
    with get_task_stream(client) as stream:
        found = td.export_gradients("torch", model, checkpoints, data, loss, store=store, client=client, shards=3, **kw)
    rows = sorted(r for a, b in tasks for r in range(a, b))
    assert rows == [*range(25), *range(80, 150)]  # each missing row once, no written one
    # 95 rows in 3 parts: a gap each, the longest split at a batch edge (115 -> 110, the nearer below)
    assert tasks == [(0, 25), (80, 110), (110, 150)]
    assert sum("export_part" in t["key"] for t in stream.data) == 3
    _same_store(found, expected)


def test_rerun_with_every_row_written_but_not_finalized_runs_no_task(client, tmp_path, monkeypatch):
    model, checkpoints, data, loss = setup = _setup(30, 4)
    kw = {"batch_size": 10, "progress": False}
    expected, store = _ranges_written(tmp_path, setup, [(0, 12), (12, 30)], **kw)
    tasks = _submitted(monkeypatch)
    found = td.export_gradients("torch", model, checkpoints, data, loss, store=store, client=client, **kw)
    assert tasks == []
    _same_store(found, expected)


class _Interrupted(Exception):
    pass


class _Stopping:
    """Re-iterable batches raising _Interrupted once `budget` batches have been read (over all passes)."""

    def __init__(self, batches: list, budget: int):
        self.batches, self.budget = batches, budget

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if self.budget == 0:
                raise _Interrupted
            self.budget -= 1
            yield batch


@pytest.mark.parametrize(
    ("shards", "expected"),
    [
        (4, [(10, 40), (60, 80), (110, 120), (130, 160)]),
        # in its 10-row batches: 9 missing, (10, 80) holds 5, half; 2 batches lie between, no more than a gap's
        (2, [(10, 80), (110, 160)]),
        # at most 2 batches each, cut on batch edges (a batch split between two tasks would be computed twice)
        (6, [(10, 20), (20, 40), (60, 80), (110, 120), (130, 140), (140, 160)]),
    ],
)
def test_rerun_of_an_interrupted_export_cuts_at_its_gaps(client, tmp_path, monkeypatch, shards, expected):
    """Each of an interrupted export's 4 range tasks wrote its rows at the first checkpoint, then only
    some at the second: the rerun gives each gap to a task (shards=4), packs neighbouring gaps into one
    task where few batches lie between (shards=2: those rows are written again) or splits the longest
    on its batch edges (shards=6)."""
    model, checkpoints, data, loss = _setup(160, 6)
    batches = _batches(data)
    expected_store = tracin.torch.export_gradients(model, checkpoints, batches, loss, store=tmp_path / "one")
    store = tmp_path / "many"
    with store_rows(0, 0):
        tracin.torch.export_gradients(model, checkpoints, batches, loss, store=store)
    for i, a in enumerate(range(0, 160, 40)):  # a read-through and a first pass of 16 batches, then a few
        with store_rows(a, a + 40), pytest.raises(_Interrupted):
            tracin.torch.export_gradients(
                model, checkpoints, _Stopping(batches, 32 + a // 10 + 1 + i % 3), loss, store=store
            )
    log = tmp_path / "reads"
    tasks = _submitted(monkeypatch)
    with get_task_stream(client) as stream:
        found = td.export_gradients(
            "torch", model, checkpoints, _logged(batches, log), loss, store=store, client=client, shards=shards
        )
    assert tasks == expected
    assert sum("export_part" in t["key"] for t in stream.data) == len(expected)
    # the client reads the data twice (its check, the finalizing), a task twice (its check, the second checkpoint)
    assert _passes(log) == 2 + 2 * len(expected)
    _same_store(found, expected_store)


class _Heavy:
    """A per-example loss that also holds 32 MB."""

    def __init__(self, loss: Any):
        self.loss, self.table = loss, np.ones(8_000_000, np.float32)

    def __call__(self, outputs: Any, targets: Any) -> Any:
        return self.loss(outputs, targets)


def test_a_temporary_file_that_cannot_be_written_is_an_oserror_not_an_unpicklable_argument(tmp_path):
    # a full disk in TMPDIR: the arguments pickle fine, the file does not take them
    class Full:
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write the pickled args and kwargs .*No space left.*TMPDIR"):
        pickle_arguments(((np.zeros(1000), "loss"), {"store": str(tmp_path)}), Full(), "torch")


def test_arguments_are_pickled_once_before_the_pass_and_their_bytes_not_kept(client, tmp_path, monkeypatch):
    """Pickled once (into a temporary file), before the client's pass: no bytes (32 MB here) in memory
    during it, and no second pickle."""
    model, checkpoints, data, loss = _setup(20, 4)
    heavy = _Heavy(loss)
    held: list[int] = []
    export = tracin.torch.export_gradients

    def recorded(*args, **kw):
        held.append(tracemalloc.get_traced_memory()[0])
        return export(*args, **kw)

    monkeypatch.setattr(tracin.torch, "export_gradients", recorded)
    dumped: list = []
    dump = cloudpickle.CloudPickler.dump
    monkeypatch.setattr(cloudpickle.CloudPickler, "dump", lambda self, obj: dumped.append(obj) or dump(self, obj))
    tracemalloc.start()
    try:
        td.export_gradients("torch", model, checkpoints, data, heavy, store=tmp_path / "s", client=client)
        assert held[0] < 8 * 2**20  # traced since the call began: 32 MB if the pickled arguments were kept
    finally:
        tracemalloc.stop()
    assert sum(obj is heavy for obj in dumped) == 1


def test_data_that_stops_pickling_once_read_travels_as_given(client, tmp_path):
    """Data that keeps an open file after a pass (a lazy-open Dataset) is sent as it was before the client's
    pass, and the store equals a single-process export's."""
    model, checkpoints, data, loss = _setup(20, 4)

    class _Lazy:
        def __init__(self, batches: list):
            self.batches, self.file = batches, None

        def __len__(self) -> int:
            return len(self.batches)

        def __iter__(self):
            if self.file is None:
                self.file = open(os.devnull, "rb")  # kept for later passes: cannot be pickled
            return iter(self.batches)

    lazy = _Lazy(_batches(data))
    try:
        found = td.export_gradients("torch", model, checkpoints, lazy, loss, store=tmp_path / "s", client=client)
    finally:
        if lazy.file is not None:
            lazy.file.close()
    expected = tracin.torch.export_gradients(model, checkpoints, _batches(data), loss, store=tmp_path / "one")
    _same_store(found, expected)


def _client_only_module(tmp_path: Path, monkeypatch) -> Any:
    """A module (a per-example loss class) that the client imports from a folder on its own sys.path
    only, as a project's model.py not installed on the workers: cloudpickled by reference."""
    name = f"tracin_client_only_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        "import torch\n\n\nclass Loss(torch.nn.Module):\n"
        "    def forward(self, outputs, targets):\n"
        "        return torch.nn.functional.cross_entropy(outputs, targets, reduction='none')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module(name)


def test_an_argument_whose_module_only_the_client_imports_is_named(client, tmp_path, monkeypatch):
    """Review110 F2: not a bare ModuleNotFoundError (which the client cannot reproduce): the argument, the
    worker, the error and the fix, for a positional argument (its parameter's name too) and a keyword one."""
    model, checkpoints, data, _ = _setup(20, 4)
    module = _client_only_module(tmp_path, monkeypatch)
    missing = rf"\(ModuleNotFoundError: No module named '{module.__name__}'\): the workers must import the modules"
    with pytest.raises(ValueError, match=rf"^args\[3\] \(loss_fn\) cannot be unpickled on {WORKER} {missing}") as e:
        td.export_gradients("torch", model, checkpoints, data, module.Loss(), store=tmp_path / "s", client=client)
    assert "client.upload_file" in str(e.value)
    with pytest.raises(ValueError, match=rf"^kwargs\['loss_fn'\] cannot be unpickled on {WORKER} {missing}"):
        td.export_gradients(
            "torch", model, checkpoints, data, loss_fn=module.Loss(), store=tmp_path / "k", client=client
        )


def test_arguments_sharing_an_object_share_it_once_unpickled():
    """Each argument is a pickle of its own (a failing one is named), through one memo: what two arguments
    share is one object on the worker too, as when (args, kwargs) was one pickle."""
    shared = torch.nn.Linear(2, 2)
    args, kwargs = unpickle_arguments(_sent((shared, [shared], {"m": shared}), {"loss_fn": (shared,)}), "torch")
    assert isinstance(args[0], torch.nn.Linear) and args[1][0] is args[0] and args[2]["m"] is args[0]
    assert list(kwargs) == ["loss_fn"] and kwargs["loss_fn"][0] is args[0]
    assert torch.equal(args[0].weight, shared.weight)


def test_an_error_of_the_data_on_a_worker_names_the_worker_rows_and_store(client, tmp_path):
    """Review110 F3: the data's own exception, as it is (type and message), with a note naming the worker,
    the rows, the store, and what differs when the same export works on the client."""
    model, checkpoints, data, loss = _setup(20, 4)
    error = KeyError("sample 0")

    def fail() -> None:
        raise error

    local = read_on_workers(_batches(data), fail)
    store = tmp_path / "s"
    with pytest.raises(KeyError) as e:
        td.export_gradients("torch", model, checkpoints, local, loss, store=store, client=client, shards=1)
    assert type(e.value) is KeyError and e.value.args == ("sample 0",)
    notes = getattr(e.value, "__notes__", [])
    assert len(notes) == 1, notes
    assert re.fullmatch(
        rf"tracin\.distributed export \(torch\): raised on {WORKER} while exporting rows \[0, 20\) into the "
        rf"gradient store {re.escape(str(store))} \(reading the data, running the model and the loss there\)\. "
        r"Does the same export work in one process on the client\? Then the workers must read the same data.*",
        notes[0],
    )
    expected = tracin.torch.export_gradients(model, checkpoints, local, loss, store=tmp_path / "one", progress=False)
    assert expected.n_rows == 20  # the same export works in one process


class _BeforeNotes(RuntimeError):
    """A RuntimeError as Python 3.10 raises it: without add_note."""

    def __getattribute__(self, name: str):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_a_tasks_note_before_python_3_11_travels_in_notes_and_is_printed(capsys):
    e = _BeforeNotes("cannot read /data/x.bin")
    _export._noted_here(e, "first")
    _export._noted_here(e, "second")
    assert e.__notes__ == ["first", "second"]
    _export._print_task_notes(e)
    assert capsys.readouterr().err == "first\nsecond\n"
    plain = RuntimeError("x")
    plain.add_note("shown by Python itself")
    _export._print_task_notes(plain)
    assert capsys.readouterr().err == ""


class _Frozen(RuntimeError):
    """An exception that refuses new attributes (its notes among them)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "__traceback__":
            raise AttributeError(f"frozen: cannot set {name}")
        super().__setattr__(name, value)


def test_an_exception_that_takes_no_note_stays_the_users_error():
    """Review113 F1: add_note's own AttributeError must not replace the user's exception."""
    e = _Frozen("cannot read /data/x.bin")
    _export._noted_here(e, "a note")
    assert not getattr(e, "__notes__", None)


class _Reopened:
    """An argument that opens its file again when unpickled (a memory map, an h5py handle)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "rb"))


def test_an_argument_failing_to_unpickle_for_another_reason_gets_no_module_advice(tmp_path):
    """Review113 F2: install-the-modules advice only for a module or a name the worker lacks."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"x")
    sent = _sent((1, 2, _Reopened(str(path))), {})
    path.unlink()
    with pytest.raises(ValueError, match=r"^args\[2\] \(data\) cannot be unpickled on .*\(FileNotFoundError: ") as e:
        unpickle_arguments(sent, "torch")
    assert "install" not in str(e.value) and "upload_file" not in str(e.value)
