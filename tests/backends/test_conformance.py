"""Every registered backend, one (test chunk, train piece) pair at a time, against the float64
NumPy reference: the contract of tracin.backends.Backend that the generic loop relies on."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from reference import score_bound
from tracin import backends

from .numpy_reference import NumpyReference, normalized, side_float64

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
REFERENCE = NumpyReference()


TORCH_BACKENDS = ("torch:cpu", "cuda")


@pytest.fixture(params=[*backends.names(), *(f"{name} tiled" for name in TORCH_BACKENDS)])
def backend(request, monkeypatch):
    """Every registered backend; the torch ones also with tiles of a few rows (several train tiles
    and test blocks per call, so that streaming and merging across tiles are exercised)."""
    name, _, tiled = request.param.partition(" ")
    if name in TORCH_BACKENDS:
        torch = pytest.importorskip("torch")
        if name == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (.ci/gpu-check runs these)")
    if tiled:
        from tracin import _tunables

        monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 1000)
        monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 1000)
        monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 300)
    return backends.get(name)


def pair(rng, m: int, n: int, dims: list[int], dtype=np.float32, factored=False, integers=False):
    """(test side, train side) as KernelSides of random (or small-integer) rows."""

    def rows(count: int, d: int):
        x = rng.standard_normal((count, d))
        return (np.round(2 * x) if integers else x).astype(dtype)

    if factored:
        make = lambda count: tracin.FactoredGradients(  # noqa: E731
            [rows(count, d) for d in dims], [rows(count, d + 2) for d in dims]
        )
    else:
        make = lambda count: tracin.Gradients([rows(count, d) for d in dims])  # noqa: E731
    return make(m).kernel_side(), make(n).kernel_side()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("factored", [False, True])
def test_scores_aggregate_and_self_influence_within_the_bound(backend, rng, dtype, factored):
    test, train = pair(rng, 13, 70, [9, 33], DTYPES[dtype], factored)
    w = [0.7, -1.3]
    exact = REFERENCE._exact(test, train, w)
    bound = score_bound(side_float64(test), side_float64(train), w)
    got = backend.scores(test, train, w, num_threads=2)
    assert got.dtype == np.float32 and got.shape == (13, 70)
    assert np.all(np.abs(got - exact) <= bound)
    total = backend.aggregate(test, train, w, num_threads=2)
    assert total.dtype == np.float64 and total.shape == (70,)
    assert np.all(np.abs(total - exact.sum(0)) <= bound.sum(0))
    own = backend.self_influence(train, w, num_threads=2)
    own_exact = sum(c * (x**2).sum(1) for c, x in zip(w, side_float64(train), strict=True))
    assert own.dtype == np.float32 and own.shape == (70,)
    assert np.all(
        np.abs(own - own_exact)
        <= 1e-5 * sum(abs(c) * (x**2).sum(1) for c, x in zip(w, side_float64(train), strict=True))
    )


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
@pytest.mark.parametrize("k", [1, 6, 50])
def test_top_k_of_exact_scores_with_ties(backend, rng, side, k):
    test, train = pair(rng, 11, 50, [3, 2], integers=True)  # small integers: exact and many ties
    w = [1.0, 0.5]
    got = backend.top_k(test, train, w, k, side, num_threads=2)
    want = REFERENCE.top_k(test, train, w, k, side, num_threads=1)
    assert len(got) == 2
    for g, r in zip(got, want, strict=True):
        assert (g is None) == (r is None)
        if r is not None:
            assert g.values.dtype == np.float32 and g.indices.dtype == np.int64
            np.testing.assert_array_equal(g.indices, r.indices)
            np.testing.assert_array_equal(g.values, r.values)


def test_results_do_not_depend_on_the_thread_count(backend, rng):
    test, train = pair(rng, 40, 300, [130, 7])
    w = [0.3, 2.0]

    def arrays(result) -> list[np.ndarray]:
        return [a for part in result for a in part] if isinstance(result, tuple) else [result]

    for call in (
        lambda t: backend.scores(test, train, w, num_threads=t),
        lambda t: backend.top_k(test, train, w, 9, "both", num_threads=t),
        lambda t: backend.aggregate(test, train, w, num_threads=t),
        lambda t: backend.self_influence(train, w, num_threads=t),
    ):
        for a, b in zip(arrays(call(1)), arrays(call(3)), strict=True):
            np.testing.assert_array_equal(a, b)


def test_empty_pieces(backend, rng):
    test, train = pair(rng, 0, 5, [4])
    assert backend.scores(test, train, [1.0], num_threads=1).shape == (0, 5)
    assert backend.aggregate(test, train, [1.0], num_threads=1).tolist() == [0.0] * 5
    test, train = pair(rng, 3, 0, [4])
    prop, opp = backend.top_k(test, train, [1.0], 0, "both", num_threads=1)
    assert prop.values.shape == opp.indices.shape == (3, 0)
    assert backend.self_influence(train, [1.0], num_threads=1).shape == (0,)


def test_non_finite_rows_and_overflow_are_value_errors(backend, rng):
    test, train = pair(rng, 3, 20, [4, 6])
    train.blocks[1][7, 2] = np.nan
    for call in (
        lambda: backend.scores(test, train, [1.0, 1.0], num_threads=1),
        lambda: backend.top_k(test, train, [1.0, 1.0], 3, "both", num_threads=1),
        lambda: backend.aggregate(test, train, [1.0, 1.0], num_threads=1),
        lambda: backend.self_influence(train, [1.0, 1.0], num_threads=1),
    ):
        with pytest.raises(ValueError, match="NaN or Inf"):
            call()
    big = tracin.Gradients(np.full((2, 4), 3e38, np.float32)).kernel_side()
    with pytest.raises(ValueError, match="overflowed float32"):
        backend.scores(big, big, [1.0], num_threads=1)


def cosine_pair(rng, factored: bool, dtype=np.float32):
    """(test, train) KernelSides of 4 checkpoint slots with zero rows: test row 3 and train row 10
    everywhere, train row 11 in slots 0 and 1 only (one run of 2, or two runs of 1)."""
    test, train = pair(rng, 13, 70, [9, 33, 5, 300], dtype, factored=factored)
    per = 2 if factored else 1
    for b in test.blocks:
        b[3] = 0
    for b in train.blocks:
        b[10] = 0
    for b in train.blocks[: 2 * per]:
        b[11] = 0
    return test, train


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("run", [1, 2, 4])
def test_cosine_scores_top_k_and_aggregate_within_the_bound(backend, rng, factored, run, dtype):
    test, train = cosine_pair(rng, factored, DTYPES[dtype])
    w = [[0.7, -1.3, 0.4, 2.0], [0.7, 0.7, -2.0, -2.0], [1.5] * 4][[1, 2, 4].index(run)]
    # independent float64 reference: rows divided by their norm over each run of slots
    t64, x64 = normalized(side_float64(test), run), normalized(side_float64(train), run)
    exact = sum(c * a @ b.T for c, a, b in zip(w, t64, x64, strict=True))
    bound = score_bound(t64, x64, w)
    assert np.abs(exact).max() <= sum(abs(c) for c in w) / run + 1e-12  # cosines: at most the weights
    got = backend.scores(test, train, w, num_threads=2, normalize=run)
    assert got.dtype == np.float32 and np.all(np.abs(got - exact) <= bound)
    assert np.all(got[3] == 0) and np.all(got[:, 10] == 0)  # zero gradients score 0
    plain = backend.scores(test, train, w, num_threads=2)
    assert not np.allclose(plain, got)  # normalising changed something
    total = backend.aggregate(test, train, w, num_threads=2, normalize=run)
    assert np.all(np.abs(total - exact.sum(0)) <= bound.sum(0))
    prop, opp = backend.top_k(test, train, w, 5, "both", num_threads=2, normalize=run)
    for found, sign in ((prop, 1), (opp, -1)):
        chosen = np.take_along_axis(exact, found.indices, 1)
        assert np.all(np.abs(found.values - chosen) <= np.take_along_axis(bound, found.indices, 1))
        kth = np.sort(sign * exact, axis=1)[:, ::-1][:, 4:5]  # the exact k-th best, up to the bound
        assert np.all(sign * chosen >= kth - 2 * bound.max(axis=1, keepdims=True))


def test_cosine_scores_do_not_depend_on_the_thread_count(backend, rng):
    test, train = cosine_pair(rng, factored=True)
    w = [0.3, 0.3, 2.0, 2.0]
    for call in (
        lambda t: [backend.scores(test, train, w, num_threads=t, normalize=2)],
        lambda t: [a for part in backend.top_k(test, train, w, 9, "both", num_threads=t, normalize=2) for a in part],
        lambda t: [backend.aggregate(test, train, w, num_threads=t, normalize=2)],
    ):
        for a, b in zip(call(1), call(3), strict=True):
            np.testing.assert_array_equal(a, b)


def test_cosine_scores_of_non_finite_rows_are_value_errors(backend, rng):
    test, train = cosine_pair(rng, factored=False)
    train.blocks[2][7, 2] = np.inf  # its inverse norm is 0: the error must not vanish with it
    with pytest.raises(ValueError, match="NaN or Inf"):
        backend.scores(test, train, [1.0] * 4, num_threads=1, normalize=2)
    test.blocks[0][1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        backend.top_k(test, train, [1.0] * 4, 3, "both", num_threads=1, normalize=1)
