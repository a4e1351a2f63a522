"""The per-checkpoint diagnostics look at the top 20% of the self-influence ranking, as report.md says
(DIAGNOSED), with the store's slots grouped per checkpoint (r369 mutant N8)."""

from __future__ import annotations

import tracin.demo.run as demo_run
from tracin.demo import DemoConfig, run_demo
from tracin.demo.training import TrainingConfig


def test_the_diagnostics_rank_the_top_fifth_of_the_training_rows(tmp_path, monkeypatch):
    seen = []
    diagnose = demo_run.checkpoint_diagnostics
    monkeypatch.setattr(demo_run, "checkpoint_diagnostics", lambda *a, **kw: seen.append(kw) or diagnose(*a, **kw))
    config = DemoConfig(output=tmp_path / "out", training=TrainingConfig(epochs=2, checkpoints=2), examples=1, k=2)
    result = run_demo(config, progress=False, log=lambda *_: None)
    assert result.n_train == 1400
    # 20% of 1400 rows; NumPy's factored store holds 2 layers (slots) per checkpoint
    assert seen == [{"top": 280, "layers_per_checkpoint": 2}]
    report = " ".join((tmp_path / "out" / "report.md").read_text().split())
    assert "over the 20% of the rows ranked highest" in report
