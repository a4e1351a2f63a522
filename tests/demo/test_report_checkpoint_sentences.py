"""report.md's sentences on the checkpoints: how many were saved (singular and plural) and which the
recipe traced, read from DemoResult.checkpoint_epochs[:traced] (r369 mutants P1, P2, P3)."""

from __future__ import annotations

import numpy as np

from tracin.demo import DemoConfig, DemoResult
from tracin.demo.report import write_report
from tracin.demo.run import LOSS, PERFECT, RANDOM, TRACIN, TRACIN_ALL
from tracin.demo.training import TrainingConfig


def _report(tmp_path, epochs: int, checkpoint_epochs: list[int], traced: int, best: int) -> str:
    config = DemoConfig(output=tmp_path, training=TrainingConfig(epochs=epochs, checkpoints=len(checkpoint_epochs)))
    found = {name: {0.1: 0.2, 0.2: 0.4, 0.3: 0.6} for name in (TRACIN, TRACIN_ALL, LOSS, RANDOM, PERFECT)}
    result = DemoResult(
        "numpy", 1400, 280, found, 0.9, 0.85, 1.0, {}, [], np.full(epochs, 0.5), checkpoint_epochs, best, traced, 0.5
    )
    return " ".join(write_report(tmp_path / "report.md", result, config).read_text().split())


def test_the_report_names_the_checkpoints_traced_not_one_more(tmp_path):
    text = _report(tmp_path, 12, [3, 6, 9, 12], traced=2, best=5)
    assert "Here 4 checkpoints were saved, after epochs 3, 6, 9, 12;" in text
    assert "held-out accuracy was best after epoch 5, so the first 2 checkpoints (epochs 3 to 6) were traced." in text
    assert "the prediction of the model at epoch 6 (the last checkpoint traced" in text
    assert "where the final model (epoch 12) predicts another label" in text


def test_one_checkpoint_traced_and_one_saved_read_in_the_singular(tmp_path):
    text = _report(tmp_path, 12, [3, 6, 9, 12], traced=1, best=2)
    assert "so the first checkpoint (epoch 3) was traced." in text
    assert "the prediction of the model at epoch 3 (the last checkpoint traced" in text
    text = _report(tmp_path, 2, [2], traced=1, best=1)
    assert "Here 1 checkpoint was saved, after epoch 2;" in text
    assert "uses the one checkpoint." in text
