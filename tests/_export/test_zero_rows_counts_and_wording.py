"""r358 (mutation testing of ZeroRows): the wording at the edges of its counts, hand-written: one row
computed and 0 is that row, not "all 1 rows computed"; exactly ten rows 0 are listed with no "and 0 more"."""

from __future__ import annotations

import numpy as np
import pytest

from tracin._export.sinks import ZERO_STARTS, ZeroRows


def _said(zero_at_each_checkpoint: list[np.ndarray]) -> list[str]:
    watch = ZeroRows()
    for c, zero in enumerate(zero_at_each_checkpoint):
        watch.begin(c)
        watch.see(0, zero)
        watch.end(c)
    with pytest.warns(UserWarning) as caught:
        watch.warn()
    return [str(w.message) for w in caught]


def test_the_only_row_computed_being_0_is_named_as_that_row():
    """Data of one row, 0 at both checkpoints: the single-row wording (killed mutant S10: count >= 1)."""
    assert _said([np.array([True]), np.array([True])]) == [
        f"{ZERO_STARTS}row 0 of the data: its gradient is 0 at every checkpoint, so every score with it is 0 "
        "and cosine treats it as 0; a loss of exactly 0 for it? (e.g. all labels ignored, -100)"
    ]


def test_exactly_ten_rows_0_are_all_listed_with_no_more():
    """Ten rows 0 of twenty: all ten listed, nothing 'more' (killed mutant S11: count >= _SHOWN)."""
    zero = np.arange(20) % 2 == 0  # rows 0, 2, ..., 18
    assert _said([zero, zero]) == [
        f"{ZERO_STARTS}10 rows (0, 2, 4, 6, 8, 10, 12, 14, 16, 18) of the data: their gradient is 0 at every "
        "checkpoint, so every score with them is 0 and cosine treats them as 0; a loss of exactly 0 for them? "
        "(e.g. all labels ignored, -100)"
    ]


def test_eleven_rows_0_list_ten_and_one_more():
    zero = np.arange(22) % 2 == 0  # rows 0, 2, ..., 20
    (said,) = _said([zero, zero])
    assert said.startswith(f"{ZERO_STARTS}11 rows (0, 2, 4, 6, 8, 10, 12, 14, 16, 18 and 1 more) of the data: ")
