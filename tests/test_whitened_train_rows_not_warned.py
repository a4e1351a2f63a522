"""A whitening applied to the very store it was fitted on (W g_train, whitened TracIn's other form) and given as
the train argument against any test rows is whitened TracIn: neither the library nor the CLI warns that it was
"fitted on another gradient store than the test store" (its advice, fit on the test gradients, contradicted the
design); the same rows as the test argument, and a whitening applied to another store than it was fitted on,
still warn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
from store.helpers import write_store
from tracin.cli import main

WEIGHTS = [0.5, 2.0]
DIMS = [5, 3]
ELSEWHERE = "fitted on another gradient store"


def _rows(rng, n):
    return [rng.standard_normal((n, d)).astype(np.float32) for d in DIMS]


def _warned(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(r.message) for r in record if ELSEWHERE in str(r.message)]


@pytest.fixture
def sides(tmp_path, rng):
    test_rows, train_rows = _rows(rng, 4), _rows(rng, 12)
    test = write_store(tmp_path / "test", test_rows, WEIGHTS)
    train = write_store(tmp_path / "train", train_rows, WEIGHTS)
    w = tracin.Whitening.fit(train, damping=0.5, progress=False)
    white = w.apply(train, progress=False)
    saved = write_store(tmp_path / "white train", white.matrices, WEIGHTS, metadata=white.metadata)
    return test, train, test_rows, train_rows, white, saved


def _reference(test_rows, train_rows, damping=0.5):
    """float64: sum_c w_c g_c(t)^T (R_c + lambda_c I)^-1 g_c(i), R_c the train rows' second moment."""
    out = 0.0
    for w, t, x in zip(WEIGHTS, test_rows, train_rows, strict=True):
        t, x = t.astype(np.float64), x.astype(np.float64)
        r = x.T @ x / len(x)
        out = out + w * t @ np.linalg.inv(r + damping * np.trace(r) / len(r) * np.eye(len(r))) @ x.T
    return out


def test_the_library_scores_whitened_train_rows_without_the_warning(sides):
    test, train, test_rows, train_rows, white, saved = sides
    assert white.metadata["whitened_store"] == train.store_id
    for whitened in (white, saved):
        assert _warned(lambda w=whitened: tracin.scores(test, w)) == []
        # as the test argument the same rows read as a whitening fitted on the test rows: still warned of
        assert len(_warned(lambda w=whitened: tracin.scores(w, test))) == 1
    np.testing.assert_allclose(tracin.scores(test, saved), _reference(test_rows, train_rows), rtol=2e-5, atol=1e-5)


def test_the_cli_scores_a_whitened_train_store_without_the_warning(sides, tmp_path, capsys):
    test, _, test_rows, train_rows, _, saved = sides
    out = tmp_path / "agg.csv"
    said = _warned(lambda: main(["aggregate", "--test", str(test.path), "--train", str(saved.path), "-o", str(out)]))
    assert said == [] and ELSEWHERE not in capsys.readouterr().err
    table = np.genfromtxt(out, delimiter=",", names=True)
    expect = _reference(test_rows, train_rows).sum(axis=0)
    np.testing.assert_allclose(table["influence"][np.argsort(table["train_row"])], expect, rtol=2e-5, atol=1e-4)


def test_whitened_rows_of_another_store_than_fitted_on_still_warn(sides, tmp_path, rng, capsys):
    test, train, *_ = sides
    other = write_store(tmp_path / "other", _rows(rng, 12), WEIGHTS)
    w = tracin.Whitening.fit(train, damping=0.5, progress=False)
    white_other = w.apply(other, progress=False)
    assert white_other.metadata["whitened_store"] == other.store_id
    assert len(_warned(lambda: tracin.scores(test, white_other))) == 1
    saved = write_store(tmp_path / "white other", white_other.matrices, WEIGHTS, metadata=white_other.metadata)
    capsys.readouterr()
    assert main(["score", "--test", str(test.path), "--train", str(saved.path), "-o", str(tmp_path / "o.csv")]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if ELSEWHERE in line]
    assert len(said) == 1, said
    assert said[0].startswith(f"tracin score: warning: --train {saved.path} holds rows of a gradient store (id "), said


def test_train_rows_whitened_by_a_whitening_fitted_on_the_test_store_warn(sides):
    """W fitted on the test store T applied to the train store X and scored against T: the same scores as W_T g_T
    against X, which warns; it was silent as the train argument, its fitted_on being the other side's id."""
    test, train, *_ = sides
    w_test = tracin.Whitening.fit(test, damping=0.5, progress=False)
    white_train = w_test.apply(train, progress=False)
    found = _warned(lambda: tracin.scores(test, white_train))
    assert len(found) == 1 and f"(id {test.store_id})" in found[0] and f"(id {train.store_id})" in found[0], found
    assert len(_warned(lambda: tracin.scores(w_test.apply(test, progress=False), train))) == 1
