"""Edges of the shared argument checks (tracin._validate) and of as_matrix (tracin._arrays) that the
scoring tests do not reach directly: bounds of positive_int, NumPy booleans and integers, the thread
cap, one-column views taken without a copy, 3-D arrays, and DLPack arrays in pinned host memory
versus on a device (r354 mutation testing)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin._validate as validate
from tracin._arrays import as_matrix
from tracin._validate import flag, positive_int, thread_count


def test_positive_int_takes_one_and_the_maximum_itself_and_refuses_zero_and_bools():
    assert positive_int(1, "k") == 1
    assert positive_int(5, "k", maximum=5) == 5  # the bound is inclusive
    with pytest.raises(ValueError, match=r"^k must be a positive integer no larger than 5, got 6$"):
        positive_int(6, "k", maximum=5)
    with pytest.raises(ValueError, match=r"^k must be a positive integer, got 0$"):
        positive_int(0, "k")
    for value in (True, np.True_):
        with pytest.raises(TypeError, match=r"^k must be a positive integer, got"):
            positive_int(value, "k")


def test_positive_int_hands_back_a_python_int_for_a_numpy_integer():
    got = positive_int(np.int64(3), "k")
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [np.True_, np.False_, True, False])
def test_flag_takes_numpy_booleans_as_python_bools(value):
    got = flag(value, "normalize")
    assert got is bool(value)


def test_thread_count_none_means_all_cores_as_zero():
    assert thread_count(None) == 0
    assert thread_count(np.int32(3)) == 3


def test_capped_threads_caps_at_the_usable_cores_and_keeps_zero(monkeypatch):
    monkeypatch.setattr(validate, "usable_cores", lambda: 2)
    assert validate.capped_threads(8) == 2
    assert validate.capped_threads(2) == 2
    assert validate.capped_threads(1) == 1
    assert validate.capped_threads(0) == 0  # 0: every core, left to the kernel


def test_a_one_column_view_of_a_wider_array_is_taken_without_a_copy():
    """Rows of one number are contiguous runs whatever the column stride: no copy, same values."""
    wide = np.arange(12, dtype=np.float32).reshape(4, 3)
    column = wide[:, ::3]
    assert column.strides == (12, 12)
    got, dtype = as_matrix(column, "x")
    assert dtype == "float32"
    assert np.shares_memory(got, wide)
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float64), [[0.0], [3.0], [6.0], [9.0]])


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 1, 1)])
def test_a_3_d_array_is_refused_naming_the_argument_and_the_shape(shape):
    with pytest.raises(ValueError, match=rf"^x must be 2-D \(rows, dims\), got shape \({shape[0]}, "):
        as_matrix(np.zeros(shape, dtype=np.float32), "x")


class _DLPackLike:
    """A host-convertible array that reports a DLPack device (as a CuPy or JAX array would)."""

    def __init__(self, data: np.ndarray, device_type: int):
        self._data = data
        self._device_type = device_type

    def __array__(self, dtype=None, copy=None):
        return self._data

    def __dlpack_device__(self):
        return (self._device_type, 0)


def test_a_dlpack_array_in_pinned_host_memory_is_read_on_the_host():
    """kDLCUDAHost (3) is host memory: read as a NumPy array, never handed to torch as a device array."""
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    got, dtype = as_matrix(_DLPackLike(data, 3), "x", device_arrays=True)
    assert isinstance(got, np.ndarray) and dtype == "float32"
    np.testing.assert_array_equal(got, data)


def test_a_dlpack_array_on_a_device_is_not_silently_copied_to_the_host():
    """kDLCUDA (2) is device memory: it goes through DLPack (which this stand-in refuses), not __array__."""
    pytest.importorskip("torch")
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(TypeError, match=r"^x: torch cannot take this device array through DLPack"):
        as_matrix(_DLPackLike(data, 2), "x", device_arrays=True)
    got, _ = as_matrix(_DLPackLike(data, 2), "x")  # device_arrays=False: no device check at all
    np.testing.assert_array_equal(got, data)


class _BrokenDLPack(_DLPackLike):
    """An array-like whose __dlpack_device__ cannot answer: taken for a host array."""

    def __dlpack_device__(self):
        raise TypeError("no DLPack device here")


def test_an_array_whose_dlpack_device_cannot_answer_is_read_on_the_host():
    data = np.arange(6, dtype=np.float16).reshape(3, 2)
    got, dtype = as_matrix(_BrokenDLPack(data, 2), "x", device_arrays=True)
    assert isinstance(got, np.ndarray) and dtype == "float16"
    np.testing.assert_array_equal(got, data)


def test_a_1_d_device_tensor_is_refused_naming_the_argument_and_the_shape():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"^x must be 2-D \(rows, dims\), got shape \(5,\)$"):
        as_matrix(torch.empty(5, device="meta"), "x", device_arrays=True)


def test_a_device_tensor_with_broadcast_columns_is_copied_to_unit_column_stride():
    """Column stride 0 (one number repeated along a row) is no run of distinct numbers: copied on its device."""
    torch = pytest.importorskip("torch")
    repeated = torch.empty(3, 6, device="meta")[:, :1].expand(3, 4)
    assert repeated.stride() == (6, 0)
    got, dtype = as_matrix(repeated, "x", device_arrays=True)
    assert got.device.type == "meta" and dtype == "float32"
    assert got.shape == (3, 4) and got.stride() == (4, 1)


def test_a_cpu_bfloat16_tensor_comes_back_as_its_bits_shared_with_the_tensor():
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([[1.0, -2.5, 0.375], [3.0, 0.0, -0.0078125]])  # exact in bfloat16
    tensor = torch.tensor(values, dtype=torch.bfloat16)
    got, dtype = as_matrix(tensor, "x")
    assert dtype == "bfloat16" and got.dtype == np.uint16
    assert got.ctypes.data == tensor.data_ptr()  # no copy
    np.testing.assert_array_equal(got.view(ml_dtypes.bfloat16).astype(np.float64), values)
