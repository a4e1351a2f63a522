"""`tracin aggregate` beyond its ranking (r347 mutation testing of cli.cmd_aggregate: the train store's ids in the
train_id column, ties of many equal sums, --top 0, --threads / --device / --scheduler reaching the library, a
closed stdout and an output that is a store's own file refused before any work, NaN rows and other weights
naming their option were not pinned)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys

import numpy as np
import pytest

import tracin
from tracin.cli import main


def _store(path, mat, weight=0.5, ids=None):
    w = tracin.GradientStore.create(path, len(mat), [mat.shape[1]], weights=[weight], ids=ids)
    w.write(0, 0, mat)
    w.finalize()
    return str(path)


def _error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin aggregate: error: "), err
    return lines[0][len("tracin aggregate: error: ") :]


@pytest.fixture
def pair(tmp_path, rng):
    test = rng.standard_normal((3, 4)).astype(np.float32)
    train = rng.standard_normal((7, 4)).astype(np.float32)
    return test, train


@pytest.mark.parametrize("side", ["proponents", "opponents"])
def test_train_id_is_the_train_stores_id_of_the_row(side, pair, tmp_path):
    """train_id is the --train store's id of train_row (the --test store's ids, of other rows, are not used),
    CRLF-split ids ('\\r' at the end) kept whole through CSV quoting; against float64 NumPy's order."""
    test, train = pair
    test_ids = [f"test-{i}" for i in range(len(test))]
    train_ids = [f"ex{i}\r" if i % 2 else f"ex{i}" for i in range(len(train))]
    paths = _store(tmp_path / "te", test, ids=test_ids), _store(tmp_path / "tr", train, ids=train_ids)
    out = tmp_path / "agg.csv"
    assert main(["aggregate", "--test", paths[0], "--train", paths[1], "--side", side, "-o", str(out)]) == 0
    with open(out, newline="") as f:
        ranked = list(csv.DictReader(f))
    exact = 0.5 * (test.astype(np.float64) @ train.astype(np.float64).T).sum(0)
    order = np.argsort(exact if side == "opponents" else -exact, kind="stable")
    assert [int(r["train_row"]) for r in ranked] == order.tolist()
    assert [r["train_id"] for r in ranked] == [train_ids[i] for i in order]


def test_many_equal_sums_are_ranked_in_row_order(tmp_path, rng):
    """Hundreds of train rows of equal sums (repeats of four rows) come in row order on either side
    (np.argsort kind='stable'; NumPy's default sort does not keep the order of so many ties)."""
    test = rng.standard_normal((2, 8)).astype(np.float32)
    base = rng.standard_normal((4, 8)).astype(np.float32)
    which = rng.permutation(np.repeat(np.arange(4), 150))
    train = base[which]
    paths = _store(tmp_path / "te", test, weight=1.0), _store(tmp_path / "tr", train, weight=1.0)
    for side, sign in (("proponents", -1), ("opponents", 1)):
        out = tmp_path / f"{side}.csv"
        assert main(["aggregate", "--test", paths[0], "--train", paths[1], "--side", side, "-o", str(out)]) == 0
        got = [int(r["train_row"]) for r in csv.DictReader(open(out))]
        per_base = (test.astype(np.float64) @ base.astype(np.float64).T).sum(0)
        ranks = np.argsort(sign * per_base, kind="stable")  # the four distinct sums, far apart
        expected = [i for b in ranks for i in np.flatnonzero(which == b)]
        assert got == expected


@pytest.mark.parametrize("top", ["0", "-1"])
def test_top_below_one_is_a_usage_error(top, pair, tmp_path, capsys):
    test, train = pair
    paths = _store(tmp_path / "te", test), _store(tmp_path / "tr", train)
    with pytest.raises(SystemExit) as e:
        main(["aggregate", "--test", paths[0], "--train", paths[1], "--top", top])
    assert e.value.code == 2
    assert "--top" in capsys.readouterr().err


def test_threads_and_device_are_the_librarys(pair, tmp_path, monkeypatch):
    test, train = pair
    paths = _store(tmp_path / "te", test), _store(tmp_path / "tr", train)
    real, seen = tracin.aggregate, []
    monkeypatch.setattr(tracin, "aggregate", lambda *a, **k: seen.append(k) or real(*a, **k))
    for extra in (["--threads", "3", "--device", "cpu"], ["--threads", "2"]):
        assert main(["aggregate", "--test", paths[0], "--train", paths[1], "-o", str(tmp_path / "a.csv"), *extra]) == 0
    assert [(k["num_threads"], k["device"]) for k in seen] == [(3, "cpu"), (2, None)]


def test_scheduler_scores_on_the_cluster(pair, tmp_path, monkeypatch, capsys):
    """--scheduler: tracin.distributed.aggregate on the cluster's client (tracin.aggregate not called), with
    --threads and --normalize; its sums are what is ranked."""
    import tracin.distributed as td
    import tracin.distributed._cluster

    test, train = pair
    paths = _store(tmp_path / "te", test), _store(tmp_path / "tr", train)
    monkeypatch.setattr(tracin.distributed._cluster, "local_client", lambda n: contextlib.nullcontext("client"))
    monkeypatch.setattr(tracin, "aggregate", lambda *a, **k: pytest.fail("tracin.aggregate with --scheduler"))
    seen = []
    sums = np.array([0.5, -2.0, 3.0, 1.0, 0.0, -1.0, 2.0])

    def on_cluster(t, r, **kwargs):
        seen.append(({"test": t.path, "train": r.path}, kwargs))
        return sums

    monkeypatch.setattr(td, "aggregate", on_cluster)
    argv = ["aggregate", "--test", paths[0], "--train", paths[1], "--scheduler", "local", "--workers", "1"]
    assert main([*argv, "--threads", "2", "--normalize", "--no-progress"]) == 0
    [(stores, kwargs)] = seen
    assert {k: str(v) for k, v in stores.items()} == {"test": paths[0], "train": paths[1]}
    assert kwargs == {"client": "client", "num_threads": 2, "progress": False, "normalize": True}
    listed = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [int(r["train_row"]) for r in listed] == [2, 6, 3, 0, 4, 5, 1]
    assert [float(r["influence"]) for r in listed] == [3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]


def test_closed_stdout_is_refused_before_any_work(pair, tmp_path, capsys, monkeypatch):
    import tracin.cli as cli

    test, train = pair
    paths = _store(tmp_path / "te", test), _store(tmp_path / "tr", train)
    for spied in ("_open_store", "_cluster"):
        monkeypatch.setattr(cli, spied, lambda *a, **k: pytest.fail(f"{a} {k}: refused only after work"))
    monkeypatch.setattr(tracin, "aggregate", lambda *a, **k: pytest.fail("refused only after a pass"))
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["aggregate", "--test", paths[0], "--train", paths[1]]) == 1
    assert sys.stdout is None
    closed = "cannot write the results to stdout: it is closed; give -o FILE to write them to a file"
    assert capsys.readouterr().err == f"tracin aggregate: error: {closed}\n"


@pytest.mark.parametrize("option", ["--test", "--train"])
def test_an_output_that_is_a_file_of_a_store_read_is_refused(option, pair, tmp_path, capsys):
    """-o a hard link to a file of the --test or --train store: refused before any work, the store unchanged."""
    test, train = pair
    paths = {"--test": _store(tmp_path / "te", test), "--train": _store(tmp_path / "tr", train)}
    folder = tmp_path / ("te" if option == "--test" else "tr")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    link = tmp_path / "out.csv"
    os.link(folder / "checkpoint_000.npy", link)
    assert main(["aggregate", "--test", paths["--test"], "--train", paths["--train"], "-o", str(link)]) == 1
    said = _error(capsys.readouterr().err)
    assert f"--output {link} " in said and f"a file of the {option} gradient store" in said, said
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def _nan_store(path, mat, row):
    mat = mat.copy()
    _store(path, mat)
    data = np.load(next(path.glob("*.npy")), mmap_mode="r+")
    data[row] = np.nan
    data.flush()
    return str(path)


@pytest.mark.parametrize("side", ["test", "train"])
def test_a_nan_row_names_its_option_and_store(side, pair, tmp_path, capsys):
    test, train = pair
    nan_row = 1 if side == "test" else 5
    te = _nan_store(tmp_path / "te", test, nan_row) if side == "test" else _store(tmp_path / "te", test)
    tr = _nan_store(tmp_path / "tr", train, nan_row) if side == "train" else _store(tmp_path / "tr", train)
    assert main(["aggregate", "--test", te, "--train", tr]) == 1
    said = _error(capsys.readouterr().err)
    path = te if side == "test" else tr
    assert said.startswith(f"--{side} {path}: checkpoint 0 holds NaN or Inf values, first in rows [{nan_row}]"), said
    assert "export those examples again" in said


@pytest.mark.parametrize("command", ["score", "aggregate"])
def test_stores_of_other_weights_name_both_options(command, pair, tmp_path, capsys):
    """Stores of other checkpoint weights (learning rates) do not match: both options and paths are named, as for
    other dims, and what to do."""
    test, train = pair
    te, tr = _store(tmp_path / "te", test, weight=0.5), _store(tmp_path / "tr", train, weight=0.1)
    assert main([command, "--test", te, "--train", tr]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"tracin {command}: error: --test {te} and --train {tr} do not match: "), line
    assert "test and train carry different checkpoint weights ([0.5] vs [0.1])" in line, line
    assert line.endswith("give stores exported the same way (model, checkpoints, layers, mode, projection)"), line


def test_the_csv_is_written_to_stdout_whole(pair, tmp_path, monkeypatch):
    """Without -o: header and every row on stdout, nothing else there."""
    test, train = pair
    paths = _store(tmp_path / "te", test), _store(tmp_path / "tr", train)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    assert main(["aggregate", "--test", paths[0], "--train", paths[1], "--top", "4"]) == 0
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "rank,train_row,train_id,influence" and len(lines) == 5


def test_a_full_and_a_factored_store_name_both_options(pair, tmp_path, capsys):
    """A full --test and a factored --train (mode='full' and mode='last_layer' exports) do not match: both named."""
    test, _ = pair
    te = _store(tmp_path / "te", test)
    w = tracin.GradientStore.create(tmp_path / "tr", 5, [(2, 2)], weights=[0.5], factored=True)
    w.write(0, 0, (np.ones((5, 2), np.float32), np.ones((5, 2), np.float32)))
    w.finalize()
    tr = str(tmp_path / "tr")
    assert main(["aggregate", "--test", te, "--train", tr]) == 1
    said = _error(capsys.readouterr().err)
    assert said.startswith(f"--test {te} and --train {tr} do not match: test is full "), said
    assert "but train is factored" in said and said.endswith("(model, checkpoints, layers, mode, projection)"), said
