"""tracin.distributed top_k / aggregate with normalize=True: bit for bit the single-machine cosine
scores, and those within the contract's bound of a float64 reference normalised per checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
import tracin.distributed as td


def _cosines(test: list[np.ndarray], train: list[np.ndarray], weights: list[float], run: int) -> np.ndarray:
    """float64 (m, n): rows divided by their norm over each run of `run` slots, then TracIn."""

    def unit(blocks: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for c0 in range(0, len(blocks), run):
            b = [x.astype(np.float64) for x in blocks[c0 : c0 + run]]
            norms = np.sqrt(sum((x**2).sum(1) for x in b))
            out += [x / np.where(norms > 0, norms, 1.0)[:, None] for x in b]
        return out

    return sum(w * t @ x.T for w, t, x in zip(weights, unit(test), unit(train), strict=True))


def _same(a: tracin.TopK, b: tracin.TopK) -> None:
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.fixture(scope="module")
def factored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 1200-row factored train store of 2 checkpoints x 2 layers (recorded as an export records
    them), zero rows included, and a 15-row factored test store in chunks of 4 rows."""
    rng = np.random.default_rng(5)
    dims, weights = [(6, 4), (3, 5), (6, 4), (3, 5)], [0.5, 0.5, 2.0, 2.0]
    meta = {"mode": "factored", "fingerprints": {"checkpoints": ["a", "b"]}}
    root = tmp_path_factory.mktemp("cosine")
    sets = {}
    for name, n in (("train", 1200), ("test", 15)):
        left = [rng.standard_normal((n, p)).astype(np.float32) for p, _ in dims]
        right = [rng.standard_normal((n, q)).astype(np.float32) for _, q in dims]
        left[0][3] = left[1][3] = 0  # row 3 is zero in checkpoint 0 only
        writer = tracin.GradientStore.create(root / name, n, dims, weights, factored=True, metadata=meta)
        for c in range(len(dims)):
            writer.write(c, 0, (left[c], right[c]))
        writer.finalize()
        store = tracin.GradientStore.open(root / name)
        store = tracin.GradientStore.open(root / name, chunk_bytes=4 * store.row_bytes) if name == "test" else store
        full = [np.einsum("np,nq->npq", a, b).reshape(n, -1) for a, b in zip(left, right, strict=True)]
        sets[name] = {"store": store, "memory": tracin.FactoredGradients(left, right, weights, metadata=meta)}
        sets[name]["full"] = full
    exact = _cosines(sets["test"]["full"], sets["train"]["full"], weights, 2)
    return {**sets, "exact": exact, "scale": 1e-5 * sum(map(abs, weights)) / 2}


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
def test_top_k_over_train_shards(client, factored, side):
    test, train = factored["test"]["memory"], factored["train"]["store"]
    found = td.top_k(test, train, 6, side, client=client, shards=5, normalize=True)
    local = tracin.top_k(test, train, 6, side, normalize=True)
    for name, f, one in zip(
        ["proponents", "opponents"] if side == "both" else [side],
        found if side == "both" else [found],
        local if side == "both" else [local],
        strict=True,
    ):
        _same(f, one)
        chosen = np.take_along_axis(factored["exact"], f.indices, 1)
        assert np.all(np.abs(f.values - chosen) <= factored["scale"])
        sign = 1 if name == "proponents" else -1
        kth = -np.sort(-sign * factored["exact"], axis=1)[:, 5:6]
        assert np.all(sign * chosen >= kth - 2 * factored["scale"])


def test_top_k_over_test_shards(client, factored):
    test, train = factored["test"]["store"], factored["train"]["memory"]
    found = td.top_k(test, train, 4, "both", client=client, shards=3, normalize=True)
    local = tracin.top_k(test, train, 4, "both", normalize=True)
    _same(found.proponents, local.proponents)
    _same(found.opponents, local.opponents)


def test_aggregate_over_train_and_test_shards(client, factored):
    exact = factored["exact"].sum(0)
    for test, train in (
        (factored["test"]["store"], factored["train"]["store"]),
        (factored["test"]["store"], factored["train"]["memory"]),
    ):
        found = td.aggregate(test, train, client=client, shards=4, normalize=True)
        np.testing.assert_array_equal(found, tracin.aggregate(test, train, normalize=True))
        assert np.all(np.abs(found - exact) <= 15 * factored["scale"] + 1e-6 * np.abs(exact))
    plain = td.aggregate(factored["test"]["store"], factored["train"]["store"], client=client, shards=4)
    assert not np.allclose(plain, found)


def test_normalize_must_be_a_bool(client, factored):
    with pytest.raises(TypeError, match="normalize must be True or False"):
        td.top_k(factored["test"]["memory"], factored["train"]["store"], 3, client=client, normalize="yes")
    with pytest.raises(TypeError, match="normalize must be True or False"):
        td.aggregate(factored["test"]["memory"], factored["train"]["store"], client=client, normalize=1)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Full gradients of 2 checkpoints: a 300-row train store, a 15-row test store in chunks of 4 rows, and their
    in-memory sets, zero rows included."""
    rng = np.random.default_rng(8)
    dims, weights = [6, 4], [0.5, 2.0]
    root = tmp_path_factory.mktemp("full_cosine")
    sets = {}
    for name, n in (("train", 300), ("test", 15)):
        blocks = [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
        blocks[0][3] = 0  # row 3 is zero in checkpoint 0 only
        writer = tracin.GradientStore.create(root / name, n, dims, weights)
        for c, b in enumerate(blocks):
            writer.write(c, 0, b)
        writer.finalize()
        store = tracin.GradientStore.open(root / name)
        if name == "test":
            store = tracin.GradientStore.open(root / name, chunk_bytes=4 * store.row_bytes)
        sets[name] = {"store": store, "memory": tracin.Gradients(blocks, weights), "blocks": blocks}
    exact = _cosines(sets["test"]["blocks"], sets["train"]["blocks"], weights, 1)
    return {**sets, "exact": exact, "scale": 1e-5 * sum(weights)}


@pytest.mark.parametrize("cut", ["train", "test"])
def test_full_gradients_cosine_aggregate_and_top_k(client, full, cut):
    """normalize=True on full gradients (the tests above are of factored ones): the test side's column sums are
    taken of cosine-scaled rows, in one task or a chain over the test shards, and the train rows scaled too: one
    process's result bit for bit, within the bound of the float64 reference (review332)."""
    test = full["test"]["store"]
    train = full["train"]["store"] if cut == "train" else full["train"]["memory"]
    found = td.aggregate(test, train, client=client, shards=3, normalize=True)
    np.testing.assert_array_equal(found, tracin.aggregate(test, train, normalize=True))
    exact = full["exact"].sum(0)
    assert np.all(np.abs(found - exact) <= 15 * full["scale"] + 1e-6 * np.abs(exact))
    plain = td.aggregate(test, train, client=client, shards=3)
    assert not np.allclose(plain, found)
    top = td.top_k(test, train, 5, "both", client=client, shards=3, normalize=True)
    for f, one in zip(top, tracin.top_k(test, train, 5, "both", normalize=True), strict=True):
        _same(f, one)
        assert np.all(np.abs(f.values - np.take_along_axis(full["exact"], f.indices, 1)) <= full["scale"])
