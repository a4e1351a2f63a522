"""load_noisy_digits refuses a noise of 1 or more and a train size that leaves no test row, naming the
argument and the interval its docstring and message promise, and returns the dtypes its docstring
names (r369 mutants A1, A2, V6)."""

from __future__ import annotations

import numpy as np
import pytest

from tracin.demo.data import load_noisy_digits

DIGITS = 1797  # rows of sklearn.datasets.load_digits()


@pytest.mark.parametrize("noise", [1.0, -0.1, 1.5])
def test_a_noise_outside_zero_to_one_is_refused_naming_it(noise):
    with pytest.raises(ValueError, match=rf"noise must be in \[0, 1\), got {noise}"):
        load_noisy_digits(noise, seed=0)


@pytest.mark.parametrize("n_train", [0, DIGITS, DIGITS + 1])
def test_a_train_size_that_leaves_no_train_or_test_row_is_refused(n_train):
    with pytest.raises(ValueError, match=rf"n_train must be in \[1, {DIGITS}\), got {n_train}"):
        load_noisy_digits(0.2, seed=0, n_train=n_train)


def test_the_largest_train_size_leaves_one_test_row():
    data = load_noisy_digits(0.5, seed=1, n_train=DIGITS - 1)
    assert (len(data.x_train), len(data.x_test)) == (DIGITS - 1, 1)
    assert data.flipped.sum() == round(0.5 * (DIGITS - 1))


def test_the_arrays_have_the_documented_dtypes_and_shapes():
    data = load_noisy_digits(0.2, seed=0, n_train=100)
    assert (data.x_train.dtype, data.x_test.dtype) == (np.float32, np.float32)
    assert data.x_train.shape == (100, 64) and data.x_test.shape == (DIGITS - 100, 64)
    for labels in (data.y_train, data.y_train_clean, data.y_test, data.train_index):
        assert labels.dtype == np.int64
    assert (data.y_test.shape, data.train_index.shape) == ((DIGITS - 100,), (100,))
