"""fr357: `tracin self-influence -- --test=x` reads the store named '--test=x' (after '--' a path, not split
as score's --test=T)."""

import numpy as np

import tracin
from tracin.cli import main


def test_self_influence_reads_a_store_named_like_a_test_option_after_double_dash(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    writer = tracin.GradientStore.create("--test=x", 5, [4])
    writer.write(0, 0, rows)
    writer.finalize()
    assert main(["self-influence", "--no-progress", "--", "--test=x"]) == 0
    out = capsys.readouterr().out
    expected = (rows.astype(np.float64) ** 2).sum(1)
    values = {int(line.split(",")[1]): float(line.split(",")[-1]) for line in out.splitlines()[1:] if line}
    assert sorted(values) == list(range(5)), out
    np.testing.assert_allclose([values[i] for i in range(5)], expected, rtol=1e-5)
