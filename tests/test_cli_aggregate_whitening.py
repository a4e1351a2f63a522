"""`tracin aggregate --whitening FILE`: whitened TracIn summed over the test set, as `tracin score --whitening`
scores it pair by pair (the --test rows whitened with a saved tracin.Whitening, the --train rows as they are)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tracin
from tracin.cli import main

DAMPING = 0.5
WEIGHTS = [0.5, 2.0]


def _store(path, blocks, metadata=None) -> str:
    w = tracin.GradientStore.create(
        path, len(blocks[0]), [b.shape[1] for b in blocks], weights=WEIGHTS, metadata=metadata
    )
    for c, b in enumerate(blocks):
        w.write(c, 0, b)
    w.finalize()
    return str(path)


@pytest.fixture
def sides(tmp_path, rng):
    """Two checkpoints' (6, 3) test and (30, 3) train rows, float32, with a few strongly correlated train columns
    (so that whitening changes the ranking), their stores, and a Whitening fitted on the train store, saved."""
    mix = np.array([[1.0, 0.9, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.2]])
    train = [(rng.standard_normal((30, 3)) @ mix).astype(np.float32) for _ in WEIGHTS]
    test = [rng.standard_normal((6, 3)).astype(np.float32) for _ in WEIGHTS]
    paths = {"test": _store(tmp_path / "te", test), "train": _store(tmp_path / "tr", train)}
    white = tmp_path / "white.npz"
    tracin.Whitening.fit(tracin.GradientStore.open(paths["train"]), damping=DAMPING, progress=False).save(white)
    return paths, test, train, str(white)


def _reference(test: list, train: list, whiten: bool = True) -> np.ndarray:
    """float64 (n,): sum_c w_c (sum_t t_c)^T (R_c + lambda_c I)^-1 x_c, R_c = X_c^T X_c / n of the train rows and
    lambda_c = DAMPING * trace(R_c) / d (the documented whitening); the plain TracIn sums without `whiten`."""
    total = np.zeros(len(train[0]))
    for w, t, x in zip(WEIGHTS, test, train, strict=True):
        g = x.astype(np.float64)
        r = g.T @ g / len(g)
        inverse = np.linalg.inv(r + DAMPING * np.trace(r) / len(r) * np.eye(len(r))) if whiten else np.eye(len(r))
        total += w * t.astype(np.float64).sum(0) @ inverse @ g.T
    return total


def _ranking(path) -> tuple[list[int], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["train_row"]) for r in rows], np.array([float(r["influence"]) for r in rows])


def _aggregate(paths: dict, *more: str) -> list[str]:
    return ["aggregate", "--test", paths["test"], "--train", paths["train"], *more]


@pytest.mark.parametrize("side", ["proponents", "opponents"])
def test_whitened_sums_are_the_float64_whitened_tracin_summed_over_test(side, sides, tmp_path, capsys):
    paths, test, train, white = sides
    out = tmp_path / "agg.csv"
    assert main(_aggregate(paths, "--whitening", white, "--side", side, "-o", str(out))) == 0
    assert "aggregate (whitened) influence of 6 test rows on 30 train rows, 30 ranked" in capsys.readouterr().err
    exact = _reference(test, train)
    order = np.argsort(exact if side == "opponents" else -exact, kind="stable")
    rows, values = _ranking(out)
    assert rows == order.tolist()
    np.testing.assert_allclose(values, exact[order], rtol=0, atol=1e-5 * np.abs(exact).max())
    plain = _reference(test, train, whiten=False)
    assert rows != np.argsort(plain if side == "opponents" else -plain, kind="stable").tolist()  # it whitened


def test_whitening_with_normalize_is_a_usage_error_naming_aggregate(sides, capsys):
    paths, _, _, white = sides
    assert main(_aggregate(paths, "--whitening", white, "--normalize")) == 2
    err = capsys.readouterr().err
    assert "--whitening and --normalize do not combine" in err
    assert "drop --normalize to aggregate whitened TracIn" in err


def test_an_already_whitened_test_store_is_refused(sides, tmp_path, capsys):
    paths, test, _, white = sides
    whitening = tracin.Whitening.load(white)
    whitened = whitening.apply(tracin.GradientStore.open(paths["test"]), progress=False)
    blocks = [np.asarray(m) for m in whitened.matrices]
    done = _store(tmp_path / "white-te", blocks, metadata=whitened.metadata)
    assert main(["aggregate", "--test", done, "--train", paths["train"], "--whitening", white]) == 1
    err = capsys.readouterr().err
    assert f"--whitening: --test store {done} is already whitened" in err


def test_a_whitening_of_other_dims_names_the_test_option(sides, tmp_path, rng, capsys):
    paths, _, _, _ = sides
    other = tmp_path / "other.npz"
    rows = [rng.standard_normal((20, 5)).astype(np.float32) for _ in WEIGHTS]
    tracin.Whitening.fit(tracin.Gradients(rows, WEIGHTS), damping=DAMPING, progress=False).save(other)
    assert main(_aggregate(paths, "--whitening", str(other))) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tracin aggregate: error: --whitening applied to --test: "), err


def test_on_a_local_cluster_the_whitened_sums_are_the_local_ones(sides, tmp_path):
    """--scheduler local: the whitened test rows (in memory) sent to the workers; the ranking is the local one."""
    pytest.importorskip("distributed")
    paths, _, _, white = sides
    local, spread = tmp_path / "local.csv", tmp_path / "spread.csv"
    assert main(_aggregate(paths, "--whitening", white, "-o", str(local))) == 0
    command = [sys.executable, "-m", "tracin", *_aggregate(paths, "--whitening", white, "-o", str(spread))]
    done = subprocess.run(
        [*command, "--scheduler", "local", "--workers", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert local.read_text() == spread.read_text()


def test_the_test_rows_are_summed_before_whitening_as_one_row(sides, monkeypatch):
    """Whitening is linear: the mean of --test's rows per checkpoint is whitened as one row (Whitening.apply of
    (1, d) rows), not all whitened and held in memory (test rows x dims, 30 s for 20000 x 4000: review370 F1);
    the sums are the float64 reference's (the first test above)."""
    paths, _, _, white = sides
    applied = []
    apply = tracin.Whitening.apply

    def counted(self, test, **kwargs):
        applied.append(test.n_rows)
        return apply(self, test, **kwargs)

    monkeypatch.setattr(tracin.Whitening, "apply", counted)
    assert main(_aggregate(paths, "--whitening", white, "-o", os.devnull)) == 0
    assert applied == [1]


def test_a_nan_test_row_is_named_with_its_option_and_store(sides, tmp_path, capsys):
    """A NaN in --test's rows is refused while they are summed, as plain aggregate refuses it (option, store,
    checkpoint, row), not as a NaN in a row 0 of the sums."""
    paths, test, _, white = sides
    broken = tmp_path / "nan-te"
    _store(broken, test)
    data = np.load(broken / "checkpoint_001.npy", mmap_mode="r+")
    data[4, 2] = np.nan
    data.flush()
    assert main(["aggregate", "--test", str(broken), "--train", paths["train"], "--whitening", white]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"tracin aggregate: error: --test {broken}: checkpoint 1 holds NaN or Inf values, first in rows [4]"
    ), err


def _white_stores(tmp_path, test, train, weights):
    paths = {}
    for name, blocks in (("test", test), ("train", train)):
        w = tracin.GradientStore.create(tmp_path / name, len(blocks[0]), [b.shape[1] for b in blocks], weights=weights)
        for c, b in enumerate(blocks):
            w.write(c, 0, b)
        w.finalize()
        paths[name] = str(tmp_path / name)
    white = tmp_path / "white.npz"
    tracin.Whitening.fit(tracin.GradientStore.open(paths["train"]), damping=DAMPING, progress=False).save(white)
    return paths, str(white)


def test_test_rows_whose_sum_whitens_beyond_float32_are_aggregated(tmp_path, rng, capsys):
    """Rows of 1e37 each whiten within float32 and their aggregate is in range, but their sum whitened is not: the
    whitened sum was refused as an overflow of 'rows from 0' (fr375 F1); the sum over a power of 2 is whitened, the
    aggregate scaled back in float64, as the float64 reference."""
    train = [(0.3 * rng.standard_normal((40, 3))).astype(np.float32) for _ in WEIGHTS]
    test = [np.full((7, 3), 1e37, np.float32) for _ in WEIGHTS]
    paths, white = _white_stores(tmp_path, test, train, [1e-3, 1e-3])
    out = tmp_path / "agg.csv"
    assert main(_aggregate(paths, "--whitening", white, "-o", str(out))) == 0, capsys.readouterr().err
    exact, widest = np.zeros(40), 0.0
    for t, x in zip(test, train, strict=True):
        g = x.astype(np.float64)
        r = g.T @ g / len(g)
        inverse = np.linalg.inv(r + DAMPING * np.trace(r) / len(r) * np.eye(len(r)))
        widest = max(widest, np.abs(t.astype(np.float64).sum(0) @ inverse).max())
        exact += 1e-3 * t.astype(np.float64).sum(0) @ inverse @ g.T
    assert np.abs(exact).max() < np.finfo(np.float32).max < widest  # the whitened sum alone is beyond float32
    rows, values = _ranking(out)
    assert rows == np.argsort(-exact, kind="stable").tolist()
    np.testing.assert_allclose(values, exact[rows], rtol=1e-5)


def test_a_refused_whitening_is_told_before_a_cluster_starts(sides, tmp_path, rng, monkeypatch, capsys):
    """A whitening of other dims was refused only once a cluster had started (5 s for --scheduler local; a 12 s
    "cannot connect" instead of the refusal for an unreachable scheduler: review370 F3): it is refused first."""
    import tracin.distributed._cluster

    paths, _, _, _ = sides
    other = tmp_path / "other.npz"
    rows = [rng.standard_normal((20, 5)).astype(np.float32) for _ in WEIGHTS]
    tracin.Whitening.fit(tracin.Gradients(rows, WEIGHTS), damping=DAMPING, progress=False).save(other)

    def started(n):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(tracin.distributed._cluster, "local_client", started)
    argv = _aggregate(paths, "--whitening", str(other), "--scheduler", "local", "--workers", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tracin aggregate: error: --whitening applied to --test: "), err


def test_a_whitened_test_store_with_normalize_is_told_to_aggregate_without_it(sides, tmp_path, capsys):
    paths, _, _, white = sides
    whitened = tracin.Whitening.load(white).apply(tracin.GradientStore.open(paths["test"]), progress=False)
    done = _store(tmp_path / "white-te", [np.asarray(m) for m in whitened.matrices], metadata=whitened.metadata)
    assert main(["aggregate", "--test", done, "--train", paths["train"], "--normalize"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        "--test is whitened and --train is not, so their cosine scores would compare different "
        "spaces; drop --normalize to aggregate them"
    ), err


def test_tiny_test_rows_keep_their_precision(tmp_path, rng, capsys):
    """Rows of float32 subnormals (multiples of 2^-149, weight 1e30): their sum is exact in float32, their mean is
    not (a 5e-3 relative error when the mean was whitened: fr377 F2); the sum is whitened where it fits."""
    train = [(0.3 * rng.standard_normal((40, 3))).astype(np.float32)]
    test = [(rng.integers(1, 8, (3000, 3)) * 2.0**-149).astype(np.float32)]
    paths, white = _white_stores(tmp_path, test, train, [1e30])
    out = tmp_path / "agg.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny rows are warned about (they are what is tested)
        assert main(_aggregate(paths, "--whitening", white, "-o", str(out))) == 0, capsys.readouterr().err
    g = train[0].astype(np.float64)
    r = g.T @ g / len(g)
    inverse = np.linalg.inv(r + DAMPING * np.trace(r) / len(r) * np.eye(len(r)))
    exact = 1e30 * test[0].astype(np.float64).sum(0) @ inverse @ g.T
    rows, values = _ranking(out)
    np.testing.assert_allclose(values, exact[rows], rtol=1e-4)


def test_a_scaled_sum_whitening_beyond_float32_names_the_largest_row_not_row_0(tmp_path, rng, capsys):
    """Where even the scaled sum whitens beyond float32, some row does: the refusal said 'rows from 0' of what was
    a sum (fr377 F3); it says so."""
    train = [(1e-3 * rng.standard_normal((20, 3))).astype(np.float32)]
    test = [np.concatenate([np.zeros((5, 3)), np.full((1, 3), 1e38)]).astype(np.float32)]
    paths, white = _white_stores(tmp_path, test, train, [1.0])
    assert main(_aggregate(paths, "--whitening", white)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "overflowed float32 (the sum of the rows, scaled: so the largest row's does)" in err, err
