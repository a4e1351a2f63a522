"""The demo end to end at its fixed seed: a quality regression in TracIn's mislabel detection
fails here."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tracin.cli import main
from tracin.demo import DemoConfig, run_demo
from tracin.demo.data import load_noisy_digits
from tracin.demo.detection import detection_curve, found_at


def test_detection_curve_counts_flipped_examples_in_score_order():
    flipped = np.array([False, True, False, True])
    curve = detection_curve(np.array([0.1, 0.9, 0.5, 0.2]), flipped)
    # order by score: 1 (flipped), 2, 3 (flipped), 0
    np.testing.assert_allclose(curve, [0, 0.5, 0.5, 1.0, 1.0])
    assert found_at(curve, 0.25) == 0.5


def test_noisy_digits_flip_labels_to_other_classes():
    data = load_noisy_digits(0.2, seed=3)
    assert abs(data.flipped.mean() - 0.2) < 0.04
    assert np.all(data.y_train[data.flipped] != data.y_train_clean[data.flipped])
    with pytest.raises(ValueError, match="noise must be in"):
        load_noisy_digits(1.5, seed=0)


def test_demo_finds_flipped_labels_better_than_loss_and_random(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_demo(DemoConfig(output=tmp_path), progress=False, log=lambda *_: None)
        assert torch.get_num_threads() == 2  # the demo's single thread does not leak into the caller
    finally:
        torch.set_num_threads(before)
    tracin_found = result.found["TracIn self-influence"]
    loss_found = result.found["loss (final model)"]
    assert result.train_accuracy_noisy > 0.97  # the model fits the noisy labels
    for fraction in (0.1, 0.2):
        assert tracin_found[fraction] >= loss_found[fraction] + 0.05, result.found
        assert tracin_found[fraction] >= 3 * fraction, result.found  # random finds `fraction`
    for name in ("mislabel_detection.png", "proponents_opponents.png", "report.md",
                 "self_influence_ranking.csv"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "self_influence_ranking.csv")))
    assert len(rows) == 1400
    scores = [float(r["self_influence"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "TracIn self-influence" in (tmp_path / "report.md").read_text()


def test_demo_command_line_options(tmp_path, capsys):
    assert main(["demo", "--epochs", "10", "--checkpoints", "2", "--noise", "0.1", "--seed", "1",
                 "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "saving 2 checkpoints" in out and "report.md" in out
    assert len(list((tmp_path / "out" / "checkpoints").glob("*.pt"))) == 2
    assert main(["demo", "--epochs", "3", "--checkpoints", "5", "-o", str(tmp_path / "bad")]) == 1
    assert "checkpoints must be between 1 and epochs" in capsys.readouterr().err
