"""The suite's datasets: scikit-learn's bundled tables and a synthetic one, split into train,
validation and test rows and standardised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1  # of all rows, held out of training: what checkpoint choices are made on
DEMO_TRAIN = 1400


SPLIT = {"train": 0.7, "validation": VALIDATION_FRACTION, "test": TEST_FRACTION, "checkpoints_chosen_on": "validation"}


@dataclass(frozen=True)
class Split:
    """x_*: float32 (n, features), standardised with the training mean and deviation; y_*: int64 (n,).
    The validation rows choose checkpoints (held-out peak); the test rows are only measured on."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name in ("digits", "digits_demo"):
        return datasets.load_digits(return_X_y=True)
    if name == "breast_cancer":
        return datasets.load_breast_cancer(return_X_y=True)
    if name == "wine":
        return datasets.load_wine(return_X_y=True)
    if name == "synthetic":
        return datasets.make_classification(
            n_samples=1500,
            n_features=20,
            n_informative=10,
            n_redundant=4,
            n_classes=4,
            class_sep=1.0,
            flip_y=0.0,
            random_state=0,
        )
    raise ValueError(f"dataset must be one of digits, digits_demo, breast_cancer, wine, synthetic; got {name!r}")


def load(name: str, seed: int = 0) -> Split:
    """A random 70/10/20 train/validation/test split of dataset `name` (fixed by `seed`),
    standardised. "digits_demo" is the `tracin demo` setting instead: 1400 training digits, pixels
    scaled to [0, 1], then the validation rows, the rest for test."""
    x, y = _raw(name)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = round(VALIDATION_FRACTION * len(x))
    n_train = DEMO_TRAIN if name == "digits_demo" else len(x) - round(TEST_FRACTION * len(x)) - n_val
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std[std == 0] = 1.0
    if name == "digits_demo":
        mean, std = np.zeros_like(mean), np.full_like(std, 16.0)

    def scale(rows: np.ndarray) -> np.ndarray:
        return ((x[rows] - mean) / std).astype(np.float32)

    return Split(
        name,
        scale(train),
        y[train].astype(np.int64),
        scale(val),
        y[val].astype(np.int64),
        scale(test),
        y[test].astype(np.int64),
    )


def flip_labels(y: np.ndarray, classes: int, fraction: float, seed: int) -> np.ndarray:
    """A copy of `y` with exactly round(fraction * len(y)) labels, chosen at random, each changed to
    a different random class; at least one (mislabel detection measures the share of them found)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    count = round(fraction * len(y))
    if count < 1:
        raise ValueError(
            f"fraction={fraction} of {len(y)} labels flips none; mislabel detection needs at least one flipped label"
        )
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(y), size=count, replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, classes, len(rows))) % classes
    return noisy
