"""`tracin aggregate --whitening`: where one checkpoint's summed --test rows whiten beyond float32 and another's
are float32 subnormals, each checkpoint keeps its own scaling, and the sums stay within the scale-aware bound of
the float64 reference (one power-of-2 divisor for every checkpoint cut the subnormals' low bits: 5.8x the bound)."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

import tracin
import tracin.cli
from tracin.cli import main

DAMPING = 0.5
WEIGHTS = [1e-40, 1e38]


def _store(path, blocks) -> str:
    w = tracin.GradientStore.create(path, len(blocks[0]), [b.shape[1] for b in blocks], weights=WEIGHTS)
    for c, b in enumerate(blocks):
        w.write(c, 0, b)
    w.finalize()
    return str(path)


@pytest.fixture
def sides(tmp_path, rng):
    """Checkpoint 0: rows of 1e37 (each whitens within float32, their sum does not), checkpoint 1: multiples of
    2^-149 with a weight of 1e38, so that both checkpoints' terms count."""
    train = [(0.3 * rng.standard_normal((40, 3))).astype(np.float32) for _ in WEIGHTS]
    test = [np.full((7, 3), 1e37, np.float32), (rng.integers(1, 2**10, (7, 3)) * 2.0**-149).astype(np.float32)]
    paths = {"test": _store(tmp_path / "te", test), "train": _store(tmp_path / "tr", train)}
    white = tmp_path / "white.npz"
    tracin.Whitening.fit(tracin.GradientStore.open(paths["train"]), damping=DAMPING, progress=False).save(white)
    return paths, test, train, str(white)


def _reference(test, train):
    """float64 sums over test of sum_c w_c t_c^T (R_c + lambda_c I)^-1 x_c (R_c = X_c^T X_c / n, lambda_c =
    DAMPING * trace(R_c) / d), with the scale-aware bound 1e-5 * sum_c |w_c| sum_t |white t_c| |x_c| per row, and
    each checkpoint's largest term."""
    exact, bound, terms = np.zeros(len(train[0])), np.zeros(len(train[0])), []
    for w, t, x in zip(WEIGHTS, test, train, strict=True):
        g = x.astype(np.float64)
        r = g.T @ g / len(g)
        white = t.astype(np.float64) @ np.linalg.inv(r + DAMPING * np.trace(r) / len(r) * np.eye(len(r)))
        term = w * white.sum(0) @ g.T
        exact += term
        terms.append(np.abs(term).max())
        bound += 1e-5 * abs(w) * np.linalg.norm(white, axis=1).sum() * np.linalg.norm(g, axis=1)
    return exact, bound, terms


def _aggregated(paths, white, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny rows are warned about (they are what is tested)
        assert main(["aggregate", "--test", paths["test"], "--train", paths["train"], "--whitening", white,
                     "-o", str(out)]) == 0  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["train_row"]) for r in rows]), np.array([float(r["influence"]) for r in rows])


def test_each_checkpoint_keeps_its_own_scaling_within_the_bound(sides, tmp_path):
    paths, test, train, white = sides
    exact, bound, terms = _reference(test, train)
    assert min(terms) > 1e-3 * max(terms)  # both checkpoints count
    rows, values = _aggregated(paths, white, tmp_path / "agg.csv")
    assert np.all(np.abs(values - exact[rows]) <= bound[rows]), (np.abs(values - exact[rows]) / bound[rows]).max()


def test_many_copies_fall_back_to_one_divisor_for_all(sides, tmp_path, monkeypatch):
    """Where the copies of a divided sum would take too much memory, one divisor for all, the aggregate scaled back
    in float64: within the bound where no row is subnormal (checkpoint 1's rows scaled up to normal ones)."""
    paths, test, train, white = sides
    monkeypatch.setattr(tracin.cli, "_COPIES_BYTES", 0)
    test = [test[0], test[1] * np.float32(2.0**40)]
    paths["test"] = _store(tmp_path / "te-normal", test)
    exact, bound, _ = _reference(test, train)
    rows, values = _aggregated(paths, white, tmp_path / "agg.csv")
    assert rows.tolist() == np.argsort(-exact, kind="stable").tolist()
    assert np.all(np.abs(values - exact[rows]) <= bound[rows])
