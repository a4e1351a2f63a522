"""`tracin aggregate --help` says what --whitening holds in memory: one summed --test row per checkpoint (the
whitening is linear), test rows x dims only for a factored --test, whitened row by row."""

from __future__ import annotations

import pytest

from tracin.cli import main


def test_aggregate_whitening_help_says_one_summed_row_is_whitened(capsys):
    with pytest.raises(SystemExit):
        main(["aggregate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--whitening FILE whitened")
    words = text[start : text.index("--threads THREADS", start)]
    assert "the --test rows are summed per checkpoint and that one row whitened with it" in words
    assert "a factored --test's rows are whitened one by one, held in memory: float32, test rows x dims" in words
    assert "the --test rows are whitened with it (Whitening.apply, held in memory" not in words
