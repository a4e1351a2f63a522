"""Bad arguments: clear errors naming the argument, raised before any cluster is started."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

import tracin
import tracin.distributed as td
from tracin.distributed._cluster import kernel_threads, slots_by_host
from tracin.distributed._shards import shard_ranges


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"side": "best"}, ValueError, "side must be"),
        ({"shards": 0}, ValueError, "shards must be a positive integer"),
        ({"shards": 2.5}, TypeError, "shards must be a positive integer"),
        ({"num_threads": -1}, ValueError, "num_threads must be a positive integer"),
        ({"progress": "yes"}, TypeError, "progress must be True, False or None"),
        ({"client": "tcp://127.0.0.1:8786"}, TypeError, "client must be a distributed.Client"),
        ({"device": "cuda"}, ValueError, "device: tracin.distributed runs the C.. CPU kernel .* got 'cuda'"),
        ({"device": 0}, TypeError, "device must be a str or None"),
        ({"precision": "tf32"}, ValueError, "precision: the CPU kernel .* float32, got 'tf32'"),
        ({"precision": "fp8"}, ValueError, "precision must be 'float32' or 'tf32'"),
        ({"worker_timeout": 0}, ValueError, "worker_timeout must be a finite number of seconds > 0, or None"),
        ({"worker_timeout": float("inf")}, ValueError, "worker_timeout must be a finite number of seconds > 0"),
        ({"worker_timeout": float("nan")}, ValueError, "worker_timeout must be a finite number of seconds > 0"),
        ({"worker_timeout": "60"}, TypeError, "worker_timeout must be a number of seconds or None, got '60'"),
        ({"worker_timeout": True}, TypeError, "worker_timeout must be a number of seconds or None, got True"),
    ],
)
def test_bad_options(tied, kwargs, error, words):
    with pytest.raises(error, match=words):
        td.top_k(tied["test"], tied["store"], **kwargs)


def test_a_bad_side_is_refused_on_the_client(tied, monkeypatch):
    """tracin.top_k's ValueError for side, before any cluster is started (each task would raise it on its
    worker, after a LocalCluster was started for the call) (review332)."""

    def no_cluster(client):
        raise AssertionError("a cluster was used for a bad side")

    monkeypatch.setattr(td._api, "client_for", no_cluster)
    with pytest.raises(ValueError, match="side must be") as local:
        tracin.top_k(tied["test"], tied["store"], 3, "best")
    with pytest.raises(ValueError, match="side must be") as distributed:
        td.top_k(tied["test"], tied["store"], 3, "best")
    assert str(distributed.value) == str(local.value)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"whitening": object()}, ValueError, r"whitening: .* use tracin.self_influence\(train, whitening=...\)"),
        ({"normalize": True}, ValueError, "self_influence takes no normalize=True"),
        ({"normalize": "no"}, TypeError, "normalize must be True or False"),
        ({"per_checkpoint": 1}, TypeError, "per_checkpoint must be True or False"),
        ({"device": "cuda:0"}, ValueError, "device must be None or 'cpu'"),
    ],
)
def test_bad_self_influence_options(tied, kwargs, error, words):
    with pytest.raises(error, match=words):
        td.self_influence(tied["store"], **kwargs)


def test_normalize_is_refused_in_the_words_of_tracin_self_influence(tied):
    with pytest.raises(ValueError) as one_machine:
        tracin.self_influence(tied["store"], normalize=True)
    with pytest.raises(ValueError) as cluster:
        td.self_influence(tied["store"], normalize=True)
    assert str(cluster.value) == str(one_machine.value)
    assert "cosine of a gradient with itself is 1" in str(cluster.value)


def test_aggregate_runs_on_the_cpu_only(tied):
    with pytest.raises(ValueError, match="device must be None or 'cpu', got 'cuda'"):
        td.aggregate(tied["test"], tied["store"], device="cuda")
    with pytest.raises(ValueError, match="precision: the CPU kernel"):
        td.aggregate(tied["test"], tied["store"], precision="tf32")


def test_in_memory_sides_are_refused(tied):
    train = tracin.Gradients([np.asarray(m) for m in tied["train"]], [0.5, 2.0])
    with pytest.raises(TypeError, match="test or train must be a GradientStore"):
        td.top_k(tied["test"], train)
    with pytest.raises(TypeError, match="train must be a GradientStore"):
        td.self_influence(train)
    with pytest.raises(TypeError, match="test or train must be a GradientStore"):
        td.aggregate(tied["test"], train)


def test_mismatched_sides_are_refused_as_on_one_machine(tied):
    with pytest.raises(ValueError, match="checkpoints"):
        td.top_k(tracin.Gradients(tied["test_arrays"][0]), tied["store"])


def test_missing_store_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"train: no gradient store at {tmp_path / 'nowhere'}"):
        td.self_influence(tmp_path / "nowhere")


def test_shard_ranges_cover_the_rows_in_near_equal_parts():
    ranges = shard_ranges(1003, 40, slots=2, shards=7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1003 and len(ranges) == 7
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert {b - a for a, b in ranges} <= {143, 144}


@pytest.mark.parametrize("n_rows, slots", [(10, 4), (100, 2), (1024, 2), (4096, 2), (300_000, 1000)])
def test_default_shard_ranges_are_guided_by_bytes(n_rows, slots):
    mib = 2**20  # one MiB per row
    sizes = [b - a for a, b in shard_ranges(n_rows, mib, slots=slots, shards=None)]
    assert sum(sizes) == n_rows and sizes == sorted(sizes, reverse=True)
    assert max(sizes) == min(256, max(16, -(-n_rows // (2 * slots))), n_rows)
    assert all(s >= 16 for s in sizes[:-1])  # only the last may be small
    assert len(sizes) >= min(slots, n_rows // 16)  # every slot busy when there is enough


def test_guided_sizes_halve_per_round_of_slots():
    sizes = [b - a for a, b in shard_ranges(1024, 2**20, slots=2, shards=None)]
    assert sizes[:5] == [256, 192, 144, 108, 81]  # a quarter of what is left each time
    assert sizes[5:] == [61, 46, 34, 26, 19, 16, 16, 16, 9]  # then the 16 MiB floor, and what is left


def test_shard_ranges_aligned_to_chunks():
    assert shard_ranges(40, 8, slots=1, shards=3, align=7) == [(0, 14), (14, 28), (28, 40)]
    ranges = shard_ranges(10_000, 2**20, slots=3, shards=None, align=7)
    assert ranges[-1][1] == 10_000 and all(a % 7 == 0 for a, _ in ranges)


def test_kernel_threads_share_the_host_cores_among_its_task_slots(client):
    cores = len(os.sched_getaffinity(0))  # the workers are this process's children: same cores
    assert client.submit(kernel_threads, None, pure=False).result() == max(1, cores // 2)  # 2 workers here
    assert client.submit(kernel_threads, 3, pure=False).result() == 3
    assert slots_by_host(client) == {"127.0.0.1": 2}


def test_closed_client_is_named(client, tied):
    closed = Client(client.scheduler.address, set_as_default=False)
    closed.close()
    with pytest.raises(ValueError, match="client is closed"):
        td.self_influence(tied["store"], client=closed)


def test_scoring_on_a_cluster_without_workers_goes_on_until_they_come(tied, capsys):
    """Scoring with worker_timeout=None does not wait for workers: its tasks queue."""
    with (
        LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        threading.Timer(1.0, cluster.scale, [1]).start()
        found = td.self_influence(tied["store"], client=c, shards=2)
    np.testing.assert_array_equal(found, tracin.self_influence(tied["store"]))
    assert "has no workers yet; its tasks start when workers join" in capsys.readouterr().err


def test_worker_timeout_bounds_the_wait_for_a_first_worker(tied, capsys):
    """The first worker is waited for up to worker_timeout seconds; then a TimeoutError names it."""
    with (
        LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        for call in (
            lambda: td.top_k(tied["test"], tied["store"], 3, client=c, worker_timeout=0.3),
            lambda: td.self_influence(tied["store"], client=c, worker_timeout=0.3),
            lambda: td.aggregate(tied["test"], tied["store"], client=c, worker_timeout=0.3),
        ):
            with pytest.raises(TimeoutError, match=r"still has no workers after worker_timeout=0.3 s: start some"):
                call()
        assert "waiting up to 0.3 s (worker_timeout) for one" in capsys.readouterr().err
        threading.Timer(1.0, cluster.scale, [1]).start()
        found = td.top_k(tied["test"], tied["store"], 3, client=c, shards=2, worker_timeout=120)
    expected = tracin.top_k(tied["test"], tied["store"], 3)
    np.testing.assert_array_equal(found.indices, expected.indices)
    np.testing.assert_array_equal(found.values, expected.values)


def _placeholders_left(client: Client) -> list[str]:
    """Keys of slots_by_host's placeholder tasks still on the scheduler, once it has had time to forget them."""

    def left(dask_scheduler) -> list[str]:
        return [str(k) for k in dask_scheduler.tasks if str(k).startswith("tracin-wait-for-a-worker-")]

    for _ in range(50):
        if not (found := client.run_on_scheduler(left)):
            break
        time.sleep(0.1)
    return found


def test_worker_timeout_lets_an_adaptive_cluster_start_its_first_worker(tied, capsys):
    """cluster.adapt(minimum=0) (dask-jobqueue's usual way) starts workers only for pending tasks: a task is
    pending while the first worker is waited for, so one comes long before worker_timeout."""
    with (
        LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        cluster.adapt(minimum=0, maximum=1, interval="100ms", wait_count=20)
        start = time.monotonic()
        found = td.self_influence(tied["store"], client=c, shards=2, worker_timeout=60)
        took = time.monotonic() - start
        assert _placeholders_left(c) == []
    np.testing.assert_array_equal(found, tracin.self_influence(tied["store"]))
    assert "waiting up to 60 s (worker_timeout) for one" in capsys.readouterr().err
    assert took < 30, f"an adaptive cluster's first worker came only after {took:.1f} s"


@pytest.fixture
def unfinished(tmp_path) -> str:
    """A store of 50 rows of which 20 are written, never finalized (its path)."""
    rng = np.random.default_rng(3)
    writer = tracin.GradientStore.create(tmp_path / "unfinished", n_rows=50, dims=[4, 2])
    writer.write(0, 0, rng.standard_normal((20, 4), dtype=np.float32))
    writer.write(1, 0, rng.standard_normal((20, 2), dtype=np.float32))
    writer.close()
    return str(tmp_path / "unfinished")


@pytest.mark.parametrize(
    "name, store_side",
    [("top_k", "train"), ("top_k", "test"), ("self_influence", "train"), ("aggregate", "train"), ("aggregate", "test")],
)
def test_unfinished_store_is_refused_on_the_client(unfinished, monkeypatch, name, store_side):
    """tracin's own ValueError, before any cluster is started or task scheduled (each task raised it,
    and a user's cluster logged every one)."""
    rng = np.random.default_rng(4)
    other = tracin.Gradients([rng.standard_normal((5, 4), dtype=np.float32), rng.standard_normal((5, 2), np.float32)])
    sides = (other, unfinished) if store_side == "train" else (unfinished, other)
    if name == "self_influence":
        sides = (unfinished,)
    with pytest.raises(ValueError, match="is unfinished") as local:
        getattr(tracin, name)(*(tracin.GradientStore.open(s) if isinstance(s, str) else s for s in sides))

    def no_cluster(client):
        raise AssertionError("a cluster was used for an unfinished store")

    monkeypatch.setattr(td._api, "client_for", no_cluster)
    with pytest.raises(ValueError, match="is unfinished") as distributed:
        getattr(td, name)(*sides, progress=False)
    assert str(distributed.value) == str(local.value)
    partial = tracin.GradientStore.open(unfinished, allow_partial=True)  # opened so: let through to the cluster
    with pytest.raises(AssertionError, match="a cluster was used"):
        getattr(td, name)(*(partial if s is unfinished else s for s in sides), progress=False)


def test_more_shards_than_rows_gives_one_row_each_and_no_empty_range():
    """shards above the rows (or the aligned units) is capped there: no empty range is a task (r266)."""
    assert shard_ranges(5, 8, slots=2, shards=9) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert shard_ranges(10, 8, slots=2, shards=4, align=4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 8, slots=2, shards=3) == [(0, 0)]


def test_store_rows_past_the_stores_rows_are_refused_not_cut_short(tmp_path):
    """A worker seeing fewer rows than a shard's stop (another copy of the store) is refused naming the
    rows, not given the rows it has (r266: only the start was compared)."""
    from dataclasses import replace

    from tracin.distributed._shards import StoreRows

    w = tracin.GradientStore.create(tmp_path / "s", 6, [3], weights=[1.0])
    w.write(0, 0, np.ones((6, 3), np.float32))
    w.finalize()
    rows = StoreRows.of(tracin.GradientStore.open(tmp_path / "s"))
    assert rows.rows(2, 6).open().n_rows == 4
    with pytest.raises(ValueError, match=r"has 6 usable rows here, but rows \[4, 8\) were asked for"):
        replace(rows, start=4, stop=8).open()


@pytest.mark.parametrize(
    ("num_threads", "error", "words"),
    [
        (-1, ValueError, "num_threads must be a positive integer"),
        (4097, ValueError, "no larger than 4096"),
        (2.0, TypeError, "num_threads must be a positive integer"),
    ],
)
def test_bad_num_threads_are_refused_before_any_cluster_is_used(tied, monkeypatch, num_threads, error, words):
    """tracin's own check and bound (r297 M57: without it, -1 and 4097 reached the workers' tasks)."""
    import tracin.distributed._api as api

    def no_cluster(client):
        raise AssertionError("a cluster was asked for")

    monkeypatch.setattr(api, "client_for", no_cluster)
    for call in (
        lambda: td.top_k(tied["test"], tied["store"], 3, num_threads=num_threads),
        lambda: td.self_influence(tied["store"], num_threads=num_threads),
    ):
        with pytest.raises(error, match=words):
            call()


def test_more_shards_than_test_chunks_warn_only_when_the_store_could_be_cut_finer(tmp_path):
    """aggregate's shards start on the test store's row chunks: shards=5 over 2 chunks of 7 rows warns how to
    cut finer; over a store of 2 rows in 2 chunks of 1 row, or shards=2, it does not (r297 M56: warned there too)."""
    import warnings

    from tracin.distributed._api import _warn_chunks

    rng = np.random.default_rng(3)
    rows = [rng.standard_normal((14, 4)).astype(np.float32)]
    coarse = tracin.GradientStore.create(tmp_path / "coarse", 14, [4], [1.0])
    coarse.write(0, 0, rows[0])
    coarse.finalize()
    two = tracin.GradientStore.create(tmp_path / "two", 2, [4], [1.0])
    two.write(0, 0, rows[0][:2])
    two.finalize()
    with pytest.warns(UserWarning, match=r"shards=5, but the test store .* has 2 row chunk\(s\) \(up to 7 rows each\)"):
        _warn_chunks(tracin.GradientStore.open(tmp_path / "coarse", chunk_bytes=7 * 16), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_chunks(tracin.GradientStore.open(tmp_path / "coarse", chunk_bytes=7 * 16), 2)
        _warn_chunks(tracin.GradientStore.open(tmp_path / "two", chunk_bytes=16), 5)
