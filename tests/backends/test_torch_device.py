"""The torch backend through the public functions on the CPU (device="torch:cpu"): the code path of
device="cuda" (tiles, host rows staged through two buffers, top-k merged across tiles and pieces,
both sides, ties) against the C++ kernel and float64 NumPy; device= placement and its errors."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

import tracin
from reference import exact_scores, factored_to_full, score_bound
from tracin import _tunables, backends
from tracin._arrays import as_matrix
from tracin.backends import _torch_rows, _torch_topk, placement, torch_device
from tracin.gradients import GradientSet, KernelSide

from .numpy_reference import normalized

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 512 bytes of train rows and at most 200 scores: many tiles and test blocks per call."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 512)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 512)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 200)


def stable_top_k(exact: np.ndarray, k: int, sign: int) -> np.ndarray:
    """Indices of the k best per row (sign -1: largest first), ties to the smaller index."""
    return np.argsort(sign * exact, axis=1, kind="stable")[:, :k]


def test_top_k_equals_the_cpu_kernel_on_tie_free_data(rng, small_tiles):
    test = [rng.standard_normal((23, 16)).astype(np.float32), rng.standard_normal((23, 5)).astype(np.float32)]
    train = [rng.standard_normal((700, 16)).astype(np.float32), rng.standard_normal((700, 5)).astype(np.float32)]
    t, x = tracin.Gradients(test, [0.3, -1.2]), tracin.Gradients(train, [0.3, -1.2])
    ours = tracin.top_k(t, x, k=40, side="both", device="torch:cpu")
    kernel = tracin.top_k(t, x, k=40, side="both", device="cpu")
    exact, bound = exact_scores(test, train, [0.3, -1.2]), score_bound(test, train, [0.3, -1.2])
    for got, want in zip(ours, kernel, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        assert got.values.dtype == np.float32 and got.indices.dtype == np.int64
        assert np.all(
            np.abs(got.values - np.take_along_axis(exact, got.indices, 1)) <= np.take_along_axis(bound, got.indices, 1)
        )


@pytest.mark.parametrize("k", [1, 7, 300, 1000])
def test_top_k_follows_the_tie_rule_on_tied_data(rng, small_tiles, k):
    """Small integers: exact scores with many ties, at every tile and piece boundary."""
    test = np.round(rng.standard_normal((9, 3))).astype(np.float32)
    train = np.round(rng.standard_normal((300, 3))).astype(np.float32)
    exact = exact_scores([test], [train], [1.0])
    both = tracin.top_k(test, train, k=k, side="both", device="torch:cpu")
    for got, sign in ((both.proponents, -1), (both.opponents, 1)):
        order = stable_top_k(exact, min(k, 300), sign)
        assert got.indices.shape == (9, min(k, 300))  # k > n: n columns
        np.testing.assert_array_equal(got.indices, order)
        np.testing.assert_array_equal(got.values, np.take_along_axis(exact, order, 1))
    one = tracin.top_k(test, train, k=k, side="opponents", device="torch:cpu")
    np.testing.assert_array_equal(one.indices, both.opponents.indices)


def test_keys_order_by_value_then_smaller_index():
    values = torch.tensor([[-np.inf, -3.5, -0.0, 0.0, 1e-45, 2.0, 2.0, np.float32(3e38)]], dtype=torch.float32)
    indices = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]])
    for side, expected in (("proponents", [0, 1, 2, 3, 4, 5, 6, 7]), ("opponents", [7, 6, 4, 5, 3, 1, 2, 0])):
        _, order = _torch_topk.best(values, indices, 8, side)
        assert order[0].tolist() == expected, side


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_rows_widen_exactly(rng, small_tiles, dtype):
    cast = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    test, train = rng.standard_normal((6, 12)).astype(cast), rng.standard_normal((90, 12)).astype(cast)
    exact, bound = exact_scores([test], [train], [0.5]), score_bound([test], [train], [0.5])
    t, x = tracin.Gradients(test, [0.5]), tracin.Gradients(train, [0.5])
    assert np.all(np.abs(tracin.scores(t, x, device="torch:cpu") - exact) <= bound)
    both = tracin.top_k(t, x, k=90, side="both", device="torch:cpu")
    np.testing.assert_array_equal(both.proponents.indices, tracin.top_k(t, x, k=90, device="cpu").indices)
    own = 0.5 * (train.astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(tracin.self_influence(x, device="torch:cpu"), own, rtol=1e-5)


def test_host_rows_on_the_cpu_device_are_copied_once_and_aggregate_widens_slices(rng, small_tiles, monkeypatch):
    """review173: torch:cpu peaked about two tiles above device "cpu" on a float32 memmap: each tile was
    copied into a host buffer and again into a "device" buffer, and aggregate widened whole tiles to
    float64. Now a CPU device's slots are their host buffers, and aggregate's float64 copies hold at
    most _NORM_SLICE values (here 3 rows of a tile's 10), with the sums of float64 NumPy."""
    from tracin.backends import _torch_rows

    staging = _torch_rows._Staging(((0, 12, 0),), 10, torch.device("cpu"))
    assert all(d is h for slot in range(2) for d, h in zip(staging.dev[slot], staging.host[slot], strict=True))
    monkeypatch.setattr(torch_device, "_NORM_SLICE", 3 * 12)
    widened, double = [], torch.Tensor.double

    def recording_double(tensor):
        widened.append(tensor.numel())
        return double(tensor)

    monkeypatch.setattr(torch.Tensor, "double", recording_double)
    test, train = rng.standard_normal((5, 12), dtype=np.float32), rng.standard_normal((95, 12), dtype=np.float32)
    exact, bound = exact_scores([test], [train], [1.5]), score_bound([test], [train], [1.5])
    got = tracin.aggregate(tracin.Gradients(test, [1.5]), tracin.Gradients(train, [1.5]), device="torch:cpu")
    assert np.all(np.abs(got - exact.sum(0)) <= bound.sum(0))
    assert widened and max(widened) <= 3 * 12


def test_factored_sets(rng, small_tiles):
    left_t, right_t = [rng.standard_normal((7, 3), dtype=np.float32)], [rng.standard_normal((7, 6), dtype=np.float32)]
    left_x, right_x = [rng.standard_normal((60, 3), dtype=np.float32)], [rng.standard_normal((60, 6), dtype=np.float32)]
    t = tracin.FactoredGradients(left_t, right_t, [2.0])
    x = tracin.FactoredGradients(left_x, right_x, [2.0])
    full_t, full_x = factored_to_full(left_t, right_t), factored_to_full(left_x, right_x)
    exact, bound = exact_scores(full_t, full_x, [2.0]), score_bound(full_t, full_x, [2.0])
    assert np.all(np.abs(tracin.scores(t, x, device="torch:cpu") - exact) <= bound)
    assert np.all(np.abs(tracin.aggregate(t, x, device="torch:cpu") - exact.sum(0)) <= bound.sum(0))
    got = tracin.top_k(t, x, k=8, side="both", device="torch:cpu")
    np.testing.assert_array_equal(got.proponents.indices, stable_top_k(exact, 8, -1))
    np.testing.assert_array_equal(got.opponents.indices, stable_top_k(exact, 8, 1))
    own = 2.0 * (full_x[0] ** 2).sum(1)
    np.testing.assert_allclose(tracin.self_influence(x, device="torch:cpu"), own, rtol=1e-5)


@pytest.mark.parametrize(
    ("w", "test_scale", "train_scale"),
    [(1e45, 1e-6, 1e-6), (1e-30, 1e-12, 1e25), (1e-44, 1.0, 1e20), (1e-50, 1.0, 1e30)],
)
def test_weights_beyond_float32_keep_the_bound(rng, small_tiles, w, test_scale, train_scale):
    """Every score is a normal float32, but the weight is not one (1e45: torch refused to make it a
    float32 GEMM factor with a RuntimeError; 1e-50 rounded to 0, 1e-44 to a subnormal: errors up to
    7e4 x the bound): test rows times 2^k (|w| in [2^k, 2^(k+1))) and, for rows whose weighted values
    leave float32's comfortable range, by 2^-e_r, the GEMM taking w / 2^k and each row multiplied
    back by 2^e_r. Full and factored scores and top_k against float64."""
    test = [(rng.standard_normal((5, 16)) * test_scale).astype(np.float32)]
    train = [(rng.standard_normal((60, 16)) * train_scale).astype(np.float32)]
    exact, bound = exact_scores(test, train, [w]), score_bound(test, train, [w])
    t, x = tracin.Gradients(test, [w]), tracin.Gradients(train, [w])
    assert np.all(np.abs(tracin.scores(t, x, device="torch:cpu") - exact) <= bound)
    got = tracin.top_k(t, x, k=6, side="both", device="torch:cpu")
    for side in got:
        chosen = np.take_along_axis(exact, side.indices, 1)
        assert np.all(np.abs(side.values - chosen) <= np.take_along_axis(bound, side.indices, 1))
    ones = [np.ones((5, 1), np.float32)], [np.ones((60, 1), np.float32)]
    ft, fx = tracin.FactoredGradients(test, ones[0], [w]), tracin.FactoredGradients(train, ones[1], [w])
    assert np.all(np.abs(tracin.scores(ft, fx, device="torch:cpu") - exact) <= bound)


@pytest.mark.parametrize(
    ("w", "scales"),
    [([1e-30, 1e45], [1e18, 1e-19]), ([1e-31, 1e-50], [1e-3, 1e18]), ([1e-40, 1.0, 1e-45], [1e15, 1e-5, 1e17])],
)
def test_weights_far_apart_keep_the_bound(rng, small_tiles, w, scales):
    """Weights far apart (review21 cases B, C): one exponent from the largest |w| made the small
    weight's w / 2^e a subnormal float32 or 0 (errors 1e3 to 5e4 x the bound); each checkpoint's test
    rows now take its own 2^k, as the C++ kernel packs w_c x value. Full and factored scores and top_k
    against float64."""
    test = [(rng.standard_normal((5, 16)) * s).astype(np.float32) for s in scales]
    train = [(rng.standard_normal((60, 16)) * s).astype(np.float32) for s in scales]
    exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
    t, x = tracin.Gradients(test, w), tracin.Gradients(train, w)
    assert np.all(np.abs(tracin.scores(t, x, device="torch:cpu") - exact) <= bound)
    got = tracin.top_k(t, x, k=6, side="both", device="torch:cpu")
    for side in got:
        chosen = np.take_along_axis(exact, side.indices, 1)
        assert np.all(np.abs(side.values - chosen) <= np.take_along_axis(bound, side.indices, 1))
    ones_t, ones_x = [np.ones((5, 1), np.float32)] * len(w), [np.ones((60, 1), np.float32)] * len(w)
    ft, fx = tracin.FactoredGradients(test, ones_t, w), tracin.FactoredGradients(train, ones_x, w)
    assert np.all(np.abs(tracin.scores(ft, fx, device="torch:cpu") - exact) <= bound)


def test_scores_beyond_float32_are_a_value_error(rng):
    """w = 1e300 on rows of 1e-20: scores near 1e260, beyond float32 (a RuntimeError from torch before)."""
    test, train = rng.standard_normal((3, 8)).astype(np.float32) * 1e-20, rng.standard_normal((9, 8)).astype(np.float32)
    for call in (tracin.scores, lambda t, x, device: tracin.top_k(t, x, k=2, device=device)):
        with pytest.raises(ValueError, match="overflowed float32 although every input is finite"):
            call(tracin.Gradients([test], [1e300]), tracin.Gradients([train * 1e-20], [1e300]), device="torch:cpu")


def _two_checkpoints(big: float, small: float, w: list[float], factored: bool, train: list[np.ndarray] | None = None):
    """Gradients (or factored ones, right factors of ones) of one test row of 4 values `big` in
    checkpoint 0 and `small` in checkpoint 1, and of train rows `train` (default: zeros, then rows of
    1s and of 2s)."""
    test = [np.full((1, 4), big, np.float32), np.full((1, 4), small, np.float32)]
    if train is None:
        train = [np.zeros((2, 4), np.float32), np.array([[1.0] * 4, [2.0] * 4], np.float32)]
    if not factored:
        return test, train, tracin.Gradients(test, w), tracin.Gradients(train, w)
    ones_t, ones_x = [np.ones((1, 1), np.float32)] * 2, [np.ones((len(train[0]), 1), np.float32)] * 2
    return test, train, tracin.FactoredGradients(test, ones_t, w), tracin.FactoredGradients(train, ones_x, w)


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize(
    ("big", "small", "w", "normalize"),
    [
        (1e30, 1e-20, [1e30, 1.0], False),  # review107 F1: 1e-20 / 2^99 packs as 0 (scores 0 for 4e-20)
        (3e38, 1e-35, [2.0, 2.0], False),  # weights near 1: the rows were left in place, unweighted
        (1.0, 1.0, [1e60, 1e-12], True),  # unit rows: 5e-13 / 2^98 keeps 11 bits, rounded by 9e-5 of itself
    ],
)
def test_a_row_whose_lowering_would_lose_another_checkpoint_overflows_as_on_the_cpu_kernel(
    factored, big, small, w, normalize
):
    """A test row whose weighted values overflow float32 in checkpoint 0 is not lowered by 2^e_r when
    that would round a value of the row that is a normal float32 unshifted (checkpoint 1's) by more
    than 2^-20 of itself (to 0 in the first case): it is packed as it is, and the call is the overflow
    error of the C++ kernel (review107 F1, csrc/src/engine.cpp ShiftLosesBits), naming no pair as the
    kernel's packing does. Before,
    torch:cpu lowered the row and scored without checkpoint 1 (scores 0 for an exact 4e-20, top_k
    ranking the smaller one first) or with it rounded to a subnormal. Scores and top_k, full and factored,
    plain and cosine (train rows 1e-35 in checkpoint 0: cosine scores near 7e24)."""
    train = None
    if normalize:
        train = [np.full((2, 4), 1e-35, np.float32), np.array([[1.0] * 4, [2.0] * 4], np.float32)]
    _, _, t, x = _two_checkpoints(big, small, w, factored, train)
    calls = {
        "scores": lambda device: tracin.scores(t, x, device=device, normalize=normalize),
        "top_k": lambda device: tracin.top_k(t, x, k=1, side="both", device=device, normalize=normalize),
    }
    for name, call in calls.items():
        for device in ("cpu", "torch:cpu"):
            with pytest.raises(ValueError, match="^influence overflowed float32 although every input is finite") as e:
                call(device)
            assert "first for test row" not in str(e.value), (name, device, str(e.value))


@pytest.mark.parametrize("factored", [False, True])
def test_a_row_lowered_to_subnormals_that_lose_no_bit_is_scored_exactly_as_on_the_cpu_kernel(factored):
    """review112 F3: w = [2^100, 1], test [2^30] / [2^-100], train [2^-60] / [2^90]: lowering the row
    by 2^30 (2^130 to 2^100) takes 2^-100 to 2^-130, a subnormal that holds it exactly, so the row is
    lowered (e_r = 30) and scored, not refused: 2^70 + 2^-10 rounds to the float32 2^70 on both
    backends, scores and top_k. 1f9a0db / 6ea28e8 refused any lowering that made a normal value
    subnormal (the overflow error on both)."""
    w = [2.0**100, 1.0]
    test = [np.array([[2.0**30]], np.float32), np.array([[2.0**-100]], np.float32)]
    train = [np.array([[2.0**-60]], np.float32), np.array([[2.0**90]], np.float32)]
    if factored:
        ones = [np.ones((1, 1), np.float32)] * 2
        t, x = tracin.FactoredGradients(test, ones, w), tracin.FactoredGradients(train, ones, w)
    else:
        t, x = tracin.Gradients(test, w), tracin.Gradients(train, w)
    exact = np.float32(2.0**70 + 2.0**-10)
    for device in ("cpu", "torch:cpu"):
        assert tracin.scores(t, x, device=device)[0, 0] == exact, device
        assert tracin.top_k(t, x, k=1, device=device).values[0, 0] == exact, device
    prepared = torch_device._DeviceTest.upload(t.kernel_side(), torch.device("cpu"), 0, w)
    assert prepared.exponents.tolist() == [30] and prepared.overflowing is None


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize(
    ("small", "scored"),
    [
        (2.0**-99 * (1 + 5 * 2**-23), True),  # to 2^-129 (21 bits): 3 bits lost, 3 x 2^-23 of itself
        (2.0**-100 * (1 + 2**-23), True),  # to 2^-130 (20 bits): 4 bits lost, 2^-23 of itself
        (2.0**-101 * (1 + 8 * 2**-23), True),  # 5 bits lost, 8 x 2^-23 / (1 + 8 x 2^-23): within 2^-20
        (2.0**-101 * (1 + 9 * 2**-23), False),  # 5 bits lost, 9 x 2^-23 / (1 + 9 x 2^-23): beyond 2^-20
        (2.0**-106 * (1 + 2**-15), False),  # to 2^-136 (14 bits): 10 bits lost, 2^-15 of itself
        (2.0**-125, False),  # to 2^-155: 0
    ],
)
def test_a_row_lowered_where_its_values_round_within_2_to_the_minus_20_keeps_the_bound_as_on_the_cpu_kernel(
    factored, small, scored
):
    """review112 W2: w = [2^100, 1], test [2^30] / [small], train [0] / [2^90] (checkpoint 1 carries the
    whole score, its bound 1e-5 of it). Lowering the row by 2^30 (2^130 to 2^100) rounds `small` to a
    subnormal; while that is within 2^-20 of itself (csrc/src/engine.cpp ShiftLosesBits,
    _lowering_loses_values), the row is lowered (e_r = 30) and scored within the bound against float64,
    scores and top_k, on both backends; beyond (or to 0) both refuse it with the overflow error of its
    unlowered 2^130, naming no pair. Before (32eaeb6), any lost bit was refused."""
    w = [2.0**100, 1.0]
    test = [np.array([[2.0**30]], np.float32), np.array([[small]], np.float32)]
    assert float(test[1][0, 0]) == small
    train = [np.zeros((1, 1), np.float32), np.array([[2.0**90]], np.float32)]
    if factored:
        ones = [np.ones((1, 1), np.float32)] * 2
        t, x = tracin.FactoredGradients(test, ones, w), tracin.FactoredGradients(train, ones, w)
    else:
        t, x = tracin.Gradients(test, w), tracin.Gradients(train, w)
    exact = small * 2.0**90
    for device in ("cpu", "torch:cpu"):
        if not scored:
            with pytest.raises(ValueError, match="^influence overflowed float32 although every input is finite") as e:
                tracin.scores(t, x, device=device)
            assert "first for test row" not in str(e.value), device
            continue
        assert abs(float(tracin.scores(t, x, device=device)[0, 0]) - exact) <= 1e-5 * exact, device
        assert abs(float(tracin.top_k(t, x, k=1, device=device).values[0, 0]) - exact) <= 1e-5 * exact, device
    prepared = torch_device._DeviceTest.upload(t.kernel_side(), torch.device("cpu"), 0, w)
    if scored:
        assert prepared.exponents.tolist() == [30] and prepared.overflowing is None
    else:
        assert prepared.exponents is None and prepared.overflowing.tolist() == [0]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("train_zero", [False, True])
def test_a_factored_aggregate_of_a_row_kept_unlowered_sums_in_float64_as_on_the_cpu_kernel(normalize, train_zero):
    """review112 F2: factored, w = [1e30, 1], test left factors 1e30 (checkpoint 0, weighted 1e60) and
    1e-20 (checkpoint 1, which lowering by 2^99 would lose), right factors 1; train left factors 1e-30
    (or 0) and 1. The row is kept unlowered and its packing overflows; the C++ kernel's aggregate then
    sums in float64 (api.cpp ExactFactoredSums), and so does the torch backend's (_exact_factored_sums):
    the exact 6e30 (6e-20 where checkpoint 0's train factors are 0, which lowering lost), cosine too
    (1e30 + 1, or 1).
    After 6ea28e8 torch:cpu raised the overflow error where the C++ kernel answered."""
    w = [1e30, 1.0]
    left = [np.full((1, 3), 1e30, np.float32), np.full((1, 3), 1e-20, np.float32)]
    right = [np.ones((1, 2), np.float32)] * 2
    train_left = [np.full((2, 3), 0.0 if train_zero else 1e-30, np.float32), np.ones((2, 3), np.float32)]
    train_right = [np.ones((2, 2), np.float32)] * 2
    t, x = tracin.FactoredGradients(left, right, w), tracin.FactoredGradients(train_left, train_right, w)
    terms = [  # per checkpoint: w_c (L_t . L_i)(R_t . R_i) and the squared norms of both rows
        (
            c_w * float(lt.astype(np.float64) @ li[0].astype(np.float64)) * 2.0,
            float(np.sum(lt.astype(np.float64) ** 2)) * 2.0,
            float(np.sum(li[0].astype(np.float64) ** 2)) * 2.0,
        )
        for c_w, lt, li in zip(w, [v[0] for v in left], train_left, strict=True)
    ]
    if normalize:  # each checkpoint's rows unit-normalised (a zero row scores 0): 1e30 cos + cos
        exact = sum(p / np.sqrt(n_t) / np.sqrt(n_x) for p, n_t, n_x in terms if n_x)
    else:
        exact = sum(p for p, _, _ in terms)
    assert exact > 0
    got = {device: tracin.aggregate(t, x, device=device, normalize=normalize) for device in ("cpu", "torch:cpu")}
    for device, values in got.items():
        np.testing.assert_allclose(values, [exact, exact], rtol=1e-6, err_msg=device)
    prepared = torch_device._DeviceTest.upload(t.kernel_side(), torch.device("cpu"), int(normalize), w)
    if not normalize:
        assert prepared.overflowing is not None  # the row is kept at e_r = 0: its packing overflows


def _factored_aggregate(left, right, train_left, train_right, w) -> np.ndarray:
    """float64 (n,) sum over test rows t and checkpoints c of w_c (L_c(t) . L_c(i)) (R_c(t) . R_c(i))."""
    f64 = [[b.astype(np.float64) for b in side] for side in (left, right, train_left, train_right)]
    return sum(c_w * ((lt @ li.T) * (rt @ ri.T)).sum(0) for c_w, lt, rt, li, ri in zip(w, *f64, strict=True))


def test_a_factored_aggregate_whose_right_factors_product_overflows_sums_in_float64_as_on_the_cpu_kernel():
    """review157 F1: w = [1e-20], factors 1 (left) and 2e25 (right) on both sides: the right factors'
    float32 GEMM (4e50) overflows, the weighted scores (4e30) do not. The C++ kernel's aggregate sums
    such train rows in float64 (api.cpp ExactFactoredSums), and so does the torch backend now (before: the
    overflow error); scores and top_k, which hold the float32 scores, stay the overflow error on both."""
    left, right = [np.ones((2, 1), np.float32)], [np.full((2, 1), 2e25, np.float32)]
    train_left, train_right = [np.ones((3, 1), np.float32)], [np.full((3, 1), 2e25, np.float32)]
    w = [1e-20]
    t, x = tracin.FactoredGradients(left, right, w), tracin.FactoredGradients(train_left, train_right, w)
    exact = _factored_aggregate(left, right, train_left, train_right, w)
    assert np.allclose(exact, 2 * 1e-20 * float(np.float32(2e25)) ** 2, rtol=1e-12)  # 8e30
    for device in ("cpu", "torch:cpu"):
        np.testing.assert_allclose(tracin.aggregate(t, x, device=device), exact, rtol=1e-6, err_msg=device)
        with pytest.raises(ValueError, match="^influence overflowed float32 although every input is finite"):
            tracin.scores(t, x, device=device)


def _overflowing_train_rows(rng, n: int, huge: list[int], zero_left: list[int]):
    """Factored sets of two checkpoints, w = [1e-20, 1] (positive values: no cancellation): 5 test rows,
    right factors near 2e25 in checkpoint 0, and n train rows whose right factors in checkpoint 0 are
    near 1 except in rows `huge` and `zero_left` (near 2e25: the right GEMM overflows float32, the
    weighted scores near 1e30 do not), the rows `zero_left` with zero left factors there (0 x inf: NaN
    scores, an exact score of checkpoint 1 alone). Returns (left, right, train_left, train_right, w)."""
    w = [1e-20, 1.0]
    left = [rng.uniform(0.5, 1.5, (5, 3)).astype(np.float32) for _ in w]
    right = [(rng.uniform(0.5, 1.5, (5, 2)) * s).astype(np.float32) for s in (2e25, 1.0)]
    train_left = [rng.uniform(0.5, 1.5, (n, 3)).astype(np.float32) for _ in w]
    train_right = [rng.uniform(0.5, 1.5, (n, 2)).astype(np.float32) for _ in w]
    train_right[0][huge + zero_left] *= np.float32(2e25)
    train_left[0][zero_left] = 0
    return left, right, train_left, train_right, w


def test_a_factored_aggregate_sums_only_its_overflowing_train_rows_in_float64(rng, small_tiles, monkeypatch):
    """review157 F1: train rows whose float32 scores overflow (or are NaN, 0 x inf) from finite inputs,
    in several tiles, are summed by _exact_factored_sums alone, as the C++ kernel recomputes only those
    rows; the other rows keep the bits of the same call with those rows zero (no fallback). All within
    1e-6 of float64 NumPy and of the C++ kernel. A NaN input is still the non-finite error, no fallback."""
    huge, zero_left = [3, 17, 18, 39], [25]
    left, right, train_left, train_right, w = _overflowing_train_rows(rng, 40, huge, zero_left)
    t = tracin.FactoredGradients(left, right, w)
    x = tracin.FactoredGradients(train_left, train_right, w)
    exact = _factored_aggregate(left, right, train_left, train_right, w)
    assert np.all(exact[huge] > 1e29) and np.all(np.abs(exact) < 1e35)
    calls = []
    fallback = torch_device._exact_factored_sums
    monkeypatch.setattr(
        torch_device,
        "_exact_factored_sums",
        lambda call, test, weights, selected=None: calls.append(selected) or fallback(call, test, weights, selected),
    )
    got = tracin.aggregate(t, x, device="torch:cpu")
    assert len(calls) == 1 and calls[0].tolist() == sorted(huge + zero_left)
    np.testing.assert_allclose(got, exact, rtol=1e-6)
    np.testing.assert_allclose(tracin.aggregate(t, x, device="cpu"), exact, rtol=1e-6)
    zeroed = [b.copy() for b in train_right]
    zeroed[0][huge + zero_left] = 0
    plain = tracin.aggregate(t, tracin.FactoredGradients(train_left, zeroed, w), device="torch:cpu")
    assert len(calls) == 1  # no fallback: every row finite
    kept = np.setdiff1d(np.arange(40), huge + zero_left)
    np.testing.assert_array_equal(got[kept], plain[kept])
    train_left[1][30, 2] = np.nan
    with pytest.raises(
        ValueError, match=r"train left factor of checkpoint 1 contains NaN or Inf values, first in rows \[30\]"
    ):
        tracin.aggregate(t, tracin.FactoredGradients(train_left, train_right, w), device="torch:cpu")
    assert len(calls) == 1


@pytest.mark.parametrize("cause", ["packing", "scores"])
def test_the_float64_fallback_keeps_its_blocks_within_the_score_budget(rng, monkeypatch, cause):
    """review157 F2: _exact_factored_sums cuts train tiles into slices of at most _NORM_SLICE float64
    values and the test rows into slices of a quarter of the normal path's test block (it took
    _NORM_SLICE // d test rows against a whole tile: two (65536 x tile rows) float64 blocks on a GPU,
    48 GB at m=1000). With tiles of 3 train rows, blocks of 4 x 3 float32 scores (12) and _NORM_SLICE
    of 6 (2 rows of 3 columns), every float64 block (counted) is a slice of one test row against at
    most 2 train rows (both budgets binding), each pair of rows meets once, and the rows it sums are
    those of the default budgets; all rows within 1e-6 of float64 NumPy. Both ways in: a test row whose
    packing overflows (every train row; review112 F2) and train rows whose float32 scores overflow."""
    if cause == "packing":  # test row 0's weighted left factor 1e60 is kept unlowered beside 1e-20
        w = [1e30, 1.0]
        left = [rng.uniform(0.5, 1.5, (9, 3)).astype(np.float32) for _ in w]
        left[0][0], left[1][0] = 1e30, 1e-20
        right = [rng.uniform(0.5, 1.5, (9, 2)).astype(np.float32) for _ in w]
        train_left = [rng.uniform(0.5, 1.5, (30, 3)).astype(np.float32) * s for s in (1e-30, 1.0)]
        train_right = [rng.uniform(0.5, 1.5, (30, 2)).astype(np.float32) for _ in w]
        summed = list(range(30))  # the rows _exact_factored_sums sums
    else:
        summed = [*range(0, 30, 3), 7]
        left, right, train_left, train_right, w = _overflowing_train_rows(rng, 30, summed[:-1], summed[-1:])
        summed.sort()
    t = tracin.FactoredGradients(left, right, w)
    x = tracin.FactoredGradients(train_left, train_right, w)
    exact = _factored_aggregate(left, right, train_left, train_right, w)
    default = tracin.aggregate(t, x, device="torch:cpu")
    blocks = []
    pair_block = torch_device._pair_block
    monkeypatch.setattr(torch_device, "_pair_block", lambda a, b: blocks.append((a.shape, b.shape)) or pair_block(a, b))
    monkeypatch.setattr(torch_device, "_NORM_SLICE", 6)  # float64 copies of 2 rows of 3 columns
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 3 * 40)  # tiles of 3 train rows (40 bytes each)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 3 * 40)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 4 * 3)  # normal blocks of 4 test rows: slices of 1
    small = tracin.aggregate(t, x, device="torch:cpu")
    np.testing.assert_allclose(small[summed], default[summed], rtol=1e-12)  # the others: float32 blocks cut anew
    np.testing.assert_allclose(small, exact, rtol=1e-6)
    assert blocks and all(a[0] == 1 and b[0] <= 2 and b[1] <= 3 for a, b in blocks)
    assert ((1, 3), (2, 3)) in blocks and ((1, 3), (1, 3)) in blocks  # a tile's 3 rows: slices of 2 and 1
    # each pair of rows meets once per factor of each checkpoint
    assert sum(a[0] * b[0] for a, b in blocks) == 2 * len(w) * len(left[0]) * len(summed)


@pytest.mark.parametrize("factored", [False, True])
def test_a_row_lowered_beside_values_that_stay_normal_keeps_the_bound(factored):
    """The row of 1e9 x w = 1e30 (1e39, beyond float32) beside 1e-28 in checkpoint 1 is still lowered
    (e_r = 29: 1e-28 / 2^29 stays normal), as on the C++ kernel, and both backends score it within the
    contract of float64 (an exact 4e-28 and 8e-28: checkpoint 0's train rows are zeros); top_k too."""
    w = [1e30, 1.0]
    test, train, t, x = _two_checkpoints(1e9, 1e-28, w, factored)
    exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
    assert np.all(exact > 0) and np.all(bound < 1e-4 * exact)
    for device in ("cpu", "torch:cpu"):
        got = tracin.scores(t, x, device=device)
        assert np.all(np.abs(got - exact) <= bound), (device, got, exact)
        best = tracin.top_k(t, x, k=1, device=device)
        np.testing.assert_array_equal(best.indices, [[1]])
        assert abs(best.values[0, 0] - exact[0, 1]) <= bound[0, 1], device
    prepared = torch_device._DeviceTest.upload(t.kernel_side(), torch.device("cpu"), 0, w)
    assert prepared.exponents.tolist() == [29] and prepared.overflowing is None  # floor(log2(1e39)) - 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("w", "test_scale", "train_scale"),
    [([1e-30], 1e20, 1e20), ([1e-30, 3e-25], 1e22, 1e18), ([1e-30, -2e-28], 1e20, 1e20), ([1e-35], 1e-30, 1e36)],
)
def test_a_dot_product_beyond_float32_under_a_small_weight_is_scored(
    rng, small_tiles, dtype, w, test_scale, train_scale
):
    """The weights go on the test rows before the GEMMs, as in the C++ kernel: rows whose dot products
    exceed float32 (1e40) but whose weighted scores do not (1e10) are scored, not refused with the
    overflow error (before: the GEMM of the raw rows overflowed). Full and factored scores, top_k and
    self_influence against float64; the C++ kernel gives the same scores within the bound, and like it
    refuses factored sets whose right factors' products overflow (the weight is on the left factors)."""
    test = [
        torch.randn(4, 6, generator=torch.Generator().manual_seed(c)).mul(test_scale).to(dtype) for c in range(len(w))
    ]
    train = [
        torch.randn(40, 6, generator=torch.Generator().manual_seed(9 + c)).mul(train_scale).to(dtype)
        for c in range(len(w))
    ]
    test_np, train_np = [t.float().numpy() for t in test], [x.float().numpy() for x in train]
    exact, bound = exact_scores(test_np, train_np, w), score_bound(test_np, train_np, w)
    t, x = tracin.Gradients(test, w), tracin.Gradients(train, w)
    for device in ("torch:cpu", "cpu"):
        assert np.all(np.abs(tracin.scores(t, x, device=device) - exact) <= bound), device
    got = tracin.top_k(t, x, k=6, side="both", device="torch:cpu")
    for side in got:
        chosen = np.take_along_axis(exact, side.indices, 1)
        assert np.all(np.abs(side.values - chosen) <= np.take_along_axis(bound, side.indices, 1))
    np.testing.assert_array_equal(got.proponents.indices, stable_top_k(exact, 6, -1))
    own = exact_scores(train_np, train_np, w).diagonal()
    np.testing.assert_allclose(tracin.self_influence(x, device="torch:cpu"), own, rtol=1e-5)
    ones_t, ones_x = [torch.ones(4, 1, dtype=dtype)] * len(w), [torch.ones(40, 1, dtype=dtype)] * len(w)
    ft, fx = tracin.FactoredGradients(test, ones_t, w), tracin.FactoredGradients(train, ones_x, w)
    assert np.all(np.abs(tracin.scores(ft, fx, device="torch:cpu") - exact) <= bound)
    flipped = tracin.FactoredGradients(ones_t, test, w), tracin.FactoredGradients(ones_x, train, w)
    for device in ("torch:cpu", "cpu"):  # the weight goes on the left factors, whose GEMM is the small one
        if test_scale * train_scale < 1e30:
            assert np.all(np.abs(tracin.scores(*flipped, device=device) - exact) <= bound)
            continue
        with pytest.raises(ValueError, match="overflowed float32 although every input is finite"):
            tracin.scores(*flipped, device=device)


def test_a_zero_weight_beside_a_tiny_one_scores_the_other_checkpoint(rng):
    """Weights [1e-35, 0]: the rows of weight 1e-35 are brought up by 2^119 (e_r); the rows of weight 0
    (1e30) stay as they are, not shifted past float32's range (which made NaN products of factored
    sets: the overflow error). Full and factored scores against float64, as on the C++ kernel."""
    test = [
        (rng.standard_normal((3, 4)) * 1e-30).astype(np.float32),
        (rng.standard_normal((3, 4)) * 1e30).astype(np.float32),
    ]
    train = [(rng.standard_normal((5, 4)) * 1e36).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)]
    w = [1e-35, 0.0]
    exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
    ones_t, ones_x = [np.ones((3, 1), np.float32)] * 2, [np.ones((5, 1), np.float32)] * 2
    for device in ("torch:cpu", "cpu"):
        assert np.all(
            np.abs(tracin.scores(tracin.Gradients(test, w), tracin.Gradients(train, w), device=device) - exact) <= bound
        )
        t, x = tracin.FactoredGradients(test, ones_t, w), tracin.FactoredGradients(train, ones_x, w)
        assert np.all(np.abs(tracin.scores(t, x, device=device) - exact) <= bound)


def test_weights_near_one_leave_test_rows_in_place_and_others_are_exact_powers_of_two(rng):
    """Weights within 2^+-24 of 1 on rows in range: the test blocks are the caller's tensors, used in
    place (no copy), and the GEMMs take the weights. A weight of 1e-30: row r of checkpoint c times
    2^(k_c - e_r) exactly (k_c = -100 for 1e-30; e_r brings each row's largest weighted value, below
    2^-96, to [2^-96, 2^-95): -104 for a row of 1e-30), the GEMM factor w_c / 2^k_c."""
    block = torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32))
    side = KernelSide(False, [block], [0])
    kept = torch_device._DeviceTest.upload(side, torch.device("cpu"), 0, [1e-3])
    assert kept.blocks[0] is block and kept.alphas == [1e-3] and kept.exponents is None
    tiny = block.clone()
    tiny[1] = torch.tensor([1e-30, -5e-31, 0, 2e-31, 1e-31])
    moved = torch_device._DeviceTest.upload(KernelSide(False, [tiny], [0]), torch.device("cpu"), 0, [1e-30])
    k = -100  # 1e-30 in [2^-100, 2^-99)
    largest = np.floor(np.log2(1e-30 * np.abs(tiny.double().numpy()).max(1)))  # each row's, below -96
    e = (largest + 96).astype(np.int64)
    assert e[1] == -104 and moved.exponents.tolist() == e.tolist()
    want = np.ldexp(tiny.double().numpy(), (k - e)[:, None])
    assert moved.blocks[0] is tiny and moved.later[0].tolist() == (k - e).tolist()  # the caller's: shifted per use
    np.testing.assert_array_equal(torch_device._shifted(tiny, moved.later[0]).double().numpy(), want)
    assert moved.alphas == [np.ldexp(1e-30, -k)] and 1 <= moved.alphas[0] < 2
    copied = torch_device._DeviceTest.upload(KernelSide(False, [tiny.bfloat16()], [1]), torch.device("cpu"), 0, [1e-30])
    want = np.ldexp(tiny.bfloat16().double().numpy(), (k - e)[:, None])  # an uploaded copy is replaced at once
    assert copied.later is None
    np.testing.assert_array_equal(copied.blocks[0].double().numpy(), want)


@pytest.mark.parametrize("factored", [False, True])
def test_extreme_weights_copy_one_score_block_of_a_test_set_used_in_place(rng, monkeypatch, factored):
    """Weights [1e-8, 1e-3] (1e-8 beyond 2^+-24 of 1) on float32 test tensors used in place: the powers of
    two go on a copy of one score block's rows of one checkpoint at a time, made before its GEMM, not
    on a copy of the whole test set (before: 2 x 60 x 8 values copied, the set's size, which scoring
    does not count in its device budget). Scores, top_k and aggregate against float64; the scores are
    the same bits as with the test set uploaded (a bfloat16 copy of the same values) and copied whole."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 8 * 40)  # 8 test rows per score block
    copies = []
    shifted = torch_device._shifted
    monkeypatch.setattr(
        torch_device, "_shifted", lambda block, *a: (copies.append(block.numel()), shifted(block, *a))[1]
    )
    w = [1e-8, 1e-3]
    values = [rng.standard_normal((60, 8)).astype(ml_dtypes.bfloat16).astype(np.float32) for _ in w]
    train = [rng.standard_normal((40, 8)).astype(np.float32) for _ in w]
    exact, bound = exact_scores(values, train, w), score_bound(values, train, w)
    test = [torch.from_numpy(v) for v in values]
    if factored:
        ones_t, ones_x = [torch.ones(60, 1)] * 2, [np.ones((40, 1), np.float32)] * 2
        t, x = tracin.FactoredGradients(test, ones_t, w), tracin.FactoredGradients(train, ones_x, w)
    else:
        t, x = tracin.Gradients(test, w), tracin.Gradients(train, w)
    got = tracin.scores(t, x, device="torch:cpu")
    assert copies and max(copies) <= 8 * 8, copies
    assert np.all(np.abs(got - exact) <= bound)
    best = tracin.top_k(t, x, k=5, device="torch:cpu")
    np.testing.assert_array_equal(best.values, np.take_along_axis(got, best.indices, 1))
    np.testing.assert_array_equal(best.indices, stable_top_k(exact, 5, -1))
    total = exact.sum(0)
    assert np.all(np.abs(tracin.aggregate(t, x, device="torch:cpu") - total) <= bound.sum(0) + 1e-6 * np.abs(total))
    assert max(copies) <= 8 * 8
    uploaded = [v.bfloat16() for v in test]  # not float32: copied to the device, folded whole
    t = tracin.FactoredGradients(uploaded, ones_t, w) if factored else tracin.Gradients(uploaded, w)
    copies.clear()
    np.testing.assert_array_equal(tracin.scores(t, x, device="torch:cpu"), got)
    assert copies == [60 * 8] * 2  # each checkpoint's block, once


@pytest.mark.parametrize("w", [[0.0, 1.0], [0.0, 1e-30], [0.0, 1e30]])
def test_a_zero_weight_factored_checkpoint_adds_nothing_even_where_its_product_overflows(w):
    """Factored rows [[1e10]] x [[1e10]] scored against themselves under weights [0, w]: the checkpoint
    of weight 0 (its product 1e40, beyond float32) adds 0, as in the C++ kernel (whose weighted left
    rows are 0), where before torch:cpu raised the overflow error (inf x 0 = NaN). As there, a weight-0
    checkpoint whose right factors' product overflows is refused, NaN test rows under weight 0 are
    named, and all weights 0 give +0."""
    big, one = np.array([[1e10]], np.float32), np.array([[1.0]], np.float32)
    t = tracin.FactoredGradients([big, one], [big, one], w)
    exact = np.float64(w[1])
    for device in ("torch:cpu", "cpu"):
        assert tracin.scores(t, t, device=device)[0, 0] == np.float32(exact), device
        assert tracin.aggregate(t, t, device=device)[0] == np.float32(exact), device
        assert tracin.top_k(t, t, k=1, device=device).values[0, 0] == np.float32(exact), device
        right = tracin.FactoredGradients([one, one], [np.array([[1e20]], np.float32), one], w)
        with pytest.raises(ValueError, match="overflowed float32 although every input is finite"):
            tracin.scores(right, right, device=device)
        nan = tracin.FactoredGradients([np.array([[np.nan]], np.float32), one], [one, one], w)
        with pytest.raises(ValueError, match=r"test left factor of checkpoint 0 contains NaN or Inf values"):
            tracin.scores(nan, tracin.FactoredGradients([one, one], [one, one], w), device=device)
        zero = tracin.FactoredGradients([big, one], [big, one], [0.0, 0.0])
        assert not np.signbit(tracin.scores(zero, zero, device=device)[0, 0]), device


def test_a_non_finite_test_row_under_a_small_weight_is_named(rng):
    """The weighted copy of the test rows keeps the NaN / Inf report of the caller's rows and numbers."""
    test = rng.standard_normal((6, 4)).astype(np.float32)
    test[[2, 5], 1] = [np.nan, np.inf]
    train = rng.standard_normal((9, 4)).astype(np.float32)
    for device in ("torch:cpu", "cpu"):
        with pytest.raises(ValueError, match=r"test checkpoint 0 contains NaN or Inf values, first in rows \[2, 5\]"):
            tracin.scores(tracin.Gradients([test], [1e-30]), tracin.Gradients([train], [1e-30]), device=device)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_store_streams_in_chunks_and_tiles(rng, tmp_path, small_tiles, dtype):
    """A store read in memory-mapped chunks (read-only), each cut into tiles staged through the two
    buffers, as on a GPU; test side a store too."""
    w = [0.1, 0.02]
    train = [rng.standard_normal((333, 8)).astype(np.float32), rng.standard_normal((333, 4)).astype(np.float32)]
    test = [rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((20, 4)).astype(np.float32)]
    stores = []
    for name, rows in (("train", train), ("test", test)):
        writer = tracin.GradientStore.create(tmp_path / name, len(rows[0]), [8, 4], w, dtype)
        for c, block in enumerate(rows):
            writer.write(c, 0, block)
        writer.finalize()
        stores.append(tracin.GradientStore.open(tmp_path / name, chunk_bytes=700))
    store_x, store_t = stores
    both = tracin.top_k(store_t, store_x, k=50, side="both", device="torch:cpu")
    kernel = tracin.top_k(store_t, store_x, k=50, side="both", device="cpu")
    for got, want in zip(both, kernel, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(
        tracin.aggregate(store_t, store_x, device="torch:cpu"),
        tracin.aggregate(store_t, store_x, device="cpu"),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        tracin.self_influence(store_x, device="torch:cpu"), tracin.self_influence(store_x, device="cpu"), rtol=1e-5
    )


def scaled_rows(rng, n: int, d: int, scales: list[float]) -> np.ndarray:
    """(n, d) float32 normal rows, row i times scales[i % len(scales)] (tiny ones partly subnormal)."""
    return (rng.standard_normal((n, d)) * np.resize(scales, n)[:, None]).astype(np.float32)


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("run", [1, 2])
def test_cosine_scores_of_rows_of_extreme_norms(rng, small_tiles, factored, run):
    """normalize=True on rows of norms from 1e-44 (subnormal values) to 1e37: scores, top_k and
    aggregate within the bound of float64 NumPy (rows of norm below about 3e-39 overflowed float32
    before, and factored rows of a large norm or unbalanced factors overflowed their GEMMs)."""
    w = [0.7, -1.3]
    meta = {"fingerprints": {"checkpoints": ["a"] * (2 // run)}}
    if factored:  # row scales of the left and right factors at checkpoints 0 and 1: tiny and huge
        # products, unbalanced factors, checkpoints of a run 1e-20 apart (not so far that cosines of 1e-5
        # of their scale fall below float32's normal range)
        left = [[1e-40, 1e-20, 1.0, 1e-30, 1e18, 1e-30], [1e-40, 1e-30, 1.0, 1e25, 1e18, 1e-20]]
        right = [[1e-40, 1e-30, 1.0, 1e25, 1e18, 1e25], [1e-40, 1e-20, 1.0, 1e-25, 1e18, 1e-5]]
        sides = [
            [[scaled_rows(rng, n, d, scales[c]) for c in range(2)] for d, scales in ((3, left), (4, right))]
            for n in (11, 40)
        ]
        t, x = (tracin.FactoredGradients(lf, rt, w, metadata=meta) for lf, rt in sides)
        test, train = (factored_to_full(lf, rt) for lf, rt in sides)
    else:
        scales = [1e-44, 1e-39, 1e-30, 1.0, 1e30, 3e37]
        test, train = ([scaled_rows(rng, n, 5, scales) for _ in w] for n in (11, 40))
        t, x = tracin.Gradients(test, w, metadata=meta), tracin.Gradients(train, w, metadata=meta)
    t64, x64 = (
        normalized([np.asarray(b, np.float64) for b in test], run),
        normalized([np.asarray(b, np.float64) for b in train], run),
    )
    exact, bound = exact_scores(t64, x64, w), score_bound(t64, x64, w)
    assert np.all(np.abs(tracin.scores(t, x, device="torch:cpu", normalize=True) - exact) <= bound)
    total = tracin.aggregate(t, x, device="torch:cpu", normalize=True)
    assert np.all(np.abs(total - exact.sum(0)) <= bound.sum(0))
    both = tracin.top_k(t, x, k=6, side="both", device="torch:cpu", normalize=True)
    for found, sign in zip(both, (1, -1), strict=True):
        chosen = np.take_along_axis(exact, found.indices, 1)
        assert np.all(np.abs(found.values - chosen) <= np.take_along_axis(bound, found.indices, 1))
        kth = np.sort(sign * exact, axis=1)[:, ::-1][:, 5:6]
        assert np.all(sign * chosen >= kth - 2 * bound.max(axis=1, keepdims=True))


def unit_factors(rng, n: int, p: int, q: int, norm: float, left: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n, p) and (n, q) factors of rows of gradient norm `norm`, the left factor's norm
    `left` (0: sqrt(norm), balanced)."""
    left = left or np.sqrt(norm)
    lf, rt = rng.standard_normal((n, p)), rng.standard_normal((n, q))
    lf *= left / np.linalg.norm(lf, axis=1, keepdims=True)
    rt *= norm / left / np.linalg.norm(rt, axis=1, keepdims=True)
    return lf.astype(np.float32), rt.astype(np.float32)


@pytest.mark.parametrize(("norm", "left", "q"), [(2.0**-63.9, 0.0, 32768), (1.7e19, 0.5001, 6)])
def test_factored_cosine_rows_near_the_extreme_thresholds(rng, norm, left, q):
    """Factored rows of norm just above 2^-64 or just below 2^64 (not extreme, so once only balanced):
    cosine scores within the bound of float64 NumPy. Before, their right factors kept the whole norm:
    right-factor GEMMs in float32 subnormals (2.2x the bound at q = 32768) or overflowing (1.7e19)."""
    (tl, tr), (xl, xr) = (unit_factors(rng, 8, 2, q, norm, left) for _ in range(2))
    xl[:4], xr[:4] = tl[:4], tr[:4] + np.float32(0.1) * xr[:4]  # aligned pairs: large cosines
    test, train = factored_to_full([tl], [tr]), factored_to_full([xl], [xr])
    t64, x64 = normalized(test, 1), normalized(train, 1)
    exact, bound = exact_scores(t64, x64, [1.0]), score_bound(t64, x64, [1.0])
    got = tracin.scores(
        tracin.FactoredGradients([tl], [tr]), tracin.FactoredGradients([xl], [xr]), device="torch:cpu", normalize=True
    )
    assert np.all(np.abs(got - exact) <= bound)


def test_factored_cosine_a_zero_factor_beside_a_huge_one_scores_zero(rng):
    """A factored row with a zero left factor and a right factor of norm 1e26 is a zero gradient:
    its cosines are 0 (before, the unscaled right factor's GEMM overflowed and inf x 0 was refused)."""
    tl, tr = unit_factors(rng, 3, 3, 4, 1.0)
    tl[0], tr[0] = 0, tr[0] * np.float32(1e26)
    xl, xr = unit_factors(rng, 5, 3, 4, 1.0)
    xr *= np.float32(1e13)
    got = tracin.scores(
        tracin.FactoredGradients([tl], [tr]), tracin.FactoredGradients([xl], [xr]), device="torch:cpu", normalize=True
    )
    t64, x64 = normalized(factored_to_full([tl], [tr]), 1), normalized(factored_to_full([xl], [xr]), 1)
    exact, bound = exact_scores(t64, x64, [1.0]), score_bound(t64, x64, [1.0])
    assert np.all(got[0] == 0)
    assert np.all(np.abs(got - exact) <= bound)


@pytest.mark.parametrize("factored", [False, True])
def test_a_cosine_test_chunk_holds_one_scaled_copy_at_a_time(rng, monkeypatch, factored):
    """_DeviceTest.upload for cosine scores replaces each uploaded block by its scaled copy in turn:
    when a block's copy is made, the blocks before it are freed (before, every original lived on
    beside a copy of the whole chunk). The squared norms, summed over slices of rows, are float64
    NumPy's."""
    import weakref

    monkeypatch.setattr(torch_device, "_NORM_SLICE", 8, raising=False)
    blocks = [rng.standard_normal((7, 3)).astype(np.float16) for _ in range(4)]  # widened: new tensors
    uploaded: list[weakref.ref] = []
    whole = torch_device.rows.whole
    monkeypatch.setattr(
        torch_device.rows, "whole", lambda *a: [uploaded.append(weakref.ref(t)) or t for t in whole(*a)]
    )
    alive = []
    times = torch_device._times_power_of_two
    monkeypatch.setattr(
        torch_device,
        "_times_power_of_two",
        lambda b, k: alive.append(sum(r() is not None for r in uploaded)) or times(b, k),
    )
    test = torch_device._DeviceTest.upload(KernelSide(factored, blocks, [1] * 4), torch.device("cpu"), 1)
    assert alive == [4, 3, 2, 1]
    full = [b.astype(np.float64) for b in blocks]
    if factored:
        full = factored_to_full(blocks[0::2], blocks[1::2])
    want = np.concatenate(normalized(full, 1), axis=1)
    got = np.concatenate([b.double().numpy() for b in test.blocks], axis=1)
    if factored:
        got = np.concatenate(
            factored_to_full([b.numpy() for b in test.blocks[0::2]], [b.numpy() for b in test.blocks[1::2]]), axis=1
        )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    squares = torch_device._squared_norms(torch.from_numpy(blocks[0].astype(np.float32)))
    np.testing.assert_array_equal(squares.numpy(), (blocks[0].astype(np.float64) ** 2).sum(1))


def test_rows_times_powers_of_two_are_exact():
    """_times_power_of_two: rows times 2^shift exactly (float64 NumPy) for shifts from -252 to 252 that
    keep the values in float32's normal range; rows shifted further down are zero."""
    rows = [
        [2.0**127, 1.5 * 2**126],
        [2.0**-149, 2.0**-100],
        [1e-38, 7.0],
        [2.0**110, 2.0**120],
        [2.0**-140, 2.0**-126],
    ]
    block = np.array([*rows, [5.0, 5.0]], dtype=np.float32)
    shift = np.array([-252, 149, 100, -200, 252, -253])
    got = torch_device._times_power_of_two(torch.from_numpy(block), torch.from_numpy(shift).int()).numpy()
    want = np.ldexp(block.astype(np.float64), shift[:, None])
    want[-1] = 0
    np.testing.assert_array_equal(got.astype(np.float64), want)


def test_non_finite_train_rows_name_the_checkpoint_and_rows(rng, small_tiles):
    train = [rng.standard_normal((50, 4)).astype(np.float32), rng.standard_normal((50, 3)).astype(np.float32)]
    train[1][[31, 44], 0] = [np.inf, np.nan]
    test = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 3)).astype(np.float32)]
    for call in (
        lambda: tracin.top_k(test, train, k=5, device="torch:cpu"),
        lambda: tracin.self_influence(train, device="torch:cpu"),
    ):
        with pytest.raises(ValueError, match=r"train checkpoint 1 contains NaN or Inf values, first in rows \[31, 44"):
            call()


class OnDevice(GradientSet):
    """A set whose rows claim to live on `device` (only their .device is looked at by placement)."""

    factored, weights, weights_given, metadata = False, np.ones(1), False, {}

    def __init__(self, *devices: str):
        self.devices = devices

    n_rows = property(lambda self: 4)
    dims = property(lambda self: (3,))

    def kernel_side(self, start: int = 0, stop: int | None = None) -> KernelSide:
        return KernelSide(False, [type("Block", (), {"device": d})() for d in self.devices], [0] * len(self.devices))


@pytest.mark.parametrize(
    "device, sets, match",
    [
        ("cpu", {"test": OnDevice("cuda:1")}, r"device='cpu' but test is on cuda:1; pass device='cuda:1'"),
        ("cuda:0", {"train": OnDevice("cuda:1")}, r"device='cuda:0' but train is on cuda:1"),
        ("torch:cpu", {"train": OnDevice("cuda:0")}, r"device='torch:cpu' but train is on cuda:0"),
        (
            None,
            {"test": OnDevice("cuda:0"), "train": OnDevice("cuda:1")},
            r"the sets are on different devices \(test on cuda:0, train on cuda:1\)",
        ),
        (None, {"train": OnDevice("cuda:0", "cuda:1")}, r"train has rows on several devices \(cuda:0, cuda:1\)"),
        (None, {"train": OnDevice("cuda:2")}, r"device='cuda:2': torch .* sees no CUDA device"),
        ("cuda", {"train": OnDevice()}, r"device='cuda': torch .* sees no CUDA device"),
        ("cuda:7", {"train": OnDevice()}, r"device='cuda:7': torch .* sees no CUDA device"),
        ("gpu", {}, r"device must be 'cpu' \(the C\+\+ kernel\), 'cuda' or 'cuda:N'"),
    ],
)
def test_placement_errors(device, sets, match):
    if torch.cuda.is_available():
        pytest.skip("the messages for a missing GPU are checked on machines without one")
    with pytest.raises(ValueError, match=match):
        placement.choose(device, "float32", sets)


def test_placement_choices_and_argument_errors(rng):
    host = tracin.Gradients(rng.standard_normal((3, 2)).astype(np.float32))
    assert placement.choose(None, "float32", {"train": host}).name == "cpu"
    assert placement.choose("torch:cpu", "float32", {"train": host}).name == "torch:cpu"
    with pytest.raises(ValueError, match=r"precision must be 'float32' or 'tf32'"):
        tracin.top_k(host, host, precision="float16")
    with pytest.raises(TypeError, match=r"device must be"):
        tracin.scores(host, host, device=0)
    with pytest.raises(ValueError, match=r"precision='tf32' needs a CUDA device \(device='cuda'\), not 'torch:cpu'"):
        tracin.aggregate(host, host, device="torch:cpu", precision="tf32")
    for device in (None, "cpu"):  # the C++ kernel (host rows' default) has no TF32 either
        with pytest.raises(ValueError, match=r"precision='tf32' needs a CUDA device \(device='cuda'\), not 'cpu'"):
            placement.choose(device, "tf32", {"train": host})


def test_tile_rows_count_16_bit_rows_at_two_bytes_a_value():
    """A tile holds tile_bytes of rows as stored on the host: 2 bytes a value for 16-bit blocks, 4 for float32."""
    side = types.SimpleNamespace(blocks=[np.zeros((9, 10), np.float32), np.zeros((9, 6), np.float16)], dtypes=[0, 1])
    assert _torch_rows.tile_rows(side, 5200) == 5200 // (10 * 4 + 6 * 2) == 100
    assert _torch_rows.tile_rows(side, 10) == 1  # at least one row


@pytest.mark.parametrize("device", [None, "cpu", "torch:cpu"])
def test_rows_on_a_device_other_than_cpu_or_cuda_are_refused_naming_the_set(device):
    """A tensor on meta (as on mps or xpu): refused up front, naming the set and saying to move the rows
    (before: "unknown scoring backend 'meta'" for device=None, "pass device='meta'" for device='cpu')."""
    meta, host = torch.zeros(3, 4, device="meta"), np.zeros((5, 4), np.float32)
    with pytest.raises(
        ValueError, match=r"^test is on meta, but scoring runs on the CPU or on a CUDA device only; move"
    ):
        tracin.scores(meta, host, device=device)
    with pytest.raises(ValueError, match=r"^train is on meta, .* move the rows with \.cpu\(\)"):
        tracin.top_k([host, host], [host, torch.zeros(5, 4, device="meta")], device=device)


def test_as_matrix_keeps_device_tensors_only_when_asked():
    meta = torch.empty(5, 3, device="meta", dtype=torch.bfloat16).T  # a non-CPU tensor, columns strided
    with pytest.raises(ValueError, match=r"m is a torch tensor on meta; move it to the CPU first"):
        as_matrix(meta, "m")
    kept, dtype = as_matrix(meta, "m", device_arrays=True)
    assert dtype == "bfloat16" and kept.device.type == "meta" and kept.shape == (3, 5) and kept.stride() == (5, 1)
    with pytest.raises(TypeError, match=r"m has dtype torch.int32"):
        as_matrix(torch.empty(2, 2, device="meta", dtype=torch.int32), "m", device_arrays=True)
    with pytest.raises(ValueError, match=r"m must be 2-D"):
        as_matrix(torch.empty(2, device="meta"), "m", device_arrays=True)
    cpu, dtype = as_matrix(torch.ones(2, 3), "m", device_arrays=True)
    assert isinstance(cpu, np.ndarray) and dtype == "float32"

    class GpuArray:  # a DLPack array on a CUDA device (kDLCUDA = 2) that torch cannot take here
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, **kwargs):
            raise BufferError("no device here")

    with pytest.raises(TypeError, match=r"g: torch cannot take this device array through DLPack"):
        as_matrix(GpuArray(), "g", device_arrays=True)


@pytest.mark.parametrize("factored", [False, True])
def test_rows_on_the_device_are_used_in_place_beside_streamed_ones(rng, small_tiles, factored):
    """CPU tensors are resident on "torch:cpu" (as CUDA tensors are on "cuda"): sliced per tile in
    place, while the NumPy blocks of the same side go through the staging buffers."""
    backend = backends.get("torch:cpu")
    dims = [5, 3, 4, 6] if factored else [5, 3]
    test = [rng.standard_normal((8, d), dtype=np.float32) for d in dims]
    train = [rng.standard_normal((120, d), dtype=np.float32) for d in dims]
    mixed = KernelSide(factored, [torch.from_numpy(b) if i % 2 else b for i, b in enumerate(train)], [0] * len(dims))
    plain = KernelSide(factored, train, [0] * len(dims))
    t = KernelSide(factored, test, [0] * len(dims))
    w = [0.5, 2.0]
    full_t = factored_to_full(test[0::2], test[1::2]) if factored else test
    full_x = factored_to_full(train[0::2], train[1::2]) if factored else train
    exact, bound = exact_scores(full_t, full_x, w), score_bound(full_t, full_x, w)
    got = backend.scores(t, mixed, w, num_threads=1)
    assert np.all(np.abs(got - exact) <= bound)
    np.testing.assert_array_equal(got, backend.scores(t, plain, w, num_threads=1))
    prop, opp = backend.top_k(t, mixed, w, 30, "both", num_threads=1)
    np.testing.assert_array_equal(prop.indices, stable_top_k(exact, 30, -1))
    np.testing.assert_array_equal(opp.indices, stable_top_k(exact, 30, 1))


def test_self_influence_sums_squares_in_float64_like_the_cpu_kernel():
    rows = np.full((2, 4), 3e19, dtype=np.float32)  # |g|^2 overflows float32, w |g|^2 does not
    grads = tracin.Gradients([rows], weights=[1e-20])
    cpu = tracin.self_influence(grads, device="cpu")
    np.testing.assert_allclose(tracin.self_influence(grads, device="torch:cpu"), cpu, rtol=1e-6)
    np.testing.assert_allclose(cpu, 1e-20 * 4 * 3e19**2, rtol=1e-6)


def test_cuda_means_the_current_gpu_for_placement_and_backend_alike(rng, monkeypatch):
    """device="cuda" is resolved once (torch_device.resolve): torch's current GPU, here 3 of 4 (faked:
    no GPU is touched), for the check against the rows' device and for the backend that scores."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(backends, "_loaded", {})
    host = tracin.Gradients(rng.standard_normal((3, 2)).astype(np.float32))
    assert placement.choose("cuda", "float32", {"train": host}).name == "cuda:3"
    assert placement.choose("cuda", "float32", {"train": OnDevice("cuda:3")}).name == "cuda:3"
    with pytest.raises(ValueError, match=r"device='cuda:3' but train is on cuda:1; pass device='cuda:1'"):
        placement.choose("cuda", "float32", {"train": OnDevice("cuda:1")})
    with pytest.raises(ValueError, match=r"device='cuda:4': torch sees 4 CUDA device\(s\)"):
        placement.choose("cuda:4", "float32", {"train": host})


NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def precision_restored():
    """torch's fp32_precision settings as they were before the test (their raw "none" included)."""
    matmul, generic = torch.backends.cuda.matmul, torch.backends.fp32_precision
    before = matmul.fp32_precision
    yield
    torch.backends.fp32_precision = generic
    matmul.fp32_precision = "none"
    if matmul.fp32_precision != before:
        matmul.fp32_precision = before


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision")
@pytest.mark.parametrize("user_sets", ["torch.backends", "torch.backends.cuda.matmul"])
def test_the_precision_scope_uses_torch_new_api_and_restores_the_users_setting(precision_restored, user_sets):
    """After a user (or transformers' tf32=True) allows TF32 through the new API, the legacy getter
    raises; scoring's scope sets and restores the new API instead, inherited values still inherited."""
    matmul = torch.backends.cuda.matmul
    if user_sets == "torch.backends":
        torch.backends.fp32_precision = "tf32"
    else:
        matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()  # what the scope called before
    with torch_device._matmul_precision(tf32=False):
        assert matmul.fp32_precision == "ieee"
        with torch_device._matmul_precision(tf32=True):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == "tf32"
    torch.backends.fp32_precision = "ieee"  # inherited by matmul only where the user set the parent
    assert matmul.fp32_precision == ("ieee" if user_sets == "torch.backends" else "tf32")


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision")
def test_the_precision_scope_leaves_the_default_state_as_it_was(precision_restored):
    matmul = torch.backends.cuda.matmul
    assert matmul.fp32_precision == "none" and torch.backends.fp32_precision == "none"
    with torch_device._matmul_precision(tf32=True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == "none"
    assert torch.get_float32_matmul_precision() == "highest"  # the legacy getter works as before
    with torch_device._matmul_precision(tf32=False):
        pass
    torch.set_float32_matmul_precision("high")  # a legacy-API user: the scope keeps it readable
    with torch_device._matmul_precision(tf32=False):
        assert matmul.fp32_precision == "ieee"
    assert torch.get_float32_matmul_precision() == "high" and matmul.fp32_precision == "tf32"
    torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision")
def test_an_explicit_matmul_setting_equal_to_the_inherited_one_becomes_inherited(precision_restored):
    """The documented rule: an explicit matmul "tf32" under a global "tf32" that the scope changed is put
    back as "none" (it reads "tf32" as before; a later global "ieee" then reaches it); the lock is held."""
    matmul = torch.backends.cuda.matmul
    torch.backends.fp32_precision = "tf32"
    matmul.fp32_precision = "tf32"
    held: list[bool] = []

    def try_lock():
        got = torch_device._PRECISION_LOCK.acquire(blocking=False)
        held.append(not got)
        if got:
            torch_device._PRECISION_LOCK.release()

    with torch_device._matmul_precision(tf32=False):
        assert matmul.fp32_precision == "ieee"
        other = threading.Thread(target=try_lock)
        other.start()
        other.join(10)
    assert held == [True]
    assert matmul.fp32_precision == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert matmul.fp32_precision == "ieee"
    matmul.fp32_precision = "tf32"  # explicit, unlike the parent's "ieee": stays explicit
    with torch_device._matmul_precision(tf32=False):
        assert matmul.fp32_precision == "ieee"
    torch.backends.fp32_precision = "tf32"
    torch.backends.fp32_precision = "ieee"
    assert matmul.fp32_precision == "tf32"


PRECISION_KEYS = [("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("mkldnn", "all"), ("mkldnn", "matmul")]
USER_SETTINGS = {  # what a user may have done before a call: settings through either API, or both
    "default": [],
    "legacy high": [lambda: torch.set_float32_matmul_precision("high")],
    "legacy medium": [lambda: torch.set_float32_matmul_precision("medium")],
    "allow_tf32": [lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True)],
    "new matmul tf32": [lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")],
    "new matmul ieee": [lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")],
    "new generic tf32": [lambda: setattr(torch.backends, "fp32_precision", "tf32")],
    "new generic and matmul tf32": [
        lambda: setattr(torch.backends, "fp32_precision", "tf32"),
        lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    ],
    "new mkldnn bf16": [lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")],
    "legacy high, then new generic ieee": [
        lambda: torch.set_float32_matmul_precision("high"),
        lambda: setattr(torch.backends, "fp32_precision", "ieee"),
    ],
}
FOLLOW_UPS = {  # what the user may do after it: each shows what the state held besides what it reads
    "nothing": lambda: None,
    "generic ieee": lambda: setattr(torch.backends, "fp32_precision", "ieee"),
    "generic tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "mkldnn all bf16": lambda: setattr(torch.backends.mkldnn, "fp32_precision", "bf16"),
    "matmuls ieee": lambda: [
        setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
        setattr(torch.backends.mkldnn.matmul, "fp32_precision", "ieee"),
    ],  # the legacy getter then reads the legacy value whatever it is
}


def _reset_precision() -> None:
    torch.set_float32_matmul_precision("highest")
    for key in PRECISION_KEYS:
        torch._C._set_fp32_precision_setter(*key, "none")


def _legacy_views() -> tuple[object, object]:
    """get_float32_matmul_precision() and matmul.allow_tf32, or "raises" for either."""
    views = []
    for read in (torch.get_float32_matmul_precision, lambda: torch.backends.cuda.matmul.allow_tf32):
        try:
            views.append(read())
        except RuntimeError as e:
            assert "mix of the legacy and new APIs" in str(e)
            views.append("raises")
    return views[0], views[1]


def _observed(settings: str, follow_up: str, scope: bool | None) -> tuple[object, ...]:
    """Every fp32_precision and both legacy views after `settings`, a scope at TF32 (True) or float32
    (False) or none (None), and then `follow_up`; from the default state."""
    _reset_precision()
    for step in USER_SETTINGS[settings]:
        step()
    if scope is not None:
        with torch_device._matmul_precision(tf32=scope):
            pass
    FOLLOW_UPS[follow_up]()
    return (*(torch._C._get_fp32_precision_getter(*key) for key in PRECISION_KEYS), *_legacy_views())


@pytest.fixture
def default_precision():
    """torch's precision settings put back to its defaults after the test."""
    yield
    _reset_precision()


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision")
@pytest.mark.parametrize("settings", USER_SETTINGS)
@pytest.mark.parametrize("tf32", [False, True])
def test_inside_the_precision_scope_the_legacy_and_new_views_agree(default_precision, monkeypatch, settings, tf32):
    """Whatever the user set, inside the scope matmul.allow_tf32 (what cuBLAS and cuBLASLt check) does
    not raise "mix of the legacy and new APIs" (as torch 2.13 did for precision="tf32" from the
    defaults, or a float32 call after allow_tf32=True) and both views read the wanted precision. No
    other setting changes, not even for a moment (other threads would see it): of the fp32_precision
    settings only cuda's matmul one is written, and mkldnn's only to put back a legacy "medium". The
    legacy getter reads the wanted value unless mkldnn's matmul setting (the user's) disagrees."""
    _reset_precision()
    for step in USER_SETTINGS[settings]:
        step()
    others = [key for key in PRECISION_KEYS if key != ("cuda", "matmul")]
    before = [torch._C._get_fp32_precision_getter(*key) for key in others]
    writes, setter = [], torch._C._set_fp32_precision_setter
    monkeypatch.setattr(torch._C, "_set_fp32_precision_setter", lambda *a: writes.append(a[:2]) or setter(*a))
    with torch_device._matmul_precision(tf32=tf32):
        legacy, allow_tf32 = _legacy_views()
        assert allow_tf32 is tf32
        assert torch.backends.cuda.matmul.fp32_precision in (("tf32",) if tf32 else ("ieee", "none"))
        assert [torch._C._get_fp32_precision_getter(*key) for key in others] == before
        mkldnn = torch.backends.mkldnn.matmul.fp32_precision
        wanted = {"tf32": ("high",), "bf16": ("medium",)}.get(mkldnn, ("high", "medium")) if tf32 else ("highest",)
        assert legacy in wanted or (legacy == "raises" and mkldnn in ("tf32", "bf16"))
    assert set(writes) <= {("cuda", "matmul"), *([("mkldnn", "matmul")] if settings == "legacy medium" else [])}


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision")
@pytest.mark.parametrize("settings", USER_SETTINGS)
@pytest.mark.parametrize("follow_up", FOLLOW_UPS)
def test_the_precision_scope_restores_the_users_settings_exactly(default_precision, settings, follow_up):
    """After a scope at either precision, what every setting reads, what the legacy getters do (a
    user's own mix of the APIs included) and what each setting inherits are those of the same
    settings without the scope; except the documented rule: an explicit matmul "tf32" equal to the
    inherited one comes back inherited (as if the user had set the parent alone)."""
    without = _observed("new generic tf32" if settings == "new generic and matmul tf32" else settings, follow_up, None)
    assert _observed(settings, follow_up, False) == without
    assert _observed(settings, follow_up, True) == without


@pytest.mark.parametrize("tf32, inside", [(False, "highest"), (True, "high")])
def test_the_precision_scope_on_torch_without_the_new_api(monkeypatch, tf32, inside):
    """torch < 2.9 (faked: a matmul namespace without fp32_precision): the legacy functions."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace())
    calls = ["medium"]
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: calls[-1])
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    with torch_device._matmul_precision(tf32):
        assert calls == ["medium", inside]
    assert calls == ["medium", inside, "medium"]


def test_a_scope_in_another_thread_waits_for_the_precision_lock():
    """Two calls at different precisions never overlap: the second enters after the first left."""
    events: list[str] = []
    inside, leave = threading.Event(), threading.Event()

    def first():
        with torch_device._matmul_precision(tf32=True):
            events.append("first in")
            inside.set()
            leave.wait(10)
            events.append("first out")

    def second():
        with torch_device._matmul_precision(tf32=False):
            events.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.3)  # without the lock it would have entered by now
    assert b.is_alive() and events == ["first in"]
    leave.set()
    a.join(10)
    b.join(10)
    assert events == ["first in", "first out", "second in"]


def test_no_test_rows_give_each_side_its_own_empty_result():
    """base.py's contract: the two sides are distinct results, also when no tile made candidates."""
    empty = tracin.top_k(np.zeros((0, 3), np.float32), np.ones((5, 3), np.float32), 2, "both", device="torch:cpu")
    for got in empty:
        assert got.values.shape == got.indices.shape == (0, 2)
        assert got.values.dtype == np.float32 and got.indices.dtype == np.int64
    assert empty.proponents is not empty.opponents


@pytest.mark.parametrize("on_device", [True, False])
def test_train_rows_on_the_device_pass_in_wider_tiles_than_rows_staged_from_the_host(rng, monkeypatch, on_device):
    """Rows already on the device (CPU tensors on "torch:cpu") are cut by DEVICE_RESIDENT_TILE_BYTES
    (views: wide GEMMs cost no memory), host rows by DEVICE_TILE_BYTES (the staging buffers)."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 40 * 8 * 4)  # 40 rows of 8 float32
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 100 * 8 * 4)
    widths, product = [], torch_device._product
    monkeypatch.setattr(torch_device, "_product", lambda t, x, *a: widths.append(x[0].shape[0]) or product(t, x, *a))
    test, train = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((250, 8)).astype(np.float32)
    rows = KernelSide(False, [torch.from_numpy(train) if on_device else train], [0])
    prop, opp = backends.get("torch:cpu").top_k(KernelSide(False, [test], [0]), rows, [1.0], 7, "both", num_threads=1)
    assert widths == ([100, 100, 50] if on_device else [40] * 6 + [10])
    exact = exact_scores([test], [train], [1.0])
    np.testing.assert_array_equal(prop.indices, stable_top_k(exact, 7, -1))
    np.testing.assert_array_equal(opp.indices, stable_top_k(exact, 7, 1))


def test_tiles_of_narrow_rows_hold_at_most_a_score_blocks_rows(rng, monkeypatch):
    """Rows of 8 bytes in tiles of 10,000 bytes would be 1,250 rows per tile, beyond the 30 scores per
    block that one test row already needs: tiles are capped at DEVICE_TILE_SCORES rows."""
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 10_000)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 30)
    widths, product = [], torch_device._product
    monkeypatch.setattr(torch_device, "_product", lambda t, x, *a: widths.append(x[0].shape) or product(t, x, *a))
    test, train = rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal((70, 2)).astype(np.float32)
    rows = KernelSide(False, [torch.from_numpy(train)], [0])
    backend = backends.get("torch:cpu")
    prop, _ = backend.top_k(KernelSide(False, [test], [0]), rows, [1.0], 4, "proponents", num_threads=1)
    assert [w[0] for w in widths] == [30] * 3 + [30] * 3 + [10] * 3  # each tile meets the 3 test rows one by one
    np.testing.assert_array_equal(prop.indices, stable_top_k(exact_scores([test], [train], [1.0]), 4, -1))


def _overflow_pair(message: str) -> tuple[int, int]:
    """The (test row, train row) a float32 overflow error names."""
    import re

    found = re.search(r"first for test row ([0-9]+) and train row ([0-9]+);", message)
    assert found is not None, message
    return int(found[1]), int(found[2])


@pytest.mark.parametrize("layout", ["whole", "tiles", "chunks and store pieces"])
@pytest.mark.parametrize("factored", [False, True])
def test_an_overflow_names_the_first_pair_as_the_cpu_kernel_does(rng, tmp_path, monkeypatch, layout, factored):
    """base.Backend: a float32 overflow from finite inputs names its rows. torch:cpu raised a message
    naming none (review75 F3); it names the C++ kernel's pair, the smallest train row with an overflowed
    score, then its smallest test row (of the first test chunk holding one, as the kernel's passes),
    counted from the start of the sets across train tiles, test blocks, test chunks (of 16 rows: the
    first holds none) and store pieces. Overflowing pairs: (test 24, train 23) and (test 17, train 31)
    (test-row order would name the second), and (test 28, train 23)."""
    test, train = rng.standard_normal((36, 4)).astype(np.float32), rng.standard_normal((40, 4)).astype(np.float32)
    test[24], train[23], test[17], train[31] = [1e20, 0, 0, 0], [1e20, 0, 0, 0], [0, 1e20, 0, 0], [0, 1e20, 0, 0]
    test[28] = [-2e20, 0, 0, 0]
    if layout != "whole":
        monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 4 * 4 * 6)  # tiles of 6 train rows
        monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 4 * 4 * 6)
        monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 6 * 7)  # test blocks of 7 rows
    ones_t, ones_x = np.ones((36, 1), np.float32), np.ones((40, 1), np.float32)
    if factored:
        t, x = tracin.FactoredGradients([test], [ones_t]), tracin.FactoredGradients([train], [ones_x])
    else:
        t, x = tracin.Gradients([test]), tracin.Gradients([train])
    if layout == "chunks and store pieces" and not factored:
        writer = tracin.GradientStore.create(tmp_path / "train", 40, [4], [1.0])
        writer.write(0, 0, train)
        writer.finalize()
        x = tracin.GradientStore.open(tmp_path / "train", chunk_bytes=4 * 4 * 9)  # pieces of 9 rows
    calls = {  # name: (call, device bytes per test row beside its rows: top_k's selection, 12 B x k x sides)
        "scores": (lambda device: tracin.scores(t, x, device=device, progress=False), 0),
        "top_k": (lambda device: tracin.top_k(t, x, k=3, device=device, progress=False), 12 * 3),
        "top_k both": (
            lambda device: tracin.top_k(t, x, k=30, side="both", device=device, progress=False),
            12 * 30 * 2,
        ),
    }
    for name, (call, state) in calls.items():
        if layout == "chunks and store pieces":  # test chunks of 16 rows (scoring._device_test_rows)
            monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 16 * (4 * (5 if factored else 4) + state))
        named = []
        for device in ("cpu", "torch:cpu"):
            with pytest.raises(ValueError, match="overflowed float32 although every input is finite") as error:
                call(device)
            named.append(_overflow_pair(str(error.value)))
        assert named == [(24, 23)] * len(named), name
    if factored:  # aggregate's overflowing rows are summed in float64 (review157 F1): their sums name them
        for device in ("cpu", "torch:cpu"):
            with pytest.raises(ValueError, match=r"^aggregate influence overflowed float32 for train rows \[23, 31\]"):
                tracin.aggregate(t, x, device=device, progress=False)


@pytest.mark.parametrize(
    ("columns", "second"),
    [(4, 600), (2**16, 280)],  # passes of 512 rows; of 256 (64 MiB of packed rows of 256 KiB)
)
def test_an_overflow_names_the_cpu_kernels_pair_across_its_passes_of_test_rows(rng, columns, second):
    """review78 F1: the C++ kernel scores test rows in passes (torch_device._kernel_pass_rows: up to 512,
    fewer for wide rows) and names the smallest train row of the first pass holding an overflow; torch:cpu
    took the smallest train row over all its test rows. Overflowing pairs (test 10, train 5) and (test
    `second`, train 0), the second in the kernel's second pass: both name (10, 5)."""
    test = rng.standard_normal((second + 20, columns)).astype(np.float32)
    train = rng.standard_normal((8, columns)).astype(np.float32)
    test[10, :2], train[5, :2], test[second, :2], train[0, :2] = [0, 1e20], [0, 1e20], [1e20, 0], [1e20, 0]
    calls = {
        "scores": lambda device: tracin.scores(test, train, device=device, progress=False),
        "top_k": lambda device: tracin.top_k(test, train, k=3, device=device, progress=False),
    }
    if columns == 4:
        ones_t, ones_x = np.ones((len(test), 1), np.float32), np.ones((8, 1), np.float32)
        t, x = tracin.FactoredGradients([test], [ones_t]), tracin.FactoredGradients([train], [ones_x])
        calls["factored"] = lambda device: tracin.scores(t, x, device=device, progress=False)
    for name, call in calls.items():
        named = []
        for device in ("cpu", "torch:cpu"):
            with pytest.raises(ValueError, match="overflowed float32 although every input is finite") as error:
                call(device)
            named.append(_overflow_pair(str(error.value)))
        assert named == [(10, 5), (10, 5)], name


@pytest.mark.parametrize("m", [1, 4])
def test_same_sign_wide_rows_keep_the_bound(m):
    """Rows of 2^18 columns whose every product is just above 1: BLAS sums a whole row in one float32
    chain, which missed the contract's bound 1.6x (m=4) to 11x (m=1, the matrix-vector path); the
    backend multiplies slices of DEVICE_SUM_DEPTH columns and adds them in float64."""
    d = 2**18
    test = np.ones((m, d), np.float32)
    train = np.stack([np.full(d, 1 + eps / 256, np.float32) for eps in (0.03, 0.06, 0.1)])
    exact, bound = exact_scores([test], [train], [1.0]), score_bound([test], [train], [1.0])
    for device in ("torch:cpu", "cpu"):
        assert np.all(np.abs(tracin.scores(test, train, device=device) - exact) <= bound), device
        best = tracin.top_k(test, train, k=3, device=device)
        assert np.all(np.abs(best.values - np.take_along_axis(exact, best.indices, 1)) <= bound[:, :3]), device


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("d", [3000, 2**14])
def test_same_sign_rows_keep_the_bound_for_every_small_difference(m, d):
    """Few test rows (BLAS's matrix-vector path, one float32 chain per row) against same-sign rows of
    products 1 + eps/256 for 96 eps in [0.005, 0.12]: some eps round the same way at every step, which
    missed the bound 1.0x at 3000 columns and 1.5x at 4096 (and, slice after slice, at any d) while
    DEVICE_SUM_DEPTH was 4096; at most 0.39x in slices of 1024."""
    test = np.ones((m, d), np.float32)
    train = np.stack([np.full(d, 1 + eps / 256, np.float32) for eps in np.linspace(0.005, 0.12, 96)])
    exact, bound = exact_scores([test], [train], [1.0]), score_bound([test], [train], [1.0])
    assert np.all(np.abs(tracin.scores(test, train, device="torch:cpu") - exact) <= bound)


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_blocks_wider_than_the_sum_depth_are_summed_in_slices(rng, small_tiles, monkeypatch, factored, normalize):
    """DEVICE_SUM_DEPTH of 16 columns: blocks of 37 and 9 columns (factored: left factors of 20 and 4,
    right of 3 and 2), weights of both signs, cosine scores too: scores, top_k and aggregate against
    float64, as for one GEMM."""
    monkeypatch.setattr(_tunables, "DEVICE_SUM_DEPTH", 16)
    w = [0.7, -1.3]
    widths = [(20, 3), (4, 2)] if factored else [(37,), (9,)]
    sides = [[[rng.standard_normal((rows, c), dtype=np.float32) for c in dims] for dims in widths] for rows in (6, 50)]
    if factored:
        t, x = (tracin.FactoredGradients([b[0] for b in v], [b[1] for b in v], w) for v in sides)
        full_t, full_x = (factored_to_full([b[0] for b in v], [b[1] for b in v]) for v in sides)
    else:
        t, x = (tracin.Gradients([b[0] for b in v], w) for v in sides)
        full_t, full_x = ([b[0].astype(np.float64) for b in v] for v in sides)
    if normalize:
        full_t, full_x = normalized(full_t, 1), normalized(full_x, 1)
    exact, bound = exact_scores(full_t, full_x, w), score_bound(full_t, full_x, w)
    ours = tracin.scores(t, x, device="torch:cpu", normalize=normalize)
    assert np.all(np.abs(ours - exact) <= bound)
    summed = tracin.aggregate(t, x, device="torch:cpu", normalize=normalize)
    assert np.all(np.abs(summed - exact.sum(0)) <= bound.sum(0))
    got = tracin.top_k(t, x, k=5, side="both", device="torch:cpu", normalize=normalize)
    np.testing.assert_array_equal(got.proponents.indices, stable_top_k(exact, 5, -1))
    np.testing.assert_array_equal(got.opponents.indices, stable_top_k(exact, 5, 1))


@pytest.mark.parametrize("kind", ["wide", "factored", "cosine"])
def test_a_callers_autocast_does_not_reach_the_backends_products(rng, kind):
    """review231 F1: under a caller's torch.autocast, torch.mm ran in bfloat16 (float16 on CUDA): wide
    blocks 20x the bound off, factored and cosine scores a TypeError. Every call equals the one outside."""
    m, n = 6, 40
    if kind == "factored":
        test = tracin.FactoredGradients(
            [rng.standard_normal((m, 16)).astype(np.float32)], [rng.standard_normal((m, 8)).astype(np.float32)]
        )
        train = tracin.FactoredGradients(
            [rng.standard_normal((n, 16)).astype(np.float32)], [rng.standard_normal((n, 8)).astype(np.float32)]
        )
    else:
        d = 3000 if kind == "wide" else 64  # wide: past DEVICE_SUM_DEPTH, summed by torch.mm in slices
        test, train = (rng.standard_normal((r, d)).astype(np.float32) for r in (m, n))
    options = dict(device="torch:cpu", normalize=kind == "cosine")
    calls = {
        "scores": lambda: tracin.scores(test, train, **options),
        "top_k": lambda: tracin.top_k(test, train, k=5, side="both", **options),
        "aggregate": lambda: tracin.aggregate(test, train, **options),
    }
    for name, call in calls.items():
        outside = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = call()
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (outside, inside)), strict=True):
            for field in ("values", "indices") if hasattr(a, "indices") else (None,):
                got, want = (b, a) if field is None else (getattr(b, field), getattr(a, field))
                np.testing.assert_array_equal(got, want, err_msg=f"{kind} {name} {field}")


def test_host_buffers_stay_on_the_host_under_a_default_device(rng):
    """review231 F2: host staging buffers followed torch.set_default_device (on CUDA: pinned memory asked
    of the GPU); under a 'meta' default every call failed copying from meta. Each now gives float64's."""
    test, train = rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((100, 32)).astype(np.float32)
    exact = test.astype(np.float64) @ train.T.astype(np.float64)
    torch.set_default_device("meta")
    try:
        scores = tracin.scores(test, train, device="torch:cpu")
        top = tracin.top_k(test, train, k=3, device="torch:cpu")
        total = tracin.aggregate(test, train, device="torch:cpu")
        own = tracin.self_influence(train, device="torch:cpu")
    finally:
        torch.set_default_device(None)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    np.testing.assert_array_equal(top.indices, stable_top_k(exact, 3, -1))
    np.testing.assert_allclose(total, exact.sum(0), rtol=1e-5, atol=1e-5 * np.abs(exact).sum(0).max())
    np.testing.assert_allclose(own, (train.astype(np.float64) ** 2).sum(1), rtol=1e-5)


@pytest.mark.parametrize("where", ["test", "train"])
def test_minus_infinity_alone_in_a_row_is_named_as_non_finite(rng, small_tiles, where):
    """-inf is caught as NaN and +inf are (a check of row maxima alone would pass it): the row is named,
    not scored as an overflow or returned as -inf scores."""
    sets = {
        "test": [rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)],
        "train": [rng.standard_normal((40, 5)).astype(np.float32), rng.standard_normal((40, 3)).astype(np.float32)],
    }
    row = 2 if where == "test" else 27
    sets[where][1][row, 1] = -np.inf
    test, train = sets["test"], sets["train"]
    calls = [
        lambda: tracin.scores(test, train, device="torch:cpu"),
        lambda: tracin.top_k(test, train, k=3, device="torch:cpu"),
        lambda: tracin.aggregate(test, train, device="torch:cpu"),
        lambda: tracin.scores(test, train, normalize=True, device="torch:cpu"),
    ]
    if where == "train":
        calls.append(lambda: tracin.self_influence(train, device="torch:cpu"))
    for call in calls:
        with pytest.raises(
            ValueError, match=rf"{where} checkpoint 1 contains NaN or Inf values, first in rows \[{row}\]"
        ):
            call()


def test_self_influence_beyond_float32_from_finite_rows_is_an_error_naming_the_rows():
    rows = np.ones((5, 4), dtype=np.float32)
    rows[[1, 3]] = 3e19  # w |g|^2 = 3.6e39 in float64: beyond float32
    for factored in (False, True):
        grads = (
            tracin.FactoredGradients([rows], [np.ones((5, 2), np.float32)]) if factored else tracin.Gradients([rows])
        )
        with pytest.raises(ValueError, match=r"self-influence overflowed float32 for train rows \[1, 3\]"):
            tracin.self_influence(grads, device="torch:cpu")


def test_wide_test_blocks_hold_a_quarter_of_the_score_budget(monkeypatch):
    """Blocks wider than DEVICE_SUM_DEPTH: test rows per score tile cut to a quarter of the budget (the
    float64 sums and slice results of _gemm); narrower ones keep the whole budget."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 400)
    monkeypatch.setattr(_tunables, "DEVICE_SUM_DEPTH", 8)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 720)  # tiles of 20 rows of 9 columns, 22 of 8
    for width, step in ((9, 400 // 4 // 20), (8, 400 // 22)):
        train = KernelSide(False, [np.ones((30, width), np.float32)], [0])
        test = KernelSide(False, [np.ones((50, width), np.float32)], [0])
        blocks = torch_device._Call(test, train, torch.device("cpu"), weights=[1.0]).test_blocks()
        assert blocks[0] == (0, step) and blocks[-1][1] == 50, (width, blocks)


def test_many_slices_of_the_sum_depth_are_added_in_float64(monkeypatch):
    """2048 slices of 16 columns of same-sign products 1 + eps/256: their float32 GEMM results added in a
    float32 chain miss the contract's bound (about 1e-4 of the score); added in float64 they keep it."""
    monkeypatch.setattr(_tunables, "DEVICE_SUM_DEPTH", 16)
    d = 2**15
    test = np.ones((2, d), np.float32)
    train = np.stack([np.full(d, 1 + eps / 256, np.float32) for eps in np.linspace(0.005, 0.12, 12)])
    exact, bound = exact_scores([test], [train], [1.0]), score_bound([test], [train], [1.0])
    assert np.all(np.abs(tracin.scores(test, train, device="torch:cpu") - exact) <= bound)


def test_cosine_scores_under_a_tiny_weight_against_small_norm_rows_keep_the_bound(rng):
    """A weight of 2^-80 on unit test rows (largest weighted value about 2^-82: lifted to 2^-32 for cosine
    scores, as the C++ kernel lifts them) against train rows of norm 2^-63 (below 1, above _TINY: not
    brought near 1): unlifted, the GEMM's products would fall below float32's normal range (zero)."""
    w = [2.0**-80]
    test = rng.standard_normal((3, 1024)).astype(np.float32)
    train = (rng.standard_normal((6, 1024)) * 2.0**-63 / 32).astype(np.float32)
    t64, x64 = normalized([test.astype(np.float64)], 1), normalized([train.astype(np.float64)], 1)
    exact, bound = exact_scores(t64, x64, w), score_bound(t64, x64, w)
    t, x = tracin.Gradients([test], w), tracin.Gradients([train], w)
    for device in ("cpu", "torch:cpu"):
        assert np.all(np.abs(tracin.scores(t, x, device=device, normalize=True) - exact) <= bound), device


def test_non_finite_rows_are_named_up_to_five_as_by_the_cpu_kernel(rng):
    train = rng.standard_normal((30, 4)).astype(np.float32)
    train[[2, 5, 8, 11, 14, 17], 1] = np.nan
    test = rng.standard_normal((3, 4)).astype(np.float32)
    for device in ("cpu", "torch:cpu"):
        with pytest.raises(ValueError, match=r"first in rows \[2, 5, 8, 11, 14\]"):
            tracin.scores(test, train, device=device)


def test_an_overflow_in_the_second_half_of_the_kernels_first_pass_is_named(rng):
    """Narrow rows: the kernel's first pass holds 512 test rows, so of the overflowing pairs (test 10,
    train 5) and (test 300, train 0) it names the smaller train row's (300, 0), as torch:cpu must (passes
    of 256 rows would name (10, 5))."""
    test, train = rng.standard_normal((320, 4)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    test[10, :2], train[5, :2], test[300, :2], train[0, :2] = [0, 1e20], [0, 1e20], [1e20, 0], [1e20, 0]
    named = []
    for device in ("cpu", "torch:cpu"):
        with pytest.raises(ValueError, match="overflowed float32 although every input is finite") as error:
            tracin.scores(test, train, device=device, progress=False)
        named.append(_overflow_pair(str(error.value)))
    assert named == [(300, 0), (300, 0)]


def test_scores_of_rows_lifted_beyond_float64s_range_are_zero_as_on_the_cpu_kernel():
    """review333 (mutant: no clamp of e_r in _product): weighted values near 2^-1146 (subnormal rows
    under weight 1e-300) lift their rows by 2^-e_r beyond float64's range; the scores underflow to 0
    on both backends, not a product with the bits of 2^-1050 read as -2^998 (the overflow error)."""
    test, train = np.full((2, 4), 1e-45, dtype=np.float32), np.ones((3, 4), dtype=np.float32)
    t, x = tracin.Gradients([test], [1e-300]), tracin.Gradients([train], [1e-300])
    for device in ("cpu", "torch:cpu"):
        np.testing.assert_array_equal(tracin.scores(t, x, device=device), np.zeros((2, 3), np.float32), err_msg=device)


def test_a_weight_just_below_2_to_the_minus_24_goes_on_the_test_rows():
    """review333 (mutant: weights within 2^+-25 of 1 left to the GEMM): the dot product of rows near
    2^63 (2^128) exceeds float32 while the score under weight 2^-25 (2^103) does not; the weight is
    folded into the test rows first, as on the C++ kernel."""
    test, train = np.full((1, 4), 2.0**63, dtype=np.float32), np.full((2, 4), 2.0**63, dtype=np.float32)
    t, x = tracin.Gradients([test], [2.0**-25]), tracin.Gradients([train], [2.0**-25])
    for device in ("cpu", "torch:cpu"):
        np.testing.assert_array_equal(tracin.scores(t, x, device=device), np.full((1, 2), 2.0**103, np.float32))


def test_a_row_whose_largest_weighted_value_is_2_to_the_127_is_lowered():
    """review333 (mutant: rows lowered only from 2^128): a test row (2^127, -2^127) against (2, 2)
    scores 0 on the C++ kernel, which lowers it to 2^100 first; unlowered, its float32 products
    overflow (inf - inf) and the call was the overflow error."""
    test = np.array([[2.0**127, -(2.0**127)]], dtype=np.float32)
    train = np.array([[2.0, 2.0], [1.0, 0.5]], dtype=np.float32)
    want = np.array([[0.0, 2.0**126]], dtype=np.float32)
    for device in ("cpu", "torch:cpu"):
        np.testing.assert_array_equal(tracin.scores(test, train, device=device), want, err_msg=device)


def test_a_factored_aggregate_sums_each_train_rows_float32_scores_in_float64():
    """review333 (mutant: scores summed over the test rows in float32): scores 2^40, 1 and -2^40 of
    one train row sum to 1 in float64 (as the C++ kernel), to 0 in float32."""
    left_t = np.array([[2.0**40], [1.0], [-(2.0**40)]], np.float32)
    t = tracin.FactoredGradients([left_t], [np.ones((3, 1), np.float32)], [1.0])
    x = tracin.FactoredGradients([np.ones((2, 1), np.float32)], [np.array([[1.0], [0.5]], np.float32)], [1.0])
    for device in ("cpu", "torch:cpu"):
        np.testing.assert_array_equal(tracin.aggregate(t, x, device=device), [1.0, 0.5], err_msg=device)


@pytest.mark.parametrize("first", [0, 1, 3, 50])
def test_a_shifted_copy_of_a_blocks_rows_starts_where_a_whole_copy_would(first):
    """review333 (mutant: offset 0): _shifted's copy of rows first: of a block starts at first x d
    values modulo 128 (512 bytes) into its buffer, where those rows lie in a copy of the whole block,
    so that CPU GEMMs, which round by alignment, give the same bits."""
    block = torch.arange(60 * 7, dtype=torch.float32).reshape(60, 7)[first:]
    shift = torch.full((block.shape[0],), 3, dtype=torch.int64)
    out = torch_device._shifted(block, shift, first)
    assert out.storage_offset() == first * 7 % 128
    torch.testing.assert_close(out, block * 8, rtol=0, atol=0)


def test_an_overflow_names_the_cpu_kernels_pair_in_its_thin_passes_of_very_wide_rows():
    """review333 (mutant: _KERNEL_THIN_LANES 4): test rows of 64 MiB / 13 bytes leave room for 13 in
    the C++ kernel's packing budget, fewer than a pass row quantum (32), so its passes hold 8 rows (its
    AVX2 / AVX-512 kernels' thin lanes), not 12. Overflowing pairs (test 9, train 0) and (test 3, train
    1): the first pass [0, 8) holds only the second, which both backends name."""
    columns = 64 * 2**20 // 4 // 13
    assert torch_device._kernel_pass_rows(4 * columns) == 8
    test, train = np.zeros((14, columns), np.float32), np.zeros((2, columns), np.float32)
    test[9, :2], train[0, :2], test[3, :2], train[1, :2] = [1e20, 0], [1e20, 0], [0, 1e20], [0, 1e20]
    kernel = ("cpu",) if tracin._core.detect_isa() != "generic" else ()  # the generic kernel's lanes are 4
    for device in (*kernel, "torch:cpu"):
        with pytest.raises(ValueError, match="overflowed float32 although every input is finite") as error:
            tracin.scores(test, train, device=device, progress=False)
        assert _overflow_pair(str(error.value)) == (3, 1), device


def test_a_test_row_whose_packing_overflows_is_no_error_against_no_train_rows():
    """review333 (mutant: the packing overflow flagged whatever the train rows): a test row kept
    unlowered (3e38 x 4 overflows; lowering would lose 1e-37 x 4) scores nothing against an empty
    train side, which the C++ kernel answers with an empty matrix, not the overflow error."""
    side = lambda rows: KernelSide._make(tracin.Gradients([rows], [4.0]).kernel_side())  # noqa: E731
    test, train = np.array([[3e38, 1e-37]], np.float32), np.zeros((0, 2), np.float32)
    for device in ("cpu", "torch:cpu"):
        got = backends.get(device).scores(side(test), side(train), [4.0], num_threads=1)
        assert got.shape == (1, 0), device
    prepared = torch_device._DeviceTest.upload(side(test), torch.device("cpu"), 0, [4.0])
    assert prepared.overflowing.tolist() == [0]  # the row is kept unlowered: its packing overflows


def test_an_aggregate_of_full_rows_takes_the_float64_column_sums_whole():
    """review333 (mutant: the float64 column sums rounded to float32 before the products): test rows
    (2^30, 2^30) and (1, 0) sum to (2^30 + 1, 2^30); against the train row (1, -1) the aggregate is 1
    on both backends (0 from float32 sums)."""
    test = np.array([[2.0**30, 2.0**30], [1.0, 0.0]], np.float32)
    train = np.array([[1.0, -1.0], [0.5, 0.0]], np.float32)
    for device in ("cpu", "torch:cpu"):
        np.testing.assert_array_equal(tracin.aggregate(test, train, device=device), [1.0, 2.0**29], err_msg=device)
