"""The tracin command line: subcommands on real stores, errors and exit codes."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

import tracin
from tracin.cli import main
from reference import exact_scores


@pytest.fixture
def stores(tmp_path, rng):
    weights = [0.5, 0.1]
    blocks = {side: [rng.standard_normal((n, d)).astype(np.float32) for d in (6, 4)]
              for side, n in (("test", 3), ("train", 40))}
    paths = {}
    for side, mats in blocks.items():
        w = tracin.GradientStore.create(tmp_path / side, len(mats[0]), [6, 4], weights=weights,
                                        ids=[f"{side}-{i}" for i in range(len(mats[0]))])
        for c, m in enumerate(mats):
            w.write(c, 0, m)
        w.finalize()
        paths[side] = tmp_path / side
    return paths, blocks, weights


def test_info_describes_a_store(stores, capsys):
    paths, _, _ = stores
    assert main(["info", str(paths["train"])]) == 0
    out = capsys.readouterr().out
    assert "40" in out and "float32" in out and "complete" in out


def test_score_writes_npz_equal_to_reference(stores, tmp_path):
    paths, blocks, weights = stores
    out = tmp_path / "top.npz"
    assert main(["score", "--test", str(paths["test"]), "--train", str(paths["train"]), "-k", "5",
                 "--side", "both", "-o", str(out)]) == 0
    got = np.load(out)
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    np.testing.assert_array_equal(got["proponents_indices"], np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_array_equal(got["opponents_indices"], np.argsort(exact, axis=1)[:, :5])


def test_score_csv_carries_ids(stores, tmp_path):
    paths, blocks, weights = stores
    out = tmp_path / "top.csv"
    assert main(["score", "--test", str(paths["test"]), "--train", str(paths["train"]), "-k", "2",
                 "--side", "proponents", "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 * 2
    best = int(np.argmax(exact_scores(blocks["test"], blocks["train"], weights)[0]))
    assert rows[0]["test_id"] == "test-0" and rows[0]["train_id"] == f"train-{best}"


def test_self_influence_ranking(stores, tmp_path):
    paths, blocks, weights = stores
    out = tmp_path / "rank.csv"
    assert main(["self-influence", str(paths["train"]), "-o", str(out), "--top", "7"]) == 0
    rows = list(csv.DictReader(open(out)))
    exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip(weights, blocks["train"]))
    assert [int(r["train_row"]) for r in rows] == list(np.argsort(-exact)[:7])


def test_long_runs_show_a_progress_bar_unless_turned_off(stores, tmp_path, capsys, monkeypatch):
    import tracin.scoring

    paths, _, _ = stores
    monkeypatch.setattr(tracin.scoring, "_AUTO_PROGRESS_MACS", 0)  # every run counts as long
    score = ["score", "--test", str(paths["test"]), "--train", str(paths["train"]), "-o", str(tmp_path / "t.npz")]
    rank = ["self-influence", str(paths["train"]), "-o", str(tmp_path / "r.csv")]
    for command, bar in ((score, "tracin top_k"), (rank, "tracin self_influence")):
        assert main(command) == 0
        assert bar in capsys.readouterr().err
        assert main([*command, "--no-progress"]) == 0
        assert bar not in capsys.readouterr().err


def test_errors_are_messages_with_exit_codes(tmp_path, stores, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 1
    assert "no gradient store" in capsys.readouterr().err
    paths, _, _ = stores
    with pytest.raises(SystemExit) as e:
        main(["score", "--test", str(paths["test"]), "--train", str(paths["train"]), "-k", "0"])
    assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    assert main(["self-influence", str(paths["train"]), "-o", str(tmp_path)]) == 1  # a directory
    assert "error" in capsys.readouterr().err
    assert main(["score", "--test", str(paths["test"]), "--train", str(paths["train"]),
                 "-o", str(tmp_path / "x.txt")]) == 1
    assert ".npz or .csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "tracin", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("info", "score", "self-influence", "bench", "demo", "examples:"):
        assert command in out.stdout


def test_bench_passes_its_options_to_the_harness(capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])  # the checkout root
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
