"""An unfinished store refused by the command line says how to finish it: rerun the same export (it resumes
from the rows written), or use the rows written so far with --allow-partial."""

from __future__ import annotations

import numpy as np

import tracin
from tracin.cli import main


def _error(capsys) -> str:
    (line,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    return line


def test_the_refusal_says_to_rerun_the_export(tmp_path, capsys):
    w = tracin.GradientStore.create(tmp_path / "s", 8, [3, 2], weights=[0.5, 1.0])
    for c, d in enumerate((3, 2)):
        w.write(c, 0, np.ones((5, d), np.float32))
    w.close()
    assert main(["self-influence", str(tmp_path / "s")]) == 1
    assert _error(capsys) == (
        f"tracin self-influence: error: path: gradient store {tmp_path / 's'} is unfinished (rows written from "
        "row 0, per checkpoint: 5, 5 of 8); finish the export: rerun the same export, with the same arguments and "
        "store (it resumes from the rows written), or pass --allow-partial to use the 5 rows written so far for "
        "every checkpoint"
    )


def test_with_no_row_to_use_it_says_so_after_the_advice(tmp_path, capsys):
    w = tracin.GradientStore.create(tmp_path / "s", 8, [3], weights=[0.5])
    w.write(0, 4, np.ones((2, 3), np.float32))  # rows 4..6 only: none from row 0
    w.close()
    assert main(["score", "--test", str(tmp_path / "s"), "--train", str(tmp_path / "s")]) == 1
    line = _error(capsys)
    assert "is unfinished (rows written from row 0, per checkpoint: 0 of 8); finish the export: rerun the same" in line
    assert line.endswith(
        "(it resumes from the rows written); no row is written for every checkpoint yet, so --allow-partial has "
        "none to use"
    ), line
