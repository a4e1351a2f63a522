"""`tracin score` / `tracin aggregate` without --whitening, given a whitened store (Whitening.apply's rows saved)
whose whitening was fitted on another store than the other option's: one warning in the options' words, naming
both paths and store ids, with what to do from a shell (the library's own warning advises Python calls)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from store.helpers import write_store
from tracin.cli import main

WEIGHTS = [0.5, 2.0]
DIMS = [3, 4]


def _rows(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.standard_normal((n, d)).astype(np.float32) for d in DIMS]


def _whitened_store(path, fitted_on, rows) -> tracin.GradientStore:
    white = tracin.Whitening.fit(fitted_on, damping=0.3, progress=False).apply(rows, progress=False)
    return write_store(path, white.matrices, WEIGHTS, metadata=white.metadata)


@pytest.fixture
def stores(tmp_path, rng):
    train = write_store(tmp_path / "train", _rows(rng, 30), WEIGHTS)
    other = write_store(tmp_path / "other", _rows(rng, 30), WEIGHTS)
    test = write_store(tmp_path / "test", _rows(rng, 5), WEIGHTS)
    return train, other, test


def _argv(command: str, test, train, out) -> list[str]:
    return [command, "--test", str(test.path), "--train", str(train.path), "-o", str(out)]


def _warnings(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"tracin {command}: warning: ")]


@pytest.mark.parametrize("command", ["score", "aggregate"])
def test_a_whitened_test_store_fitted_on_another_store_is_warned_about_in_the_options_words(
    command, stores, tmp_path, capsys
):
    train, other, test = stores
    white = _whitened_store(tmp_path / "white", other, test)  # fitted on `other`, scored against `train`
    assert main(_argv(command, white, train, tmp_path / "out.csv")) == 0
    err = capsys.readouterr().err
    warned = _warnings(err, command)
    assert len(warned) == 1, err
    assert (
        f"--test {white.path} is whitened by a whitening fitted on another gradient store (id {other.store_id}) "
        f"than --train {train.path} (id {train.store_id})"
    ) in warned[0]
    assert "--whitening (a whitening fitted on --train)" in warned[0]
    assert "unless that was meant (a subset or a copy re-exported)" in warned[0]
    assert "Whitening.fit(" not in err and "apply it to" not in err  # no Python advice in a shell


@pytest.mark.parametrize("command", ["score", "aggregate"])
def test_a_whitened_train_store_fitted_on_another_store_than_test_is_warned_about(command, stores, tmp_path, capsys):
    """Whitened train rows (W g_train) need W fitted on those rows: rows of --train's store whitened by a whitening
    fitted on another store are warned of, in the options' words, whatever --test."""
    train, other, test = stores
    white = _whitened_store(tmp_path / "white", other, train)
    assert main(_argv(command, test, white, tmp_path / "out.csv")) == 0
    err = capsys.readouterr().err
    warned = _warnings(err, command)
    assert len(warned) == 1, err
    assert warned[0] == f"tracin {command}: warning: " + (
        f"--train {white.path} holds rows of a gradient store (id {train.store_id}) whitened by a whitening fitted "
        f"on another gradient store (id {other.store_id}): whiten --train's unwhitened store with a whitening "
        "fitted on it, or give the unwhitened --train with --whitening (a whitening fitted on it), unless that was "
        "meant (a subset or a copy re-exported)"
    )
    assert "Whitening.fit(" not in err


@pytest.mark.parametrize("command", ["score", "aggregate"])
def test_a_whitened_test_store_fitted_on_train_is_not_warned_about(command, stores, tmp_path, capsys):
    train, _, test = stores
    white = _whitened_store(tmp_path / "white", train, test)
    assert main(_argv(command, white, train, tmp_path / "out.csv")) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_warned_aggregate_is_the_float64_whitened_sum(tmp_path, rng, capsys):
    """The warning changes nothing scored: the sums are float64 sum_c w_c (sum_t t_c)^T (R_c + lambda_c I)^-1 x_c
    with R_c = O_c^T O_c / n of the other store's rows and lambda_c = 0.3 * trace(R_c) / d (the documented
    whitening), though float32 rows were saved."""
    blocks = {name: _rows(rng, n) for name, n in (("train", 30), ("other", 30), ("test", 5))}
    train = write_store(tmp_path / "train", blocks["train"], WEIGHTS)
    other = write_store(tmp_path / "other", blocks["other"], WEIGHTS)
    white = _whitened_store(tmp_path / "white", other, tracin.Gradients(blocks["test"], WEIGHTS))
    out = tmp_path / "agg.csv"
    assert main(_argv("aggregate", white, train, out)) == 0
    assert len(_warnings(capsys.readouterr().err, "aggregate")) == 1
    got = {}
    for line in out.read_text().splitlines()[1:]:
        fields = line.split(",")
        got[int(fields[1])] = float(fields[3])
    exact = np.zeros(30)
    for w, t, o, x in zip(WEIGHTS, blocks["test"], blocks["other"], blocks["train"], strict=True):
        g = o.astype(np.float64)
        r = g.T @ g / len(g)
        inverse = np.linalg.inv(r + 0.3 * np.trace(r) / len(r) * np.eye(len(r)))
        exact += w * (t.astype(np.float64).sum(0) @ inverse) @ x.astype(np.float64).T
    np.testing.assert_allclose([got[i] for i in range(30)], exact, rtol=0, atol=1e-5 * np.abs(exact).max())
