"""load_noisy_digits refuses a noise of 1 or more and a train size that leaves no test row, naming the
argument and the interval its docstring and message promise (r369 mutants A1, A2)."""

from __future__ import annotations

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
