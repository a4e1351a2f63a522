"""Gradients / FactoredGradients: accepted inputs, zero-copy views, validation errors."""

from __future__ import annotations

import decimal
import fractions
import re

import numpy as np
import pytest

import tracin
from tracin.gradients import KernelSide


def test_views_share_memory_with_numpy_and_memmap(rng, tmp_path):
    a = rng.standard_normal((10, 4), dtype=np.float32)
    path = tmp_path / "g.npy"
    np.save(path, a)
    mm = np.load(path, mmap_mode="r")
    g = tracin.Gradients([a, mm], weights=[0.1, 0.2])
    assert np.shares_memory(g.matrices[0], a)
    assert np.shares_memory(g.matrices[1], mm)
    assert g.dims == (4, 4) and g.n_rows == 10 and len(g) == 10
    assert g.weights.tolist() == [0.1, 0.2] and g.weights_given


def test_torch_tensors_without_copy():
    torch = pytest.importorskip("torch")
    t = torch.randn(6, 3)
    b = torch.randn(6, 5, dtype=torch.bfloat16)
    g = tracin.Gradients([t, b])
    assert np.shares_memory(g.matrices[0], t.numpy())
    assert g.dtypes == ("float32", "bfloat16")
    # bfloat16 bits are passed through unchanged
    assert np.array_equal(g.matrices[1], b.view(torch.int16).numpy().view(np.uint16))


def test_jax_and_ml_dtypes_arrays():
    jnp = pytest.importorskip("jax.numpy")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    j = jnp.ones((3, 2), dtype=jnp.bfloat16)
    m = np.ones((3, 7), dtype=ml_dtypes.bfloat16)
    g = tracin.Gradients([j, m])
    assert g.dtypes == ("bfloat16", "bfloat16")
    assert g.matrices[0].dtype == np.uint16 and g.matrices[0][0, 0] == 0x3F80


def test_non_contiguous_rows_are_made_contiguous(rng):
    a = rng.standard_normal((8, 10), dtype=np.float32)
    g = tracin.Gradients(a[:, ::2])
    assert g.matrices[0].flags.c_contiguous
    np.testing.assert_array_equal(g.matrices[0], a[:, ::2])
    # A row-strided view needs no copy.
    assert np.shares_memory(tracin.Gradients(a[::2]).matrices[0], a)


def test_slicing_rows_gives_views(rng):
    a = rng.standard_normal((20, 3), dtype=np.float32)
    g = tracin.Gradients(a, weights=[2.0])[5:9]
    assert g.n_rows == 4 and np.shares_memory(g.matrices[0], a)
    assert g.weights.tolist() == [2.0]
    with pytest.raises(TypeError, match="contiguous row ranges"):
        tracin.Gradients(a)[::2]


@pytest.mark.parametrize(
    "matrices, weights, error, match",
    [
        (np.zeros(5, np.float32), None, ValueError, r"matrices\[0\] must be 2-D"),
        (np.zeros((2, 2), np.float64), None, TypeError, "float64; expected float32, float16 or bfloat16"),
        (np.zeros((2, 2), np.int32), None, TypeError, "int32"),
        ([np.zeros((2, 2), np.float32), np.zeros((3, 2), np.float32)], None, ValueError, "same number of rows"),
        (np.zeros((2, 2), np.float32), [1.0, 2.0], ValueError, "one per checkpoint"),
        (np.zeros((2, 2), np.float32), [np.nan], ValueError, "finite"),
        ([], None, ValueError, "at least one checkpoint"),
        (np.zeros((2, 2), np.float32), "abc", TypeError, "weights must be a sequence of real numbers"),
        (np.zeros((2, 2), np.float32), "1", TypeError, "weights must be a sequence of real numbers"),
        (np.zeros((2, 2), np.float32), b"1", TypeError, "weights must be a sequence of real numbers"),
        (np.zeros((2, 2), np.float32), ["1.5"], TypeError, "weights must be a sequence of real numbers"),
        ([np.zeros((2, 2), np.float32)] * 2, [1.0, "2"], TypeError, "weights must be a sequence of real numbers"),
        (np.zeros((2, 2), np.float32), [[1.0]], ValueError, r"weights must be 1-D"),
    ],
)
def test_gradients_validation(matrices, weights, error, match):
    with pytest.raises(error, match=match):
        tracin.Gradients(matrices, weights)


def test_a_list_of_one_d_rows_is_told_to_stack_them(rng):
    """review173 F3: per-example rows collected in a list were read as checkpoints ("matrices[0] must be
    2-D", or for lists of floats a dtype error whose advice only led there)."""
    rows = [rng.standard_normal(4, dtype=np.float32) for _ in range(3)]
    advice = r"a (list|tuple) is read as one \(rows, dims\) array per checkpoint; got a \1 of 3 1-D rows: "
    advice += r".*np\.(stack|asarray)"
    for value in (rows, tuple(rows), [r.tolist() for r in rows]):
        with pytest.raises(ValueError, match="^matrices: " + advice):
            tracin.Gradients(value)
    with pytest.raises(ValueError, match="^train: matrices: " + advice):
        tracin.scores(rng.standard_normal((2, 4), dtype=np.float32), rows)
    # review300 F3: width-1 gradients, one array per checkpoint, are the other reading: made into columns
    with pytest.raises(
        ValueError, match=r"\(np\.stack\(rows\)\); if each is one checkpoint's width-1 .*g\[:, None\]\)$"
    ):
        tracin.Gradients(rows)
    np.testing.assert_array_equal(tracin.Gradients([rows[0][:, None]]).matrices[0][:, 0], rows[0])
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"3 1-D rows: .*\(torch\.stack\(rows\)\); if each .*\(g\[:, None\]\)$"):
        tracin.Gradients([torch.from_numpy(r) for r in rows])
    with pytest.raises(ValueError, match="^right: a list is read as one"):
        tracin.FactoredGradients(np.ones((3, 2), np.float32), rows)
    # A list with one 2-D element is still one checkpoint; a mix of 1-D and 2-D keeps the per-checkpoint error.
    assert tracin.Gradients([np.stack(rows)]).n_rows == 3
    with pytest.raises(ValueError, match=r"matrices\[1\] must be 2-D"):
        tracin.Gradients([np.stack(rows), rows[0]])


_TWO = [np.zeros((2, 2), np.float32)] * 2


@pytest.mark.parametrize(
    "weights",
    [
        np.array(["1", "2"], dtype=object),
        [fractions.Fraction(1), "2"],
        [decimal.Decimal("1"), "2"],
        [None, 1],
        [True, False],
        np.array([True, False]),
        [1, np.bool_(True)],
        np.array([1 + 2j, 1]),
        np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[D]"),
        np.array([1, 2], dtype="timedelta64[s]"),
        bytearray(b"\x01\x02"),
        {1, 2},
    ],
    ids=repr,
)
def test_weights_that_are_not_real_numbers_are_refused(weights):
    with pytest.raises(TypeError, match=r"weights must be a sequence of real numbers \(one per checkpoint\), got"):
        tracin.Gradients(_TWO, weights)


@pytest.mark.parametrize(
    "weights",
    [
        [fractions.Fraction(1, 2), 2],
        [decimal.Decimal("0.5"), 2],
        np.array([0.5, 2], dtype=object),
        [np.float32(0.5), np.int64(2)],
        np.array([0.5, 2], np.float16),
        np.array([1, 2], np.uint8) / np.array([2, 1], np.uint8),
    ],
    ids=repr,
)
def test_weights_of_real_numbers_are_converted(weights):
    assert tracin.Gradients(_TWO, weights).weights.tolist() == [0.5, 2.0]


def test_weights_beyond_float64_are_not_finite():
    with pytest.raises(ValueError, match="weights must be finite as float64"):
        tracin.Gradients(_TWO, [10**400, 1])
    with pytest.raises(ValueError, match="weights must be finite"):
        tracin.Gradients(_TWO, [decimal.Decimal("1e400"), 1])


def test_weights_from_torch_tensors_are_detached_and_bfloat16_is_widened():
    torch = pytest.importorskip("torch")
    lr = torch.tensor([0.5, 2.0], requires_grad=True)  # a learning rate kept as a tensor of a graph
    assert tracin.Gradients(_TWO, lr).weights.tolist() == [0.5, 2.0]
    assert tracin.Gradients(_TWO, [lr[0], torch.tensor(2.0)]).weights.tolist() == [0.5, 2.0]
    assert tracin.Gradients(_TWO, torch.tensor([0.5, 2.0], dtype=torch.bfloat16)).weights.tolist() == [0.5, 2.0]
    assert tracin.Gradients(_TWO, [torch.tensor(0.1, dtype=torch.bfloat16), 2]).weights[0] == 0.10009765625
    assert tracin.Gradients(_TWO, torch.tensor([0.5, 2.0], dtype=torch.float16)).weights.tolist() == [0.5, 2.0]
    for bad in (torch.tensor([True, False]), [torch.tensor(True), 1], torch.tensor([1 + 0j, 1])):
        with pytest.raises(TypeError, match="weights must be a sequence of real numbers"):
            tracin.Gradients(_TWO, bad)


def test_bfloat16_weight_arrays_are_widened():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.array([0.1, 2.0], ml_dtypes.bfloat16)
    assert tracin.Gradients(_TWO, w).weights.tolist() == [0.10009765625, 2.0]


def test_a_signaling_nan_weight_is_not_finite():
    with pytest.raises(ValueError, match=r"weights must be finite, got \[Decimal\('sNaN'\), 1\]"):
        tracin.Gradients(_TWO, [decimal.Decimal("sNaN"), 1])


@pytest.mark.parametrize(
    "tiny",
    [decimal.Decimal("1e-400"), -decimal.Decimal("1e-400"), fractions.Fraction(1, 10**400), np.longdouble("1e-4000")],
    ids=["Decimal 1e-400", "Decimal -1e-400", "Fraction 1/10**400", "longdouble 1e-4000"],
)
def test_a_weight_that_is_not_zero_but_rounds_to_zero_is_refused(tiny):
    if isinstance(tiny, np.longdouble) and tiny == 0:
        pytest.skip("long double is float64 here")
    with pytest.raises(ValueError, match=r"weights\[1\] = .* is not 0 but rounds to 0 in float64"):
        tracin.Gradients(_TWO, [1.0, tiny])


def test_zero_negative_and_subnormal_weights_are_kept():
    assert tracin.Gradients(_TWO, [0.0, -0.5]).weights.tolist() == [0.0, -0.5]
    assert tracin.Gradients(_TWO, [decimal.Decimal(0), 5e-324]).weights.tolist() == [0.0, 5e-324]
    assert tracin.Gradients(_TWO, [1e-50, 1]).weights.tolist() == [1e-50, 1.0]  # with rows of 1e30, scores are fine


def test_metadata_must_be_a_dict():
    a = np.zeros((2, 2), np.float32)
    with pytest.raises(TypeError, match="metadata must be a dict .* got list"):
        tracin.Gradients(a, metadata=[("mode", "full")])
    with pytest.raises(TypeError, match="metadata must be a dict .* got str"):
        tracin.FactoredGradients(a, a, metadata="full")
    meta = {"mode": "full"}
    g = tracin.Gradients(a, metadata=meta)
    meta["mode"] = "changed"
    assert g.metadata == {"mode": "full"}  # a copy


def test_factored_validation(rng):
    left = rng.standard_normal((4, 3), dtype=np.float32)
    right = rng.standard_normal((4, 5), dtype=np.float32)
    f = tracin.FactoredGradients([left], [right], weights=[0.5])
    assert f.dims == ((3, 5),) and f.factored
    with pytest.raises(ValueError, match="left has 1 checkpoints but right has 2"):
        tracin.FactoredGradients([left], [right, right])
    with pytest.raises(ValueError, match="same number of rows"):
        tracin.FactoredGradients(left, right[:3])


@pytest.mark.parametrize(
    "view",
    [
        lambda a: np.broadcast_to(a[0], (6, 10)),  # row stride 0
        lambda a: np.lib.stride_tricks.sliding_window_view(a.ravel(), 10)[::4][:6],  # rows overlap
        lambda a: a[::-1][:6],  # negative row stride
    ],
    ids=["broadcast_to", "sliding_window_view", "reversed"],
)
def test_overlapping_or_reversed_rows_are_copied(rng, view):
    a = rng.standard_normal((8, 10), dtype=np.float32)
    rows = view(a)
    g = tracin.Gradients(rows)
    assert g.matrices[0].flags.c_contiguous and not np.shares_memory(g.matrices[0], a)
    np.testing.assert_array_equal(g.matrices[0], rows)


def test_row_stride_not_a_multiple_of_the_item_size_is_copied(rng):
    raw = np.zeros(6 * 42, np.uint8)
    rows = np.lib.stride_tricks.as_strided(raw[: 4 * 10].view(np.float32), (6, 10), (42, 4), writeable=False)
    values = rng.standard_normal((6, 10), dtype=np.float32)
    for r in range(6):
        raw[42 * r : 42 * r + 40] = values[r].view(np.uint8)
    g = tracin.Gradients(rows)
    assert g.matrices[0].flags.c_contiguous
    np.testing.assert_array_equal(g.matrices[0], values)


def test_kernel_side_is_a_named_tuple_of_row_views(rng):
    left = rng.standard_normal((5, 3), dtype=np.float32)
    right = rng.standard_normal((5, 4)).astype(np.float16)
    side = tracin.FactoredGradients(left, right).kernel_side(1, 4)
    assert isinstance(side, KernelSide) and side.factored and side.dtypes == [0, 1]
    factored, blocks, dtypes = side  # still a (factored, blocks, dtypes) tuple
    assert [b.shape for b in blocks] == [(3, 3), (3, 4)] and np.shares_memory(blocks[0], left)
    np.testing.assert_array_equal(blocks[1], right[1:4])


def test_slicing_rows_slices_every_checkpoint_and_factor(rng):
    """A slice of a set of several checkpoints (and of factored ones: left and right) takes the same rows of
    each block, scored by value against float64 NumPy (r266: only the first block sliced went unseen)."""
    mats = [rng.standard_normal((12, d), dtype=np.float32) for d in (5, 3, 4)]
    weights = [0.5, -1.5, 2.0]
    view = tracin.Gradients(mats, weights)[3:8]
    assert [m.shape for m in view.matrices] == [(5, 5), (5, 3), (5, 4)]
    for m, full in zip(view.matrices, mats, strict=True):
        np.testing.assert_array_equal(m, full[3:8])
    assert [b.tolist() for b in view.kernel_side(2).blocks] == [m[5:8].tolist() for m in mats]  # to the end
    exact = sum(w * (m[3:8].astype(np.float64) ** 2).sum(1) for w, m in zip(weights, mats, strict=True))
    np.testing.assert_allclose(tracin.self_influence(view), exact, rtol=1e-5, atol=1e-5)
    left = [rng.standard_normal((12, p), dtype=np.float32) for p in (2, 3)]
    right = [rng.standard_normal((12, q), dtype=np.float32) for q in (4, 2)]
    fview = tracin.FactoredGradients(left, right, [1.0, 3.0])[7:11]
    for got, full in zip(fview.left + fview.right, left + right, strict=True):
        np.testing.assert_array_equal(got, full[7:11])
    exact = sum(
        w * (lf[7:11].astype(np.float64) ** 2).sum(1) * (rt[7:11].astype(np.float64) ** 2).sum(1)
        for w, lf, rt in zip([1.0, 3.0], left, right, strict=True)
    )
    np.testing.assert_allclose(tracin.self_influence(fview), exact, rtol=1e-5)


def test_factored_default_weights_take_the_other_sides(rng):
    """A FactoredGradients built without weights takes the weights of the set it is scored against, on either
    side, as Gradients does (r310: weights_given always True passed; the given weights were then dropped when
    the default set was the train side)."""
    left = [rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 2, 5, 5)]
    right = [rng.standard_normal((n, 4)).astype(np.float32) for n in (2, 2, 5, 5)]
    weights = [0.5, 2.0]
    given = tracin.FactoredGradients(left[:2], right[:2], weights)
    default = tracin.FactoredGradients(left[2:], right[2:])
    assert given.weights_given and not default.weights_given
    exact = sum(
        w
        * (left[c].astype(np.float64) @ left[c + 2].T.astype(np.float64))
        * (right[c].astype(np.float64) @ right[c + 2].T.astype(np.float64))
        for c, w in enumerate(weights)
    )
    np.testing.assert_allclose(tracin.scores(given, default), exact, rtol=1e-5)
    np.testing.assert_allclose(tracin.scores(default, given), exact.T, rtol=1e-5)


def test_slicing_with_step_one_is_the_plain_slice(rng):
    """g[a:b:1] is g[a:b], as the TypeError's "step 1" promises (r310: every step refused passed)."""
    mats = [rng.standard_normal((6, 3)).astype(np.float32) for _ in range(2)]
    g = tracin.Gradients(mats, [0.5, 2.0])
    for view in (g[1:4:1], g[::1]):
        plain = g[1:4] if view.n_rows == 3 else g[:]
        for a, b in zip(view.matrices, plain.matrices, strict=True):
            assert np.shares_memory(a, b) and np.array_equal(a, b)
    with pytest.raises(TypeError, match="contiguous row ranges"):
        g[::2]


def test_a_path_among_the_arrays_is_named_with_its_place(rng):
    """A path in a list of arrays is refused pointing to GradientStore.open, naming its place (r310: the check
    of each array dropped passed)."""
    a = rng.standard_normal((2, 3)).astype(np.float32)
    for make, place in (
        (lambda: tracin.Gradients([a, "b.npy"]), "matrices[1]"),
        (lambda: tracin.FactoredGradients([a], ["b.npy"]), "right[0]"),
    ):
        with pytest.raises(TypeError, match=rf"^{re.escape(place)}: got a path \('b.npy'\); open the store with"):
            make()
