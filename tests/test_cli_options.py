"""Command-line options reach the library as given (r266 mutation testing: --threads was never checked
to arrive, and self-influence's order of equal scores was not pinned)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import tracin
from tracin.cli import main


def _store(path, mat, weight=0.5):
    w = tracin.GradientStore.create(path, len(mat), [mat.shape[1]], weights=[weight])
    w.write(0, 0, mat)
    w.finalize()
    return str(path)


@pytest.fixture
def two(tmp_path, rng):
    test = _store(tmp_path / "test", rng.standard_normal((3, 4)).astype(np.float32))
    train = _store(tmp_path / "train", rng.standard_normal((6, 4)).astype(np.float32))
    return test, train


@pytest.mark.parametrize("command", ["score", "self-influence"])
def test_threads_option_is_the_librarys_num_threads(command, two, tmp_path, monkeypatch):
    library = "top_k" if command == "score" else "self_influence"
    real, seen = getattr(tracin, library), []
    monkeypatch.setattr(tracin, library, lambda *a, **k: seen.append(k) or real(*a, **k))
    args = ["score", "--test", two[0], "--train", two[1]] if command == "score" else ["self-influence", two[1]]
    assert main([*args, "--threads", "3", "-o", str(tmp_path / "out.csv")]) == 0
    assert [k["num_threads"] for k in seen] == [3]


def test_self_influence_ranks_equal_scores_by_row(tmp_path, rng):
    """Rows of equal self-influence are listed in row order (np.argsort(-scores, kind='stable'))."""
    rows = rng.standard_normal((3, 4)).astype(np.float32)
    mat = rows[[0, 1, 0, 2, 1, 0]]  # rows 0, 2, 5 and 1, 4 tie
    path = _store(tmp_path / "train", mat, weight=1.0)
    out = tmp_path / "rank.csv"
    assert main(["self-influence", path, "-o", str(out)]) == 0
    ranked = list(csv.DictReader(open(out)))
    got = [int(r["train_row"]) for r in ranked]
    assert [r["train_id"] for r in ranked] == [r["train_row"] for r in ranked]  # a store without ids: the row
    exact = (mat.astype(np.float64) ** 2).sum(1)
    assert got == np.argsort(-exact, kind="stable").tolist()
    assert [r for r in got if r in (0, 2, 5)] == [0, 2, 5] and [r for r in got if r in (1, 4)] == [1, 4]


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
def test_score_csv_rows_name_the_side_and_rows_of_stores_without_ids(side, two, tmp_path, rng):
    """--side's name in the side column, and train_id / test_id falling back to the row numbers of stores
    without ids, each row's influence the float64 score of its pair (r266: a CSV labelled proponents for
    --side opponents, or train_id taken from the test row, passed)."""
    out = tmp_path / "top.csv"
    assert main(["score", "--test", two[0], "--train", two[1], "-k", "4", "--side", side, "-o", str(out)]) == 0
    test, train = (tracin.GradientStore.open(p) for p in two)
    exact = 0.5 * np.asarray(test.kernel_side().blocks[0], np.float64) @ np.asarray(train.kernel_side().blocks[0]).T
    rows = list(csv.DictReader(open(out)))
    assert {r["side"] for r in rows} == ({"proponents", "opponents"} if side == "both" else {side})
    assert len(rows) == 3 * 4 * (2 if side == "both" else 1)
    for r in rows:
        assert r["train_id"] == r["train_row"] and r["test_id"] == r["test_row"]
        assert float(r["influence"]) == pytest.approx(exact[int(r["test_row"]), int(r["train_row"])], rel=1e-5)
    for name, order in (("proponents", -exact), ("opponents", exact)):
        got = [[int(r["train_row"]) for r in rows if r["side"] == name and int(r["test_row"]) == t] for t in range(3)]
        if name == side or side == "both":
            assert got == np.argsort(order, axis=1, kind="stable")[:, :4].tolist()
