"""Arrays as they come in: non-native byte order (read by value, in memory and written to a store)
and paths given where gradient arrays belong."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import tracin
from reference import assert_close_to_exact, exact_scores

CAST = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
WEIGHTS = [0.5, 2.0]


def _swapped(x: np.ndarray) -> np.ndarray:
    """The same values in the other byte order (big-endian on a little-endian machine)."""
    out = x.astype(x.dtype.newbyteorder("S"))
    assert not out.dtype.isnative
    return out


def _sides(dtype: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(test, train): per checkpoint 5 and 9 rows of native `dtype` values."""
    test = [rng.standard_normal((5, d)).astype(CAST[dtype]) for d in (7, 3)]
    train = [rng.standard_normal((9, d)).astype(CAST[dtype]) for d in (7, 3)]
    return test, train


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_native_byte_order_is_scored_by_value(dtype, rng):
    test, train = _sides(dtype, rng)
    # the train side also column-strided: one copy then both reorders the bytes and packs the rows
    wide = [np.repeat(m, 2, axis=1) for m in train]
    swapped_test = [_swapped(m) for m in test]
    swapped_train = [_swapped(m)[:, ::2] for m in wide]
    t, x = tracin.Gradients(swapped_test, WEIGHTS), tracin.Gradients(swapped_train, WEIGHTS)
    assert all(m.dtype.isnative for m in t.matrices + x.matrices)
    assert t.dtypes == x.dtypes == (dtype, dtype)

    assert_close_to_exact(tracin.scores(t, x), test, train, WEIGHTS)
    exact = exact_scores(test, train, WEIGHTS)
    result = tracin.top_k(t, x, k=4)
    np.testing.assert_array_equal(result.indices, np.argsort(-exact, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(result.values, np.sort(exact, axis=1)[:, ::-1][:, :4], rtol=1e-5)
    self_exact = sum(w * (m.astype(np.float64) ** 2).sum(1) for w, m in zip(WEIGHTS, train, strict=True))
    np.testing.assert_allclose(tracin.self_influence(x), self_exact, rtol=1e-5)
    assert [m.dtype.isnative for m in swapped_test] == [False, False]  # the caller's arrays are left alone


@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("target", ["float32", "float16", "bfloat16"])
def test_non_native_byte_order_is_written_to_a_store_by_value(tmp_path, rng, source, target):
    test, train = _sides(source, rng)
    ids = np.arange(100, 109, dtype=np.int64)
    stores = []
    for name, blocks, id_array in [("native", train, ids), ("swapped", [_swapped(m) for m in train], _swapped(ids))]:
        w = tracin.GradientStore.create(tmp_path / name, 9, [7, 3], WEIGHTS, dtype=target, ids=id_array)
        for c, m in enumerate(blocks):
            w.write(c, 0, m[:4])
            w.write(c, 4, m[4:])
        stores.append(w.finalize())
    native, swapped = stores
    for c in range(2):
        np.testing.assert_array_equal(swapped.kernel_side().blocks[c], native.kernel_side().blocks[c])
    np.testing.assert_array_equal(swapped.ids, ids)
    stored = [m.astype(CAST[target]) for m in train]  # what the store holds: the values rounded to its dtype
    assert_close_to_exact(tracin.scores(tracin.Gradients(test), swapped), test, stored, WEIGHTS)
    self_exact = sum(w * (m.astype(np.float64) ** 2).sum(1) for w, m in zip(WEIGHTS, stored, strict=True))
    np.testing.assert_allclose(tracin.self_influence(swapped), self_exact, rtol=1e-5)


@pytest.mark.parametrize("path", ["grads/train", Path("grads/train")])
def test_a_path_where_gradients_belong_points_to_gradient_store_open(path, rng):
    test = rng.standard_normal((3, 4)).astype(np.float32)
    advice = r"got a path \('grads/train'\); open the store with tracin\.GradientStore\.open\(path\)"
    with pytest.raises(TypeError, match=rf"^train: {advice}$"):
        tracin.top_k(test, path)
    with pytest.raises(TypeError, match=rf"^test: {advice}$"):
        tracin.scores(path, test)
    with pytest.raises(TypeError, match=rf"^train: matrices\[1\]: {advice}$"):
        tracin.aggregate([test, test], [test, path])
    with pytest.raises(TypeError, match=rf"^{advice}$"):
        tracin.Gradients(path)
    with pytest.raises(TypeError, match=rf"^right: {advice}$"):
        tracin.FactoredGradients(test, path)


@pytest.mark.parametrize("bad", [None, b"bytes", {"a": 1}, 3.0])
def test_a_side_that_is_not_gradient_rows_is_refused_by_its_type(bad, rng):
    # review38 F5: None / bytes / a dict were "test: matrices[0] has dtype object ... convert with .astype"
    rows = rng.standard_normal((3, 4)).astype(np.float32)
    expected = r"must be gradient rows: a 2-D array, a list of them \(one per checkpoint\), a tracin\.Gradients"
    with pytest.raises(TypeError, match=rf"^test {expected}.*; got {type(bad).__name__}$"):
        tracin.top_k(bad, rows)
    with pytest.raises(TypeError, match=rf"^train {expected}.*; got {type(bad).__name__}$"):
        tracin.self_influence(bad)


@pytest.mark.parametrize("bad", [None, np.array([["a", "b"]]), {"a": 1}, np.array([[b"x"]])])
def test_a_checkpoint_matrix_of_no_numbers_is_refused_without_astype_advice(bad):
    expected = r"^matrices\[1\] must be an array of numbers; got \w+ \(NumPy reads it as dtype \w+\); expected a 2-D"
    with pytest.raises(TypeError, match=expected):
        tracin.Gradients([np.ones((2, 3), np.float32), bad])


@pytest.mark.parametrize(
    "numbers", [np.ones((2, 3)).astype(object), np.ones((2, 3), ml_dtypes.float8_e4m3fn), np.ones((2, 3), np.int32)]
)
def test_numbers_of_another_dtype_get_the_astype_advice(numbers):
    # fix-review39 F4: an object array of Python floats (DataFrame.values) or float8 holds numbers
    expected = r"^matrices\[0\] has dtype \w+; expected float32, float16 or bfloat16 \(convert with \.astype"
    with pytest.raises(TypeError, match=expected):
        tracin.Gradients(numbers)


@pytest.mark.parametrize("bits_dtype", [np.uint16, np.int16])
def test_16_bit_integers_are_taken_for_bfloat16_bits_never_given_astype_advice(bits_dtype, rng):
    # review136 F1: a bfloat16 GradientSet's .matrices are uint16 bits; ".astype(np.float32)" made integers of them
    values = rng.standard_normal((4, 10)).astype(ml_dtypes.bfloat16)
    bits = tracin.Gradients([values]).matrices[0].view(bits_dtype)
    projection = tracin.Projection(6, seed=0)
    advice = r"^matrix has dtype u?int16; .*bfloat16 bit patterns.*view\(ml_dtypes\.bfloat16\)"
    with pytest.raises(TypeError, match=advice) as e:
        projection.apply(bits)
    assert "astype" not in str(e.value)
    with pytest.raises(TypeError, match=r"^matrices\[0\] has dtype u?int16; .*view\(ml_dtypes\.bfloat16\)"):
        tracin.Gradients([bits])
    exact = values.astype(np.float64) @ _dense(projection, 10).T  # the advice followed, against float64
    np.testing.assert_allclose(projection.apply(bits.view(ml_dtypes.bfloat16)), exact, rtol=1e-5, atol=1e-6)


def test_16_bit_integer_torch_tensors_get_the_bfloat16_view_advice(rng):
    torch = pytest.importorskip("torch")
    bits = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32)).to(torch.bfloat16).view(torch.int16)
    with pytest.raises(TypeError, match=r"^matrix has dtype torch\.int16; .*x\.view\(torch\.bfloat16\)"):
        tracin.Projection(4).apply(bits)


@pytest.mark.parametrize("dtype", ["float64", "int32"])
def test_torch_tensors_of_another_dtype_get_the_float_advice(dtype, rng):
    # review152 F5: a float64 tensor (torch.set_default_dtype, data from NumPy) was refused with no fix,
    # while a NumPy array gets ".astype(np.float32)"
    torch = pytest.importorskip("torch")
    from tracin._arrays import _device_tensor

    rows = rng.standard_normal((3, 4))
    tensor = torch.from_numpy(rows).to(getattr(torch, dtype))
    advice = rf" has dtype torch\.{dtype}; expected float32, float16 or bfloat16 \(convert with \.float\(\)\)$"
    with pytest.raises(TypeError, match=r"^matrices\[0\]" + advice):
        tracin.Gradients([tensor])
    with pytest.raises(TypeError, match="^x" + advice):  # a tensor on a GPU, as _device_tensor checks it there
        _device_tensor(tensor, "x")
    values = tensor.numpy().astype(np.float32).astype(np.float64)  # the advice followed, against float64
    np.testing.assert_allclose(tracin.self_influence(tensor.float()), (values**2).sum(1), rtol=1e-6)


def test_torch_tensors_are_read_without_torch_uint16(monkeypatch, rng):
    # torch 2.1 / 2.2 (pyproject allows them) have no torch.uint16: every float tensor raised AttributeError
    torch = pytest.importorskip("torch")
    monkeypatch.delattr(torch, "uint16", raising=False)
    rows = rng.standard_normal((3, 4)).astype(np.float32)
    projection = tracin.Projection(4)
    np.testing.assert_array_equal(projection.apply(torch.from_numpy(rows)), projection.apply(rows))
    with pytest.raises(TypeError, match=r"^matrix has dtype torch\.int16; .*x\.view\(torch\.bfloat16\)"):
        projection.apply(torch.from_numpy(rows).to(torch.bfloat16).view(torch.int16))


def _dense(projection: tracin.Projection, d: int) -> np.ndarray:
    """P (dim, d) in float64, read column by column from the projections of the unit vectors."""
    return projection.apply(np.eye(d, dtype=np.float32)).T.astype(np.float64)


@pytest.mark.parametrize("rows", [[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], ([1, 2, 3], [4, 5, 6])])
def test_a_list_of_rows_gets_np_asarray_advice_not_astype(rows):
    # review69 F6: a Python list has no .astype; review173 F3: a list of rows is not read as checkpoints
    expected = r"^train: matrices\[0\] has dtype \w+; .* \(convert with np\.asarray\(x, dtype=np\.float32\)\)$"
    with pytest.raises(TypeError, match=expected):
        tracin.self_influence([rows])  # one checkpoint
    stack = r"^train: matrices: a \w+ is read as one .* 2 1-D rows: .*\(np\.asarray\(rows, dtype=np\.float32\)\)$"
    with pytest.raises(ValueError, match=stack):
        tracin.self_influence(rows)
    np.testing.assert_allclose(
        tracin.self_influence(np.asarray(rows, dtype=np.float32)), (np.asarray(rows, np.float64) ** 2).sum(1), rtol=1e-6
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_tensor_subclasses_and_negated_views_are_read_as_tensors(dtype, rng):
    """A Tensor subclass from another package is still a tensor (bfloat16 has no NumPy form), and a
    lazily negated view (neg bit set, which .numpy() refuses) is read by value."""
    torch = pytest.importorskip("torch")

    class Foreign(torch.Tensor):
        pass

    Foreign.__module__ = "otherlib.tensors"
    test, train = _sides("float32", rng)
    tensor = getattr(torch, dtype)
    as_float64 = [torch.from_numpy(m).to(tensor).double().numpy() for m in test]  # the values rounded to dtype
    sub = [torch.from_numpy(m).to(tensor).as_subclass(Foreign) for m in test]
    assert_close_to_exact(tracin.scores(tracin.Gradients(sub, WEIGHTS), train), as_float64, train, WEIGHTS)
    negated = [torch.from_numpy(-m).to(tensor)._neg_view() for m in test]
    assert negated[0].is_neg()
    assert_close_to_exact(tracin.scores(tracin.Gradients(negated, WEIGHTS), train), as_float64, train, WEIGHTS)
    projected = tracin.Projection(4, 1).apply(negated[0])
    np.testing.assert_array_equal(projected, tracin.Projection(4, 1).apply(negated[0].resolve_neg()))


def test_a_sparse_torch_tensor_is_refused_by_name(rng):
    torch = pytest.importorskip("torch")
    sparse = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32)).to_sparse()
    with pytest.raises(TypeError, match=r"train: .*layout torch\.sparse_coo; pass a dense one \(\.to_dense\(\)\)"):
        tracin.self_influence(sparse)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::2][:, :2],  # two columns, column-strided: one row is not one run
        lambda a: a[:2][::-1],  # two rows, reversed: a negative row stride
        lambda a: np.broadcast_to(a[0], (2, a.shape[1])),  # two rows, one memory: row stride 0
    ],
    ids=["two_strided_columns", "two_reversed_rows", "two_broadcast_rows"],
)
def test_two_row_or_two_column_views_are_scored_by_value(view, rng):
    """The smallest shapes whose layout still needs the copy: 2 columns, 2 rows (r266)."""
    a = rng.standard_normal((6, 8), dtype=np.float32)
    rows = view(a)
    other = rng.standard_normal((3, rows.shape[1]), dtype=np.float32)
    g = tracin.Gradients(rows)
    np.testing.assert_array_equal(g.matrices[0], rows)
    assert_close_to_exact(tracin.scores(tracin.Gradients(other), g), [other], [np.ascontiguousarray(rows)], [1.0])
    np.testing.assert_allclose(tracin.self_influence(g), (rows.astype(np.float64) ** 2).sum(1), rtol=1e-5)


def test_rows_whose_stride_is_no_multiple_of_the_item_size_are_scored_by_value(rng):
    """A field of a structured array: rows 13 bytes apart, 4-byte floats (r297 M7: taken for rows in
    runs, handed to the kernel uncopied, which refused them as not contiguous)."""
    records = np.zeros(6, dtype=[("g", "<f4", (3,)), ("tag", "u1")])
    records["g"] = rng.standard_normal((6, 3))
    rows = records["g"]
    assert rows.strides == (13, 4)
    other = rng.standard_normal((4, 3), dtype=np.float32)
    assert_close_to_exact(tracin.scores(other, rows), [other], [np.ascontiguousarray(rows)], [1.0])


@pytest.mark.parametrize(
    ("leaf", "words"),
    [(1, "an int"), (1.5, "a float"), ("x", "a str"), (np.float32(1), "a NumPy float32 scalar")],
)
def test_a_scalar_leaf_is_named_with_its_article(leaf, words):
    """The data errors of torch and JAX name a leaf without a batch dimension as 'an int', 'a float' (r297 M9)."""
    from tracin._arrays import scalar_leaf_kind

    assert scalar_leaf_kind(leaf) == words


@pytest.mark.parametrize(
    "view",
    [lambda t: t[:1].expand(3, 6), lambda t: t[:, ::2], lambda t: t.as_strided((3, 4), (2, 1))],
    ids=["broadcast_rows", "strided_columns", "overlapping_rows"],
)
def test_a_device_tensor_whose_rows_are_not_runs_is_copied_on_its_device(view):
    """as_matrix(device_arrays=True) keeps a device tensor on its device, copied when rows overlap or are
    column-strided (r297 M8: rows one memory or overlapping went on uncopied); "meta" stands for the GPU."""
    torch = pytest.importorskip("torch")
    from tracin._arrays import as_matrix

    rows = view(torch.empty(3, 6, device="meta"))
    got, dtype = as_matrix(rows, "x", device_arrays=True)
    assert got.device.type == "meta" and dtype == "float32" and got.shape == rows.shape
    assert got.stride(1) == 1 and got.stride(0) >= got.shape[1]
    assert as_matrix(torch.empty(3, 6, device="meta")[:, :4], "x", device_arrays=True)[0].stride() == (6, 1)
