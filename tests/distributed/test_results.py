"""Distributed results against float64 NumPy references and, bit for bit, the single-machine functions."""

from __future__ import annotations

import operator
import time
import tracemalloc
import warnings

import dask
import numpy as np
import pytest
from distributed import Future

import tracin
import tracin.distributed as td
from tracin.distributed import _tasks
from tracin.distributed._run import Job

from .conftest import exact_top_k, write_store


def _same(a: tracin.TopK, b: tracin.TopK) -> None:
    assert a.values.dtype == b.values.dtype == np.float32 and a.indices.dtype == b.indices.dtype == np.int64
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.indices, b.indices)


def _check_exact(found: tracin.TopK, scores: np.ndarray, k: int, side: str) -> None:
    """Against the float64 reference; the tied store's scores are exact in float32."""
    values, indices = exact_top_k(scores, k, side)
    np.testing.assert_array_equal(found.indices, indices)
    np.testing.assert_array_equal(found.values, values.astype(np.float32))


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
@pytest.mark.parametrize("k", [5, 150, 1500])  # within a shard, larger than a shard (100 rows), larger than n
def test_top_k_ties_match_reference_and_one_machine(client, tied, side, k):
    found = td.top_k(tied["test"], tied["store"], k, side, client=client, shards=10)
    local = tracin.top_k(tied["test"], tied["store"], k, side)
    assert len(np.unique(tied["scores"][0])) < 100  # many ties among 1000 scores
    for name, f, one in zip(
        ["proponents", "opponents"] if side == "both" else [side],
        found if side == "both" else [found],
        local if side == "both" else [local],
        strict=True,
    ):
        _check_exact(f, tied["scores"], min(k, 1000), name)
        _same(f, one)


def test_default_shards_and_a_path(client, tied):
    expected = tracin.top_k(tied["test"], tied["store"], 7, "both")
    for train in (tied["store"], str(tied["store"].path)):
        found = td.top_k(tied["test"], train, 7, "both", client=client)
        _same(found.proponents, expected.proponents)
        _same(found.opponents, expected.opponents)


def test_store_view_indices_are_relative_to_the_view(client, tied):
    view = tied["store"][137:912]
    found = td.top_k(tied["test"], view, 12, "opponents", client=client, shards=4)
    _check_exact(found, tied["scores"][:, 137:912], 12, "opponents")


def _within_bound(found: tracin.TopK, data: dict, test_rows: slice = slice(None)) -> None:
    """Values equal the exact scores of the returned indices, within the scale-aware bound."""
    scale = sum(
        abs(w) * np.linalg.norm(t[test_rows], axis=1)[:, None] * np.linalg.norm(x, axis=1)[None, :]
        for w, t, x in zip(data["weights"], data["test"], data["train"], strict=True)
    )
    exact = np.take_along_axis(data["scores"][test_rows], found.indices, 1)
    bound = 1e-5 * np.take_along_axis(scale, found.indices, 1)
    assert np.all(np.abs(found.values - exact) <= bound)


def test_both_sides_stores(client, floats):
    found = td.top_k(floats["test_store"], floats["store"], 20, "both", client=client, shards=6)
    local = tracin.top_k(floats["test_store"], floats["store"], 20, "both")
    for f, one, name in zip(found, local, ["proponents", "opponents"], strict=True):
        _same(f, one)
        _within_bound(f, floats)
        kth = exact_top_k(floats["scores"], 20, name)[0][:, -1]
        assert np.allclose(f.values[:, -1], kth, rtol=0, atol=1e-4)


def test_test_side_store_with_train_in_memory(client, floats):
    train = tracin.Gradients([m[:500] for m in floats["train"]], floats["weights"])
    found = td.top_k(floats["test_store"], train, 9, client=client, shards=3)
    _same(found, tracin.top_k(floats["test_store"], train, 9))
    np.testing.assert_array_equal(found.indices, exact_top_k(floats["scores"][:, :500], 9, "proponents")[1])


def test_in_memory_side_warns_of_no_large_graph_and_is_released(client, floats):
    """The 768 KB in-memory train side travels in a task (so that it can be made again): Dask's 'Sending
    large graph' (threshold lowered to 100 kB) is not shown, and the scheduler holds nothing of the call
    once it returns."""

    def scheduler_tasks() -> set:
        return client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.tasks))

    train = tracin.Gradients(floats["train"], floats["weights"])
    before = scheduler_tasks()
    with (
        dask.config.set({"distributed.admin.large-graph-warning-threshold": "100kB"}),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        found = td.top_k(floats["test_store"], train, 4, client=client, shards=3)
    assert not [w for w in caught if "large graph" in str(w.message)]
    _same(found, tracin.top_k(floats["test_store"], train, 4))
    deadline = time.monotonic() + 10
    # Tasks of earlier tests may still be on their way out (the CI saw 4 being released): only this call's count.
    while scheduler_tasks() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scheduler_tasks() - before


def test_self_influence(client, floats):
    found = td.self_influence(floats["store"], client=client, shards=5)
    np.testing.assert_array_equal(found, tracin.self_influence(floats["store"]))
    exact = sum(
        w * np.sum(x.astype(np.float64) ** 2, axis=1) for w, x in zip(floats["weights"], floats["train"], strict=True)
    )
    np.testing.assert_allclose(found, exact, rtol=1e-5)


def test_self_influence_per_checkpoint_and_cpu_options(client, floats):
    found = td.self_influence(floats["store"], per_checkpoint=True, client=client, shards=5, device="cpu")
    assert found.shape == (3000, 2) and found.dtype == np.float32
    np.testing.assert_array_equal(found, tracin.self_influence(floats["store"], per_checkpoint=True))
    pairs = zip(floats["weights"], floats["train"], strict=True)
    exact = [w * np.sum(x.astype(np.float64) ** 2, axis=1) for w, x in pairs]
    np.testing.assert_allclose(found, np.stack(exact, axis=1), rtol=1e-5)
    plain = td.self_influence(floats["store"], client=client, shards=5, precision="float32", normalize=False)
    np.testing.assert_array_equal(plain, tracin.self_influence(floats["store"]))
    both = td.top_k(floats["test_store"], floats["store"], 3, client=client, shards=2, device="cpu")
    _same(both, tracin.top_k(floats["test_store"], floats["store"], 3))


def test_aggregate_over_train_shards(client, floats):
    found = td.aggregate(floats["test_store"], floats["store"], client=client, shards=7)
    assert found.dtype == np.float32
    np.testing.assert_array_equal(found, tracin.aggregate(floats["test_store"], floats["store"]))
    np.testing.assert_allclose(found, floats["scores"].sum(0), rtol=1e-4, atol=1e-4)


def test_aggregate_over_test_shards_carries_the_column_sums_in_order(client, floats):
    train = tracin.Gradients([m[:300] for m in floats["train"]], floats["weights"])
    found = td.aggregate(floats["test_store"], train, client=client, shards=3)  # 40 rows in chunks of 7
    np.testing.assert_array_equal(found, tracin.aggregate(floats["test_store"], train))
    np.testing.assert_allclose(found, floats["scores"][:, :300].sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cut", ["train", "test"])
def test_aggregate_sends_the_client_one_float64_per_train_row(client, floats, monkeypatch, cut):
    """Not (test chunks x n) partials: the test store has 6 row chunks, the client gets n float64 in all."""
    train = floats["store"]
    if cut == "test":
        train = tracin.Gradients([m[:300] for m in floats["train"]], floats["weights"])
    received = []

    def wait(job, *args, **kwargs):
        found = wait_of_job(job, *args, **kwargs)
        received.append(sum(np.asarray(a).nbytes for a in (found if isinstance(found, list) else [found])))
        return found

    wait_of_job = td._api.Job.wait
    monkeypatch.setattr(td._api.Job, "wait", wait)
    found = td.aggregate(floats["test_store"], train, client=client, shards=3)
    np.testing.assert_array_equal(found, tracin.aggregate(floats["test_store"], train))
    assert received == [train.n_rows * 8]


def _held_when_the_result_is_in(client, monkeypatch, done: dict[str, int]) -> list[dict[str, int]]:
    """Patches Future.result (Job.wait's final.result(): the result is in) to append to the returned list the
    count of tasks of each name in `done` the cluster holds in memory then, waiting up to 10 s for `done` (the
    scheduler frees what was released a moment later)."""

    def held() -> dict[str, int]:
        def count(dask_scheduler) -> dict[str, int]:
            found = dict.fromkeys(done, 0)
            for ts in dask_scheduler.tasks.values():
                for name in found:
                    found[name] += ts.state == "memory" and str(ts.key).startswith(f"tracin_{name}-")
            return found

        return client.run_on_scheduler(count)

    seen = []
    result = Future.result

    def measured_result(future, *args, **kwargs):
        found = result(future, *args, **kwargs)
        deadline = time.monotonic() + 10
        while (now := held()) != done and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(now)
        return found

    monkeypatch.setattr(Future, "result", measured_result)
    return seen


def test_aggregate_over_test_shards_frees_each_partial_once_added(client, floats, monkeypatch):
    """Full gradients: when the result is in, the cluster holds none of the chain's column sums (one
    link per test shard, each adding its rows to the sums before it), only the train rows' result
    (the one task after the chain): each link was released once used."""
    done = {"column_sums_part": 0, "aggregate_sums_part": 1}
    train = tracin.Gradients(floats["train"], floats["weights"])
    seen = _held_when_the_result_is_in(client, monkeypatch, done)
    found = td.aggregate(floats["test_store"], train, client=client, shards=4)
    np.testing.assert_array_equal(found, tracin.aggregate(floats["test_store"], train))
    assert seen == [done]


def test_aggregate_beyond_float32_is_refused(client, tmp_path):
    train = [np.full((6, 4), 3e19, dtype=np.float32)]  # 3 test rows x 4 columns x 3e38: 3.6e39 per train row
    store = write_store(tmp_path / "big", train, None)
    with pytest.raises(ValueError, match=r"overflowed float32 for train rows \[0, 1, 2, 3, 4\]"):
        td.aggregate(tracin.Gradients(np.ones((3, 4), dtype=np.float32) * 1e19), store, client=client, shards=2)


def test_factored_store(client, tmp_path):
    rng = np.random.default_rng(5)
    (p, q), weights = (5, 7), [0.7]
    left, right = (rng.standard_normal((800, d)).astype(np.float32) for d in (p, q))
    t_left, t_right = (rng.standard_normal((4, d)).astype(np.float32) for d in (p, q))
    writer = tracin.GradientStore.create(tmp_path / "f", 800, [(p, q)], weights, factored=True)
    writer.write(0, 0, (left, right))
    store = writer.finalize()
    test = tracin.FactoredGradients(t_left, t_right, weights)
    found = td.top_k(test, store, 6, "both", client=client, shards=5)
    local = tracin.top_k(test, store, 6, "both")
    exact = 0.7 * (t_left.astype(np.float64) @ left.T) * (t_right.astype(np.float64) @ right.T)
    for f, one, name in zip(found, local, ["proponents", "opponents"], strict=True):
        _same(f, one)
        np.testing.assert_array_equal(f.indices, exact_top_k(exact, 6, name)[1])
    np.testing.assert_array_equal(td.aggregate(test, store, client=client, shards=3), tracin.aggregate(test, store))


def test_add_in_order_adds_rows_one_after_another_to_a_copy_of_the_total():
    """The aggregate chain's link: the total it is given is left as it was (a retried link, or Dask handing the
    same result to two tasks, must see the previous shard's sums), and rows are added in order, not pairwise."""
    total = np.array([1.0, 2.0**53])
    partials = np.array([[2.0**-60, 1.0], [1.0, 1.0]])
    got = _tasks.add_in_order(partials, total)
    np.testing.assert_array_equal(total, [1.0, 2.0**53])
    expected = total.copy()
    for row in partials:
        expected = expected + row
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(_tasks.add_in_order(partials), partials[0] + partials[1])


def test_column_sums_part_adds_to_a_copy_of_the_sums_it_is_given():
    """The full aggregate's chain link over test shards: the previous shard's sums are left as they were (a retried
    link must start from them again), the link's own rows added to a copy."""
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    sums = [np.full(4, 10.0)]
    (got,) = _tasks.column_sums_part(tracin.Gradients(rows), sums, 1, 0)
    np.testing.assert_array_equal(sums[0], np.full(4, 10.0))
    np.testing.assert_array_equal(got, 10.0 + rows.astype(np.float64).sum(0))


def test_merge_task_merges_blocks_of_test_rows_in_little_memory(monkeypatch):
    """8 parts of (4000, 50) tied scores: merged a block of rows at a time, the same bits as one merge_top_k,
    with temporaries well under the inputs (one merge of all the rows needs about twice them)."""
    rng = np.random.default_rng(2)
    parts = []
    for i in range(8):
        values = -np.sort(-rng.integers(-3, 4, (4000, 50)).astype(np.float32), axis=1)
        parts.append((tracin.TopK(values, np.broadcast_to(np.arange(50) + 50 * i, (4000, 50)).copy()),))
    expected = tracin.merge_top_k([p[0] for p in parts], [0] * 8, k=50)
    inputs = sum(p[0].values.nbytes + p[0].indices.nbytes for p in parts)
    monkeypatch.setattr(_tasks, "MERGE_BLOCK", 2**16)
    tracemalloc.start()
    try:
        (found,) = _tasks.merge_parts(parts, 50, "proponents")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _same(found, expected)
    # 4.66 MB of 19.2 MB here; tracemalloc also counts other threads' allocations (a cluster's, left by
    # earlier tests: 4.96 MB in a CI run), so the bound leaves room: a merge of all rows at once is ~2x inputs
    assert peak < inputs / 3, (peak, inputs)


def test_job_task_keys_are_not_reused_after_a_release(client):
    """A task submitted after release() gets a key of its own, not a released one's (review11 r9)."""
    job = Job(client, "keys")
    first, second = job.submit(operator.add, 1, 1), job.submit(operator.add, 2, 2)
    assert first.result() == 2
    job.release(first)
    third = job.submit(operator.add, 100, 100)
    assert len({first.key, second.key, third.key}) == 3
    assert (second.result(), third.result()) == (4, 200)
    job.release(second, third)


def _factored_store(path, left: np.ndarray, right: np.ndarray, **open_kw) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(path, len(left), [(left.shape[1], right.shape[1])], None, factored=True)
    writer.write(0, 0, (left, right))
    writer.finalize()
    return tracin.GradientStore.open(path, **open_kw)


def test_factored_aggregate_over_test_shards_frees_each_partial_once_added(client, tmp_path, monkeypatch):
    """Factored gradients cut on the test side: each shard's (test chunks, n) float64 partial is released once its
    link of the chain has added it; when the result is in, the cluster holds none of them, and of the chain only
    its last link (review332)."""
    rng = np.random.default_rng(9)
    left, right = rng.standard_normal((40, 3)).astype(np.float32), rng.standard_normal((40, 2)).astype(np.float32)
    test = _factored_store(tmp_path / "test", left, right, chunk_bytes=5 * 20)
    train = tracin.FactoredGradients(
        rng.standard_normal((200, 3)).astype(np.float32), rng.standard_normal((200, 2)).astype(np.float32)
    )
    done = {"aggregate_part": 0, "add_in_order": 1}
    seen = _held_when_the_result_is_in(client, monkeypatch, done)
    found = td.aggregate(test, train, client=client, shards=4)
    monkeypatch.undo()
    np.testing.assert_array_equal(found, tracin.aggregate(test, train))
    assert seen == [done]


def test_factored_test_shards_start_on_the_stores_row_chunks(client, tmp_path):
    """Test rows 1e20, -1e20 and 1 (scores against one train row of ones) in chunks of 2 rows: one process sums
    the first chunk to 1e20 (the 1 lost in float64), then adds -1e20: 0. Two test shards must be rows [0, 2) and
    [2, 3), on the chunks; [0, 1) and [1, 3) would sum 1 + (1e20 - 1e20) = 1, not tracin.aggregate's bits
    (review332)."""
    left = np.array([[1.0], [1e10], [-1e10]], np.float32)
    right = np.array([[1.0], [1e10], [1e10]], np.float32)
    test = _factored_store(tmp_path / "test", left, right, chunk_bytes=2 * 8)
    train = tracin.FactoredGradients(np.ones((2, 1), np.float32), np.ones((2, 1), np.float32))
    expected = tracin.aggregate(test, train)
    np.testing.assert_array_equal(expected, [0.0, 0.0])
    np.testing.assert_array_equal(td.aggregate(test, train, client=client, shards=2), expected)


def test_merge_task_blocks_are_bounded_by_the_merged_columns(monkeypatch):
    """A merge task takes MERGE_BLOCK // (columns of all its parts) test rows at a time: each merge_top_k call
    sees at most MERGE_BLOCK entries, however few the test rows (a block sized by the rows, or by one part's
    columns, would merge all 64 rows of 8 x 50 columns at once) (review332)."""
    rng = np.random.default_rng(3)
    parts = []
    for i in range(8):
        values = -np.sort(-rng.integers(-3, 4, (64, 50)).astype(np.float32), axis=1)
        parts.append((tracin.TopK(values, np.broadcast_to(np.arange(50) + 50 * i, (64, 50)).copy()),))
    expected = tracin.merge_top_k([p[0] for p in parts], [0] * 8, k=50)
    entries = []
    merge = _tasks.merge_top_k

    def counted(found, offsets, **kwargs):
        entries.append(sum(f.values.size for f in found))
        return merge(found, offsets, **kwargs)

    monkeypatch.setattr(_tasks, "MERGE_BLOCK", 2**12)
    monkeypatch.setattr(_tasks, "merge_top_k", counted)
    (found,) = _tasks.merge_parts(parts, 50, "proponents")
    _same(found, expected)
    assert len(entries) == 7 and max(entries) <= 2**12, entries  # 10 rows of 400 columns a call, 4 left at the end


def test_workers_read_a_store_in_the_clients_chunks(client, tmp_path):
    """Test rows 1e20, 1, -1e20, 1 (scores against train rows of ones) in chunks of 2 rows: one process sums
    (1e20 + 1) + (-1e20 + 1) = 0, one chunk of 4 rows would sum 1. Each task opens the test store with the
    client's chunk_bytes (the one cut, in one shard, and the one sent whole to train shards) (review332)."""
    left = np.array([[1e10], [1.0], [-1e10], [1.0]], np.float32)
    right = np.array([[1e10], [1.0], [1e10], [1.0]], np.float32)
    test = _factored_store(tmp_path / "test", left, right, chunk_bytes=2 * 8)
    ones = np.ones((4, 1), np.float32)
    train = _factored_store(tmp_path / "train", ones, ones)
    expected = tracin.aggregate(test, train)
    np.testing.assert_array_equal(expected, np.zeros(4))
    np.testing.assert_array_equal(tracin.aggregate(_factored_store(tmp_path / "whole", left, right), train), np.ones(4))
    np.testing.assert_array_equal(td.aggregate(test, train, client=client, shards=2), expected)
    memory = tracin.FactoredGradients(ones, ones)
    np.testing.assert_array_equal(td.aggregate(test, memory, client=client, shards=1), expected)
