"""Gradients / FactoredGradients: accepted inputs, zero-copy views, validation errors."""

from __future__ import annotations

import numpy as np
import pytest

import tracin


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
        (np.zeros((2, 2), np.float32), "abc", TypeError, "weights must be a sequence of numbers"),
        (np.zeros((2, 2), np.float32), [[1.0]], ValueError, r"weights must be 1-D"),
    ],
)
def test_gradients_validation(matrices, weights, error, match):
    with pytest.raises(error, match=match):
        tracin.Gradients(matrices, weights)


def test_factored_validation(rng):
    left = rng.standard_normal((4, 3), dtype=np.float32)
    right = rng.standard_normal((4, 5), dtype=np.float32)
    f = tracin.FactoredGradients([left], [right], weights=[0.5])
    assert f.dims == ((3, 5),) and f.factored
    with pytest.raises(ValueError, match="left has 1 checkpoints but right has 2"):
        tracin.FactoredGradients([left], [right, right])
    with pytest.raises(ValueError, match="same number of rows"):
        tracin.FactoredGradients(left, right[:3])
