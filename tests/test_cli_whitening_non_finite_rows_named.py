"""`tracin score --whitening` and `tracin aggregate --whitening` refuse a --test store holding NaN or Inf values
with one line naming `--test PATH`, the checkpoint and the first rows, and what to do (as the plain commands do)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from store.helpers import write_store
from tracin.cli import main

WEIGHTS = [0.5, 2.0]


@pytest.mark.parametrize("command", ["score", "aggregate"])
@pytest.mark.parametrize(
    "value, dtype, checkpoint, row", [(np.nan, "float32", 1, 2), (np.inf, "float16", 0, 1)], ids=["nan", "inf-f16"]
)
def test_a_non_finite_test_row_is_named_by_its_option_and_store(
    command, value, dtype, checkpoint, row, tmp_path, rng, capsys
):
    train = write_store(tmp_path / "train", [rng.standard_normal((30, d)).astype(np.float32) for d in (3, 4)], WEIGHTS)
    blocks = [rng.standard_normal((5, d)).astype(np.float32) for d in (3, 4)]
    blocks[checkpoint][row, 1] = value
    test = write_store(tmp_path / "test", blocks, WEIGHTS, dtype=dtype)  # the value planted in the data file
    white = tmp_path / "white.npz"
    tracin.Whitening.fit(train, damping=0.3, progress=False).save(white)
    argv = [command, "--test", str(test.path), "--train", str(train.path), "--whitening", str(white)]
    assert main([*argv, "-o", str(tmp_path / "out.csv")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"tracin {command}: error: --test {test.path}: checkpoint {checkpoint} holds NaN or Inf values, first in "
        f"rows [{row}], so nothing was scored: export those examples again (a NaN or infinite loss?) or write a "
        "store without them"
    )
