"""Which test digits the proponents/opponents figure shows: the first `examples`, the last of them
replaced by the first misclassified digit only when all of them are right (run._shown_test_rows, the
rule report.md states; r369 mutant N9)."""

from __future__ import annotations

import numpy as np

from tracin.demo.run import _shown_test_rows

TRUTH = np.array([0, 1, 2, 3, 4, 5])


def test_a_wrong_digit_among_the_first_keeps_them_as_they_are():
    predicted = np.array([9, 1, 2, 3, 7, 5])  # row 0 wrong (shown), row 4 wrong (not shown)
    assert _shown_test_rows(predicted, TRUTH, 3) == [0, 1, 2]


def test_all_right_the_last_gives_way_to_the_first_wrong_digit():
    predicted = np.array([0, 1, 2, 3, 7, 9])
    assert _shown_test_rows(predicted, TRUTH, 3) == [0, 1, 4]
    assert _shown_test_rows(predicted, TRUTH, 1) == [4]


def test_no_wrong_digit_or_more_asked_than_there_are():
    assert _shown_test_rows(TRUTH.copy(), TRUTH, 3) == [0, 1, 2]
    assert _shown_test_rows(np.array([0, 9]), TRUTH[:2], 5) == [0, 1]
