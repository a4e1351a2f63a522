"""shards= above the rows of the side cut: capped at one row per shard (each a task), and said so on the
client, since so many one-row tasks take far longer than a few large ones (4000 of them: ~30 s against
0.1 s on two local workers) and the user asked for something else."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
import tracin.distributed as td

from .conftest import write_store


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(11)
    train = [rng.standard_normal((6, 5)).astype(np.float32)]
    test = [rng.standard_normal((3, 5)).astype(np.float32)]
    store = write_store(tmp_path_factory.mktemp("above") / "store", train, [0.5])
    exact = 0.5 * (test[0].astype(np.float64) @ train[0].astype(np.float64).T)
    return {"store": store, "test": tracin.Gradients(test, [0.5]), "train": train[0], "exact": exact}


def _calls(small: dict, client) -> dict:
    store, test = small["store"], small["test"]
    return {
        "top_k": lambda shards: td.top_k(test, store, k=2, shards=shards, client=client, progress=False),
        "top_k, the test side cut": lambda shards: td.top_k(
            store, test, k=2, shards=shards, client=client, progress=False
        ),
        "self_influence": lambda shards: td.self_influence(store, shards=shards, client=client, progress=False),
        "aggregate": lambda shards: td.aggregate(test, store, shards=shards, client=client, progress=False),
    }


@pytest.mark.parametrize("name", ["top_k", "top_k, the test side cut", "self_influence", "aggregate"])
def test_more_shards_than_rows_warns_naming_shards_the_rows_and_what_runs(small, client, name):
    call = _calls(small, client)[name]
    side = "test" if "test side" in name else "train"
    with pytest.warns(
        UserWarning,
        match=rf"shards=50, but the {side} store \(the side cut\) has 6 rows: 6 shards of one row",
    ) as record:
        got = call(50)
    assert record[0].filename == __file__  # the user's line, not tracin's
    exact = small["exact"]
    if name == "top_k":
        assert np.array_equal(got.indices, np.argsort(-exact, axis=1, kind="stable")[:, :2])
    elif name == "top_k, the test side cut":
        assert np.array_equal(got.indices, np.argsort(-exact.T, axis=1, kind="stable")[:, :2])
    elif name == "self_influence":
        x = small["train"].astype(np.float64)
        np.testing.assert_allclose(got, 0.5 * (x * x).sum(1), rtol=1e-5)
    else:
        np.testing.assert_allclose(got, exact.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["top_k", "top_k, the test side cut", "self_influence", "aggregate"])
def test_shards_up_to_the_rows_do_not_warn(small, client, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _calls(small, client)[name](6)


def test_a_one_row_store_does_not_warn(tmp_path, client):
    """One row is one shard whatever shards= asks: nothing slow to warn of."""
    store = write_store(tmp_path / "one", [np.ones((1, 3), np.float32)], [1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = td.self_influence(store, shards=4, client=client, progress=False)
    assert got.tolist() == [3.0]


def test_aggregate_chain_over_a_test_store_of_one_row_chunks_warns(small, client, tmp_path):
    """Full gradients, the test store cut (its shards a chain of column sums) read one row per chunk: shards=
    above its rows runs one task per row as the other cut sides do, and says so (it was silent)."""
    rng = np.random.default_rng(12)
    test = rng.standard_normal((6, 5)).astype(np.float32)
    store = write_store(tmp_path / "test", [test], [0.5], chunk_bytes=5 * 4)
    assert store.row_chunks() == 1
    with pytest.warns(UserWarning, match=r"shards=50, but the test store \(the side cut\) has 6 rows") as record:
        got = td.aggregate(store, tracin.Gradients([small["train"]], [0.5]), shards=50, client=client, progress=False)
    assert len(record) == 1 and record[0].filename == __file__
    exact = 0.5 * (test.astype(np.float64) @ small["train"].astype(np.float64).T).sum(0)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
