"""An unfinished store refused by the command line says how to finish it: a store an export wrote (its metadata
has fingerprints) by rerunning the same export (it resumes from the rows written); a store written by hand with
GradientStore.create by writing its missing rows and finalize(), which an export rerun cannot do; or use the
rows written so far with --allow-partial."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
from tracin.cli import main

BY_HAND = (
    "finish writing it: reopen it with w = GradientStore.create(<the same arguments>), write its missing rows "
    "(w.rows_done(c) says where checkpoint c resumes, w.missing(c) lists its gaps) and call w.finalize()"
)


def _error(capsys) -> str:
    (line,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    return line


def test_a_store_written_by_hand_is_told_to_write_its_missing_rows_and_finalize(tmp_path, capsys):
    blocks = [np.random.default_rng(c).standard_normal((8, d)).astype(np.float32) for c, d in enumerate((3, 2))]
    w = tracin.GradientStore.create(tmp_path / "s", 8, [3, 2], weights=[0.5, 1.0])
    for c, block in enumerate(blocks):
        w.write(c, 0, block[:5])
    w.close()
    assert main(["self-influence", str(tmp_path / "s")]) == 1
    assert _error(capsys) == (
        f"tracin self-influence: error: path: gradient store {tmp_path / 's'} is unfinished (rows written from "
        f"row 0, per checkpoint: 5, 5 of 8); {BY_HAND}, or pass --allow-partial to use the 5 rows written so far "
        "for every checkpoint"
    )
    # as it says: reopened with the same arguments, the writer resumes at row 5, and once finalized the store is
    # scored; self-influence against float64 NumPy
    w = tracin.GradientStore.create(tmp_path / "s", 8, [3, 2], weights=[0.5, 1.0])
    assert [w.rows_done(c) for c in (0, 1)] == [5, 5] and w.missing(0) == [[5, 8]]
    for c, block in enumerate(blocks):
        w.write(c, w.rows_done(c), block[w.rows_done(c) :])
    w.finalize()
    out = tmp_path / "self.csv"
    assert main(["self-influence", str(tmp_path / "s"), "--output", str(out)]) == 0
    want = sum(wc * (b.astype(np.float64) ** 2).sum(1) for wc, b in zip((0.5, 1.0), blocks, strict=True))
    got = np.loadtxt(out, delimiter=",", skiprows=1, usecols=-1)
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=1e-5)


def test_with_no_row_to_use_it_says_so_after_the_advice(tmp_path, capsys):
    w = tracin.GradientStore.create(tmp_path / "s", 8, [3], weights=[0.5])
    w.write(0, 4, np.ones((2, 3), np.float32))  # rows 4..6 only: none from row 0
    w.close()
    assert main(["score", "--test", str(tmp_path / "s"), "--train", str(tmp_path / "s")]) == 1
    line = _error(capsys)
    assert f"is unfinished (rows written from row 0, per checkpoint: 0 of 8); {BY_HAND}; no row is written" in line
    assert line.endswith("no row is written for every checkpoint yet, so --allow-partial has none to use"), line
    assert "rerun the same export" not in line, line


def test_a_store_an_export_left_unfinished_is_told_to_rerun_the_export(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    y[4:] = float("nan")  # the second batch's targets: the loss fails there, after the first batch's rows are written

    def failing(outputs, targets):
        if torch.isnan(targets).any():
            raise RuntimeError("interrupted")
        return ((outputs - targets) ** 2).sum(-1)

    with pytest.raises(Exception, match="interrupted"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-example paths given up one by one on the failing batch
        export_gradients(
            model, [(model.state_dict(), 0.1)], (x, y), failing, store=tmp_path / "e", batch_size=4, progress=False
        )
    assert main(["self-influence", str(tmp_path / "e")]) == 1
    line = _error(capsys)
    assert "is unfinished (rows written from row 0, per checkpoint: 4 of 8); finish the export: rerun the same " in line
    assert "export, with the same arguments and store (it resumes from the rows written), or pass --allow-partial" in (
        line
    )
    assert "finish writing it" not in line, line


def test_a_store_written_by_hand_but_not_finalized_is_not_told_to_rerun_an_export(tmp_path, capsys):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [3], weights=[0.5])
    w.write(0, 0, np.ones((4, 3), np.float32))
    w.close()
    assert main(["self-influence", str(tmp_path / "s")]) == 1
    assert _error(capsys).endswith(
        "is unfinished: every row is written (rows written from row 0, per checkpoint: 4 of 4) but the store was "
        "never finalized; call GradientStore.create(<the same arguments>).finalize()"
    )
