"""Whitening.self_influence(per_checkpoint=True) names the FIRST checkpoint holding an overflowing term, over
every row block, with that checkpoint's rows, as the unwhitened self_influence does (mutant W4: the last
block's first checkpoint named instead)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening, _moments


@pytest.mark.parametrize("factored", [False, True])
def test_the_first_checkpoint_with_an_overflow_is_named_though_a_later_block_holds_it(factored, monkeypatch):
    monkeypatch.setattr(_moments, "BLOCK_ROWS", 50)  # rows 0-49, 50-99, 100-149: three row blocks
    rng = np.random.default_rng(7)
    left = [rng.standard_normal((150, k)).astype(np.float32) for k in (5, 4)]
    right = [rng.standard_normal((150, k)).astype(np.float32) for k in (3, 2)]

    def make(a, b):
        return tracin.FactoredGradients(a, b) if factored else tracin.Gradients(a)

    w = Whitening.fit(make(left, right))
    left[1][[3, 20]] *= np.float32(1e25)  # checkpoint 1's terms of rows 3, 20 (first block): above 1e40
    left[0][[120, 140]] *= np.float32(1e25)  # checkpoint 0's terms of rows 120, 140 (last block)
    train = make(left, right)
    # hand-worked: checkpoint 0 is the first with such a term; its rows are 120 and 140
    expected = r"overflowed float32 in checkpoint 0 for train rows \[120, 140\] although every input is finite"
    with pytest.raises(ValueError, match=r"^self-influence " + expected):  # the unwhitened message it follows
        tracin.self_influence(train, per_checkpoint=True)
    with pytest.raises(ValueError, match=r"^whitened self-influence " + expected):
        w.self_influence(train, per_checkpoint=True)
    # summed over checkpoints: every such row, in row order
    rows = r"for train rows \[3, 20, 120, 140\] although"
    with pytest.raises(ValueError, match=r"^whitened self-influence overflowed float32 " + rows):
        w.self_influence(train)
