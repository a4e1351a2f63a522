"""Clusters whose workers join after a call began (dask-jobqueue's queued jobs, cluster.adapt(minimum=0)):
kernel threads decided on the worker when its task runs, default shards and export ranges cut for the
cluster's size rather than for the workers present at the call's start (review149 F1-F4)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

import tracin
import tracin.distributed as td
from tracin.distributed import _api, _export, _shards
from tracin.distributed._export import cut
from tracin.distributed._shards import MIN_SHARD_BYTES, shard_ranges

from .conftest import write_store

CORES = len(os.sched_getaffinity(0))  # the workers are this process's children: the same cores


@contextmanager
def empty_cluster() -> Iterator[tuple[LocalCluster, Client]]:
    """A LocalCluster with no workers yet (single-threaded ones when scaled) and its client."""
    with (
        LocalCluster(
            n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield cluster, c


def recording_threads() -> WorkerPlugin:
    """A plugin recording, on each worker (joined later too), the kernel threads each task decides on
    (in dask_worker.tracin_threads). A local class: cloudpickled by value."""

    class Recording(WorkerPlugin):
        name = "tracin-test-record-threads"

        def setup(self, worker) -> None:
            from tracin.distributed import _tasks

            worker.tracin_threads = []
            decide = _tasks.kernel_threads

            def recorded(*args):
                n = decide(*args)
                worker.tracin_threads.append(n)
                return n

            _tasks.kernel_threads = recorded

    return Recording()


def test_kernel_threads_count_workers_that_joined_after_the_call_began(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    train = rng.standard_normal((64, 8)).astype(np.float32)
    store = write_store(tmp_path / "s", [train], [0.5])
    seen = []
    with empty_cluster() as (cluster, c):
        c.register_plugin(recording_threads())
        real = _api.slots_by_host

        def then_two_workers(*args, **kwargs):  # no workers at the call's start; two before its tasks run
            seen.append(real(*args, **kwargs))
            cluster.scale(2)
            c.wait_for_workers(2)
            return seen[-1]

        monkeypatch.setattr(_api, "slots_by_host", then_two_workers)
        got = td.self_influence(store, client=c, shards=4)
        threads = [n for each in c.run(lambda dask_worker: dask_worker.tracin_threads).values() for n in each]
    assert seen == [{}]
    assert sorted(threads) == [max(1, CORES // 2)] * 4  # two single-threaded workers share the host's cores
    np.testing.assert_allclose(got, 0.5 * (train.astype(np.float64) ** 2).sum(1), rtol=1e-6)


def test_default_shards_without_workers_are_cut_by_size():
    n_rows, row_bytes = 400_000, 1024  # ~390 MiB
    ranges = shard_ranges(n_rows, row_bytes, 0, None)
    per = MIN_SHARD_BYTES // row_bytes
    assert ranges == [(a, min(a + per, n_rows)) for a in range(0, n_rows, per)]
    assert len(ranges) == 25
    assert shard_ranges(n_rows, row_bytes, 1, None)[0] == (0, n_rows // 2)  # one slot known: guided, as before


def test_default_shards_are_cut_for_the_workers_an_adaptive_cluster_may_start(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    train = rng.standard_normal((400, 16)).astype(np.float32)  # 64 bytes a row
    store = write_store(tmp_path / "s", [train], [1.0])
    monkeypatch.setattr(_shards, "MIN_SHARD_BYTES", 64)  # a shard of one row at least, not 16 MiB
    cuts: list = []
    real = _api.shard_ranges
    monkeypatch.setattr(_api, "shard_ranges", lambda *args: cuts.append(real(*args)) or cuts[-1])
    with empty_cluster() as (cluster, c):
        cluster.scale(1)
        c.wait_for_workers(1)
        cluster.adapt(minimum=1, maximum=8)
        got = td.self_influence(store, client=c)
    (ranges,) = cuts
    assert ranges[0] == (0, 25)  # guided for 8 slots (400 / 16), not for the one worker there (200 rows)
    assert ranges[-1][1] == 400
    np.testing.assert_allclose(got, (train.astype(np.float64) ** 2).sum(1), rtol=1e-6)


def _export_setup(n_rows: int) -> tuple:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    data = (torch.randn(n_rows, 6), torch.randint(0, 3, (n_rows,)))
    return model, checkpoints, data, torch.nn.CrossEntropyLoss(reduction="none")


def _recording_cut(monkeypatch) -> list:
    cuts: list = []
    real = _export.cut
    monkeypatch.setattr(_export, "cut", lambda *args: cuts.append(real(*args)) or cuts[-1])
    return cuts


def test_export_on_an_adaptive_cluster_from_zero_cuts_for_its_maximum(tmp_path, monkeypatch):
    cuts = _recording_cut(monkeypatch)
    with empty_cluster() as (cluster, c):
        cluster.adapt(minimum=0, maximum=2)
        store = td.export_gradients("torch", *_export_setup(64), store=tmp_path / "s", client=c, batch_size=16)
    assert cuts == [[(0, 32), (32, 64)]]  # two ranges for the two workers it may start, not one for the first
    assert store.complete and store.n_rows == 64


def test_export_heads_for_the_workers_asked_for(tmp_path, monkeypatch):
    from tracin.distributed._cluster import planned_slots

    with empty_cluster() as (cluster, c):
        cluster.scale(3)
        assert planned_slots(c, {}) == 3  # none there yet: the three asked for
        c.wait_for_workers(3)
        assert planned_slots(c, {"127.0.0.1": 3}) == 3
        cluster.adapt(minimum=0, maximum=5)
        assert planned_slots(c, {"127.0.0.1": 3}) >= 5


def test_export_ranges_follow_batches(tmp_path, monkeypatch, client):
    cuts = _recording_cut(monkeypatch)
    store = td.export_gradients(
        "torch", *_export_setup(100), store=tmp_path / "s", client=client, shards=1000, batch_size=16
    )
    assert cuts == [[(a, min(a + 16, 100)) for a in range(0, 100, 16)]]  # a task per batch (7), not 100
    assert store.complete and store.n_rows == 100


def test_export_ranges_follow_a_data_loaders_batches(tmp_path, monkeypatch, client):
    """No batch_size=: the edges are those of the DataLoader's batches, which the client's first pass
    records (not one range per row, cutting batches that two tasks would both compute)."""
    cuts = _recording_cut(monkeypatch)
    model, checkpoints, (x, y), loss = _export_setup(100)
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)
    store = td.export_gradients(
        "torch", model, checkpoints, loader, loss, store=tmp_path / "s", client=client, shards=3
    )
    assert cuts == [[(0, 24), (24, 72), (72, 100)]]  # 5 batches (24, 24, 24, 24, 4) in 3 ranges on their edges
    assert store.complete and store.n_rows == 100


@pytest.mark.parametrize("seed", range(20))
def test_cut_on_uneven_batch_edges(seed):
    """Batches of varied sizes: each range's ends on batch or gap edges, the missing rows all covered,
    no batch split between two ranges, no more ranges than shards or than the batches touched."""
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(1, 400))
    starts = sorted({0, *rng.integers(0, n_rows, int(rng.integers(0, 30))).tolist()})
    edges = [*starts, n_rows]
    marks = sorted(set(rng.integers(0, n_rows + 1, 2 * int(rng.integers(1, 5))).tolist()))
    missing = [(a, b) for a, b in zip(marks[::2], marks[1::2], strict=False) if b > a] or [(0, n_rows)]
    shards = int(rng.integers(1, 12))
    ranges = cut(missing, shards, n_rows, starts)
    batch = {r: i for i in range(len(starts)) for r in range(edges[i], edges[i + 1])}
    touched = {batch[r] for a, b in missing for r in range(a, b)}
    assert len(ranges) <= len(touched)
    covered = [r for a, b in ranges for r in range(a, b)]
    assert len(covered) == len(set(covered))  # disjoint
    assert {r for a, b in missing for r in range(a, b)} <= set(covered)
    assert {batch[r] for r in covered} == touched
    owner = {}
    for i, (a, b) in enumerate(ranges):
        for r in range(a, b):
            assert owner.setdefault(batch[r], i) == i  # a batch's missing rows in one range
    gap_edges = {x for gap in missing for x in gap}
    assert all(x in edges or x in gap_edges for r in ranges for x in r)


@pytest.mark.parametrize(
    ("sizes", "shards", "expected"),
    [
        ([1] * 50 + [50], 2, [(0, 50), (50, 100)]),  # 50 batches each side: (0, 25), (25, 100) in batches
        ([64] * 10 + [8] * 80, 4, [(0, 320), (320, 640), (640, 960), (960, 1280)]),  # 736 rows first in batches
        ([7, 33, 1, 49, 10], 3, [(0, 40), (40, 90), (90, 100)]),  # the edges nearest rows 33 and 67
    ],
)
def test_cut_shares_uneven_batches_out_by_rows(sizes, shards, expected):
    """A gap's parts hold near-equal rows (up to a batch), not near-equal batch counts."""
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    assert cut([(0, sum(sizes))], shards, sum(sizes), starts) == expected


@pytest.mark.parametrize(
    "missing, shards, batch, expected",
    [
        ([(0, 3000)], 10_000, 256, [(a, min(a + 256, 3000)) for a in range(0, 3000, 256)]),
        ([(0, 3000)], 2, 256, [(0, 1536), (1536, 3000)]),  # 12 batches in 2 parts
        ([(0, 100)], 3, 10, [(0, 30), (30, 70), (70, 100)]),  # 10 batches in 3 parts, by rows 33 and 67
        ([(5, 25), (40, 47)], 8, 10, [(5, 10), (10, 20), (20, 25), (40, 47)]),  # 4 batches touched
        ([(0, 10)], 4, 1, [(0, 2), (2, 5), (5, 7), (7, 10)]),  # batch not given: by rows, as before
        # batch [20, 30) holds rows of two gaps: one task computes it, writing rows 25-27 again (the same bytes)
        ([(0, 25), (28, 50), (90, 95)], 8, 10, [(0, 10), (10, 20), (20, 30), (30, 40), (40, 50), (90, 95)]),
    ],
)
def test_cut_on_batch_edges(missing, shards, batch, expected):
    ranges = cut(missing, shards, 3000, range(0, 3000, batch))
    assert ranges == expected
    assert all(b <= c for (_, b), (c, _) in zip(ranges[:-1], ranges[1:], strict=True))  # disjoint, in order
    covered = {r for a, b in ranges for r in range(a, b)}
    wanted = {r for a, b in missing for r in range(a, b)}
    assert wanted <= covered and all(r // batch in {w // batch for w in wanted} for r in covered - wanted)
    gap_edges = {x for gap in missing for x in gap}
    assert all(x % batch == 0 or x in gap_edges for r in ranges for x in r)  # on batch or gap edges


def test_aggregate_warns_when_shards_exceed_the_test_store_chunks(floats, client):
    train = tracin.Gradients(floats["train"], floats["weights"])  # in memory: the test store is the side cut
    with pytest.warns(
        UserWarning, match=r"shards=8, but the test store .* has 6 row chunk\(s\) \(up to 7 rows each\)"
    ) as w:
        got = td.aggregate(floats["test_store"], train, client=client, shards=8)  # 40 rows, 7-row chunks
    assert {r.filename for r in w} == {__file__}  # the user's line, not tracin's (review327 F1)
    np.testing.assert_allclose(got, floats["scores"].sum(0), rtol=1e-5, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td.aggregate(floats["test_store"], train, client=client, shards=6)
    whole = tracin.GradientStore.open(floats["test_store"].path)  # one row chunk, its bound beyond the 40 rows
    assert whole.row_chunks() > 40
    with pytest.warns(UserWarning, match=r"has 1 row chunk\(s\) \(up to 40 rows each\)"):  # review175 F2
        got = td.aggregate(whole, train, client=client, shards=3)
    np.testing.assert_allclose(got, floats["scores"].sum(0), rtol=1e-5, atol=1e-4)
    with warnings.catch_warnings():  # no finer cut to advise: an empty or a one-row test store
        warnings.simplefilter("error")
        for rows in (slice(3, 3), slice(3, 4)):
            got = td.aggregate(whole[rows], train, client=client, shards=3)
            np.testing.assert_allclose(got, floats["scores"][rows].sum(0), rtol=1e-5, atol=1e-4)


def test_a_scheduler_that_does_not_answer_is_asked_once_per_retry_period(monkeypatch):
    """host_slots where the scheduler's ncores times out: the last count (not the worker's own threads,
    which would give a single-threaded worker all its host's cores), kept HOST_SLOTS_RETRY_S, so that
    the tasks after the first do not wait SCHEDULER_ASK_S each."""
    from types import SimpleNamespace

    from tracin.distributed import _cluster

    asked, answers = [], [{"tcp://10.0.0.1:1": 1, "tcp://10.0.0.1:2": 1, "tcp://10.0.0.2:1": 1}]

    def fake_sync(loop, fn, callback_timeout):
        asked.append(callback_timeout)
        if answers:
            return answers.pop()
        raise TimeoutError

    clock = [1000.0]
    monkeypatch.setattr(_cluster, "sync", fake_sync)
    monkeypatch.setattr(_cluster.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(_cluster, "_host_slots", {})
    state, scheduler = SimpleNamespace(nthreads=1), SimpleNamespace(ncores=None)
    worker = SimpleNamespace(address="tcp://10.0.0.1:1", state=state, loop=None, scheduler=scheduler)
    assert _cluster.host_slots(worker) == 2  # the two workers on 10.0.0.1
    clock[0] += _cluster.HOST_SLOTS_TTL_S
    assert _cluster.host_slots(worker) == 2  # asked again, no answer: the last count
    assert len(asked) == 2
    clock[0] += _cluster.HOST_SLOTS_RETRY_S - 1
    assert _cluster.host_slots(worker) == 2 and len(asked) == 2  # not asked again before the retry period
    clock[0] += 1
    assert _cluster.host_slots(worker) == 2 and len(asked) == 3
    monkeypatch.setattr(_cluster, "_host_slots", {})
    assert _cluster.host_slots(worker) == 1  # never answered: the worker's own threads


def test_host_slots_are_at_least_the_worker_own_threads(monkeypatch):
    """A scheduler whose record does not list this worker's host yet (or under another name) gives no count
    of 0 slots (kernel_threads divides the cores by it): the worker's own threads at least."""
    from types import SimpleNamespace

    from tracin.distributed import _cluster

    monkeypatch.setattr(_cluster, "sync", lambda loop, fn, callback_timeout: {"tcp://10.0.0.2:1": 4})
    monkeypatch.setattr(_cluster, "_host_slots", {})
    threads, scheduler = SimpleNamespace(nthreads=2), SimpleNamespace(ncores=None)
    worker = SimpleNamespace(address="tcp://10.0.0.1:1", state=threads, loop=None, scheduler=scheduler)
    assert _cluster.host_slots(worker) == 2
    monkeypatch.setattr(_cluster, "get_worker", lambda: worker)
    monkeypatch.setattr(_cluster, "usable_cores", lambda: 8)
    assert _cluster.kernel_threads(None) == 4
