"""Cosine scores (normalize=True) of tracin.scores / top_k / aggregate against a float64 NumPy
reference that normalises per checkpoint explicitly: full and factored sets (several layers per
checkpoint), in memory and from stores streamed in several pieces, zero rows, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from reference import factored_to_full, to_float64
from tracin.scoring import WhitenedNormalizeError, _normalize_run

SIDES = ("proponents", "opponents", "both")


def cosine_reference(test: list, train: list, weights, run: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact float64 (m, n), the contract's bound (m, n)) of sum_s w_s <t_s, x_s> / (|t|_c |x|_c),
    slot s in checkpoint c = s // run, |.|_c the norm over c's slots; 0 where a norm is 0."""
    t, x = [to_float64(a) for a in test], [to_float64(b) for b in train]
    exact = np.zeros((len(t[0]), len(x[0])))
    bound = np.zeros_like(exact)
    for c0 in range(0, len(t), run):
        nt = np.sqrt(sum((a**2).sum(1) for a in t[c0 : c0 + run]))
        nx = np.sqrt(sum((b**2).sum(1) for b in x[c0 : c0 + run]))
        norms = np.outer(nt, nx)
        for s in range(c0, c0 + run):
            with np.errstate(divide="ignore", invalid="ignore"):
                exact += np.where(norms > 0, weights[s] * (t[s] @ x[s].T) / norms, 0.0)
                slot = np.outer(np.linalg.norm(t[s], axis=1), np.linalg.norm(x[s], axis=1))
                bound += np.where(norms > 0, 1e-5 * abs(weights[s]) * slot / norms, 0.0)
    return exact, bound


def full_set(rng, n: int, dims: list[int], weights, zero_rows=()) -> tracin.Gradients:
    blocks = [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
    for b in blocks:
        b[list(zero_rows)] = 0
    return tracin.Gradients(blocks, weights)


def factored_set(rng, n: int, dims: list[tuple[int, int]], weights, checkpoints: int, zero_rows=()):
    """FactoredGradients of len(dims) slots recorded (as an export records them) as `checkpoints`
    real checkpoints of len(dims) // checkpoints layers each."""
    left = [rng.standard_normal((n, p)).astype(np.float32) for p, _ in dims]
    right = [rng.standard_normal((n, q)).astype(np.float32) for _, q in dims]
    for b in left:
        b[list(zero_rows)] = 0
    meta = {"mode": "factored", "fingerprints": {"checkpoints": [f"c{c}" for c in range(checkpoints)]}}
    return tracin.FactoredGradients(left, right, weights, metadata=meta)


def dense(s) -> list[np.ndarray]:
    """Per slot the float64 gradients of a set (outer products for factored sets)."""
    return factored_to_full(s.left, s.right) if s.factored else [to_float64(m) for m in s.matrices]


def assert_within(got: np.ndarray, exact: np.ndarray, bound: np.ndarray) -> None:
    err = np.abs(got.astype(np.float64) - exact)
    assert got.shape == exact.shape and np.all(err <= bound), f"worst excess {np.max(err - bound)}"


def assert_top_k(found, exact: np.ndarray, bound: np.ndarray, k: int, side: str) -> None:
    """Values are the exact scores of their indices (within the bound) and no better candidate was
    missed (beyond twice the bound); proponents descending, opponents ascending."""
    sign = 1 if side == "proponents" else -1
    chosen = np.take_along_axis(exact, found.indices, 1)
    assert found.values.shape == (exact.shape[0], min(k, exact.shape[1]))
    assert_within(found.values, chosen, np.take_along_axis(bound, found.indices, 1))
    assert np.all(np.diff(sign * found.values, axis=1) <= 0)
    kth = -np.sort(-sign * exact, axis=1)[:, found.values.shape[1] - 1 : found.values.shape[1]]
    assert np.all(sign * chosen >= kth - 2 * bound.max(axis=1, keepdims=True))


def check_all(test, train, exact, bound, k: int = 7) -> None:
    assert_within(tracin.scores(test, train, normalize=True), exact, bound)
    for side in SIDES:
        found = tracin.top_k(test, train, k, side, normalize=True)
        for name, part in (found._asdict() if side == "both" else {side: found}).items():
            assert_top_k(part, exact, bound, k, name)
    total = tracin.aggregate(test, train, normalize=True)
    assert total.dtype == np.float32
    assert_within(total, exact.sum(0), bound.sum(0) + 1e-7 * np.abs(exact.sum(0)))


@pytest.mark.parametrize("dims", [[40], [9, 300, 17]])
def test_full_gradients_in_memory(rng, dims):
    w = [0.5, -1.5, 2.0][: len(dims)]
    test = full_set(rng, 13, dims, w, zero_rows=[4])
    train = full_set(rng, 211, dims, w, zero_rows=[0, 100])
    for t, x in zip(test.matrices, train.matrices, strict=True):
        x[50] = 3.7 * t[0]  # a scaled copy: cosine 1 in every checkpoint
    exact, bound = cosine_reference(dense(test), dense(train), w, 1)
    assert np.abs(exact).max() <= sum(map(abs, w)) + 1e-12
    check_all(test, train, exact, bound)
    got = tracin.scores(test, train, normalize=True)
    assert abs(got[0, 50] - sum(w)) <= 1e-5 * sum(map(abs, w))
    assert np.all(got[4] == 0) and np.all(got[:, [0, 100]] == 0)  # zero gradients score 0


def test_each_checkpoint_is_normalised_on_its_own(rng):
    """A row zero in one checkpoint only scores through the others; scaling a row's checkpoint by a
    positive factor changes nothing."""
    w = [1.0, 3.0]
    test, train = full_set(rng, 5, [20, 30], w), full_set(rng, 50, [20, 30], w)
    train.matrices[0][7] = 0
    base = tracin.scores(test, train, normalize=True)
    exact, bound = cosine_reference(dense(test), dense(train), w, 1)
    assert_within(base, exact, bound)
    assert np.abs(base[:, 7]).max() > 0
    blocks = [m.copy() for m in train.matrices]
    blocks[1][:25] *= 1000.0
    blocks[0][25:] *= 1e-3
    scaled = tracin.scores(test, tracin.Gradients(blocks, w), normalize=True)
    np.testing.assert_allclose(scaled, base, atol=2e-5 * sum(w))
    plain = tracin.scores(test, tracin.Gradients(blocks, w))
    assert not np.allclose(plain, tracin.scores(test, train))


@pytest.mark.parametrize("layers", [1, 2])
def test_factored_sets_normalise_per_checkpoint_not_per_layer(rng, layers):
    """Two checkpoints of `layers` layers each: the norm of checkpoint c is sqrt(sum_l |L_l|^2 |R_l|^2)."""
    dims = [(7, 5), (3, 11), (6, 4), (2, 9)][: 2 * layers]
    w = [0.8] * layers + [-0.3] * layers
    test = factored_set(rng, 11, dims, w, checkpoints=2, zero_rows=[2])
    train = factored_set(rng, 97, dims, w, checkpoints=2, zero_rows=[5])
    exact, bound = cosine_reference(dense(test), dense(train), w, layers)
    check_all(test, train, exact, bound)
    if layers == 2:  # per layer piece would be a different (wrong) answer
        per_layer, _ = cosine_reference(dense(test), dense(train), w, 1)
        assert np.abs(per_layer - exact).max() > 0.05


def test_stores_streamed_in_several_pieces(rng, tmp_path):
    """Both sides from stores read in many chunks (train) and several (test): the same scores and
    top-k bits as in memory, aggregate within the bound; factored stores with two layers too."""
    for name, make in (
        ("full", lambda n, z: full_set(rng, n, [33, 260], [0.7, 0.2], zero_rows=z)),
        ("factored", lambda n, z: factored_set(rng, n, [(5, 4), (3, 6)], [1.5, 1.5], checkpoints=1, zero_rows=z)),
    ):
        sets = {"test": make(19, [3]), "train": make(300, [10, 299])}
        stores = {}
        for side, s in sets.items():
            writer = tracin.GradientStore.create(
                tmp_path / f"{name}-{side}", s.n_rows, s.dims, s.weights, factored=s.factored, metadata=s.metadata
            )
            for c, blocks in enumerate(zip(s.left, s.right, strict=True) if s.factored else s.matrices):
                writer.write(c, 0, blocks)
            writer.finalize()
            row_bytes = tracin.GradientStore.open(tmp_path / f"{name}-{side}").row_bytes
            stores[side] = tracin.GradientStore.open(tmp_path / f"{name}-{side}", chunk_bytes=s.n_rows // 5 * row_bytes)
        assert stores["train"].row_chunks() == 60 and stores["test"].row_chunks() == 3
        run = 2 if name == "factored" else 1
        w = sets["train"].weights
        exact, bound = cosine_reference(dense(sets["test"]), dense(sets["train"]), w, run)
        check_all(stores["test"], stores["train"], exact, bound)
        np.testing.assert_array_equal(
            tracin.scores(stores["test"], stores["train"], normalize=True),
            tracin.scores(sets["test"], sets["train"], normalize=True),
        )
        for a, b in zip(
            tracin.top_k(stores["test"], stores["train"], 9, "both", normalize=True),
            tracin.top_k(sets["test"], sets["train"], 9, "both", normalize=True),
            strict=True,
        ):
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.indices, b.indices)


def test_progress_pieces_leave_cosine_scores_unchanged(rng):
    w = [1.0, -0.5]
    test, train = full_set(rng, 6, [8, 3], w), full_set(rng, 9000, [8, 3], w)
    quiet = tracin.top_k(test, train, 5, "both", normalize=True, progress=False)
    pieced = tracin.top_k(test, train, 5, "both", normalize=True, progress=True)
    for a, b in zip(quiet, pieced, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)


def test_torch_backend_keeps_the_bound(rng):
    pytest.importorskip("torch")
    dims = [(7, 5), (3, 11)]
    test = factored_set(rng, 11, dims, [0.8, 0.8], checkpoints=1)
    train = factored_set(rng, 60, dims, [0.8, 0.8], checkpoints=1)
    exact, bound = cosine_reference(dense(test), dense(train), [0.8, 0.8], 2)
    assert_within(tracin.scores(test, train, normalize=True, device="torch:cpu"), exact, bound)
    found = tracin.top_k(test, train, 4, "opponents", normalize=True, device="torch:cpu")
    assert_top_k(found, exact, bound, 4, "opponents")


@pytest.mark.parametrize("value", [1, 0, "yes", None, np.array([True])])
def test_normalize_must_be_a_bool(rng, value):
    test, train = full_set(rng, 3, [4], None), full_set(rng, 5, [4], None)
    for call in (
        lambda: tracin.scores(test, train, normalize=value),
        lambda: tracin.top_k(test, train, 2, normalize=value),
        lambda: tracin.aggregate(test, train, normalize=value),
        lambda: tracin.self_influence(train, normalize=value),
    ):
        with pytest.raises(TypeError, match="normalize must be True or False"):
            call()


def test_a_numpy_bool_is_a_bool(rng):
    test, train = full_set(rng, 3, [4], None), full_set(rng, 5, [4], None)
    assert np.array_equal(
        tracin.scores(test, train, normalize=np.bool_(True)), tracin.scores(test, train, normalize=True)
    )
    assert np.array_equal(tracin.aggregate(test, train, normalize=np.bool_(False)), tracin.aggregate(test, train))


def test_refused_combinations(rng):
    train = full_set(rng, 20, [4], None)
    assert np.array_equal(tracin.self_influence(train, normalize=False), tracin.self_influence(train))
    with pytest.raises(ValueError, match="self_influence takes no normalize=True"):
        tracin.self_influence(train, normalize=True)
    whitened = tracin.Whitening.fit(train, damping=0.1).apply(full_set(rng, 3, [4], None))
    with pytest.raises(ValueError, match="does not combine with whitened gradients") as refused:
        tracin.top_k(whitened, train, 2, normalize=True)
    # review108 F2: the side named is the one whitened (it was "the test side" whichever was)
    assert "the test side is whitened and the train side is not" in str(refused.value)
    assert refused.value.sides == ("test",)
    with pytest.raises(ValueError, match="the train side is whitened and the test side is not") as refused:
        tracin.scores(full_set(rng, 3, [4], None), whitened, normalize=True)
    assert refused.value.sides == ("train",)
    assert tracin.top_k(whitened, train, 2).values.shape == (3, 2)
    # review112 F6: both sides whitened (the same whitening) is no "different spaces"; _pair refuses it first
    with pytest.raises(ValueError, match="test and train are both whitened .* whiten only the test side"):
        tracin.top_k(whitened, whitened, 2, normalize=True)
    with pytest.raises(WhitenedNormalizeError, match="does not combine with whitened gradients") as refused:
        _normalize_run(True, whitened, whitened)  # as a caller that checks normalize before the pair
    assert refused.value.sides == ("test", "train") and "different spaces" not in str(refused.value)
    assert (
        "both sides are whitened, which is refused with normalize=False too: the whitening applies once, to the "
        "test side; whiten only the test side (Whitening.apply)" in str(refused.value)
    )
    two_layers = factored_set(rng, 4, [(2, 3), (4, 5)], None, checkpoints=1)
    one_layer = factored_set(rng, 6, [(2, 3), (4, 5)], None, checkpoints=2)
    with pytest.raises(ValueError, match="same grouping on both sides"):
        tracin.scores(two_layers, one_layer, normalize=True)


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_huge_weight_times_train_norm_is_refused_and_scaling_the_rows_down_cures_it(rng, device):
    """Cosine scores meet train rows as they are up to norm 2^64 (README): weight 1e30 with rows of
    norm ~3e10 overflows float32 (refused, as documented), and the same rows scaled down by 1e10 (the
    advice) give the same cosines, within the bound of sum |w| = 1e30."""
    if device == "torch:cpu":
        pytest.importorskip("torch")
    test = rng.standard_normal((3, 8)).astype(np.float32)
    train = rng.standard_normal((5, 8)).astype(np.float32)
    t = tracin.Gradients([test], [1e30])
    with pytest.raises(ValueError, match="influence overflowed float32"):
        tracin.scores(t, tracin.Gradients([train * np.float32(1e10)], [1e30]), normalize=True, device=device)
    ours = tracin.scores(t, tracin.Gradients([train], [1e30]), normalize=True, device=device)
    unit = [to_float64(a) / np.linalg.norm(to_float64(a), axis=1, keepdims=True) for a in (test, train)]
    np.testing.assert_allclose(ours, 1e30 * unit[0] @ unit[1].T, rtol=0, atol=1e-5 * 1e30)


def test_digests_not_dividing_the_slots_group_nothing(rng):
    # 8 slots but 3 checkpoint digests: the metadata does not say how slots group into checkpoints,
    # so each slot is normalised alone (run 1), not in runs of 8 // 3 = 2 slots.
    w = [1.0, 0.5, 2.0, 0.25, 1.5, 1.0, 0.75, 3.0]
    meta = {"fingerprints": {"checkpoints": ["c0", "c1", "c2"]}}
    test, train = full_set(rng, 4, [3] * 8, w), full_set(rng, 9, [3] * 8, w)
    test = tracin.Gradients(test.matrices, w, metadata=meta)
    train = tracin.Gradients(train.matrices, w, metadata=meta)
    assert _normalize_run(True, test, train) == 1
    exact, bound = cosine_reference(test.matrices, train.matrices, w, 1)
    assert_within(tracin.scores(test, train, normalize=True), exact, bound)
