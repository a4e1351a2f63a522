"""K-FAC errors name the checkpoint and factor of the matrix at fault: matrix i of the kernel block order is
checkpoint i // 2's left (even i) or right (odd i) factor (mutant W13: checkpoint i named, a checkpoint that
does not exist past the first)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening


@pytest.mark.parametrize(
    ("checkpoint", "side", "named"),
    [
        (0, "right", "checkpoint 0 (right factor)"),
        (1, "left", "checkpoint 1 (left factor)"),
        (2, "right", "checkpoint 2 (right factor)"),
    ],
)
def test_an_all_zero_factor_is_named_by_its_checkpoint_and_side(checkpoint, side, named):
    rng = np.random.default_rng(5)
    left = [rng.standard_normal((30, p)).astype(np.float32) for p in (4, 3, 5)]
    right = [rng.standard_normal((30, q)).astype(np.float32) for q in (2, 6, 3)]
    (left if side == "left" else right)[checkpoint][:] = 0.0
    with pytest.raises(ValueError, match="^" + re.escape(named) + ": the gradients' second moment has mean eigenvalue"):
        Whitening.fit(tracin.FactoredGradients(left, right))
