"""The demo's data: scikit-learn's bundled 8x8 digits with a fraction of training labels flipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoisyDigits:
    """x_*: float32 (n, 64) pixels in [0, 1]; y_*: int64 labels. y_train is the noisy label the
    model is trained on, y_train_clean the true one; train_index: int64 (n_train,) row of each training
    example in sklearn.datasets.load_digits()."""

    x_train: np.ndarray
    y_train: np.ndarray
    y_train_clean: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray

    @property
    def flipped(self) -> np.ndarray:
        """bool (n_train,): True where the training label was changed."""
        return self.y_train != self.y_train_clean

    @property
    def flip_rate(self) -> float:
        """The fraction of training labels actually flipped."""
        return float(self.flipped.mean())


def load_noisy_digits(noise: float, seed: int, n_train: int = 1400) -> NoisyDigits:
    """Splits the 1797 digits into n_train train and the rest test, and flips exactly
    round(noise * n_train) training labels, chosen at random, each to a different random class."""
    from sklearn.datasets import load_digits

    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    x, y = load_digits(return_X_y=True)
    if not 1 <= n_train < len(x):
        raise ValueError(f"n_train must be in [1, {len(x)}), got {n_train}")
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, test = order[:n_train], order[n_train:]
    clean = y[train].astype(np.int64)
    flip = rng.choice(n_train, size=round(noise * n_train), replace=False)
    noisy = clean.copy()
    noisy[flip] = (clean[flip] + rng.integers(1, 10, len(flip))) % 10
    return NoisyDigits(x[train], noisy, clean, x[test], y[test].astype(np.int64), train.astype(np.int64))
