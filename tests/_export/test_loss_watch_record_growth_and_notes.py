"""r358 (mutation testing of LossWatch): the record of rows warned about grows at least twice at the side it
grows (amortised O(1) a row: rows met in descending or ascending order do not copy it every batch), does not
grow for rows it already spans; and flushed() under a warnings filter "error" raises the pass's own error
even where a note cannot be added to it (its __notes__ not a list), and appends to the notes it has."""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from tracin._export.loss_watch import LossWatch, _noted


@dataclass
class Rows:
    start: int
    count: int


def _sizes(watch: LossWatch, starts: list[int]) -> list[int]:
    out = []
    for start in starts:
        watch(np.array([np.nan]), Rows(start, 1))
        out.append(len(watch._warned))
    return out


def test_rows_met_in_descending_order_grow_the_record_at_least_twice_a_time():
    """Rows 1000, 999, ..., 1: the record's size at least doubles on each growth, so it is copied
    O(log n) times, not n (killed mutant L1: grown to just the new low)."""
    watch = LossWatch("autograd", "x")
    sizes = _sizes(watch, list(range(1000, 0, -1)))
    grew = [b for a, b in zip(sizes[:-1], sizes[1:], strict=True) if b != a]
    assert all(b >= 2 * a for a, b in zip([sizes[0], *grew[:-1]], grew, strict=True))
    assert len(grew) <= 11  # log2(1000) + 1, against 999 growths of one row
    with pytest.warns(RuntimeWarning, match=r"for 1000 rows \(1000, 999, 998,"):
        watch.flush()


def test_rows_met_in_ascending_order_grow_the_record_at_least_twice_a_time():
    """Rows 0, 1, ..., 999 (killed mutant L2: grown to just the new high)."""
    watch = LossWatch("autograd", "x")
    sizes = _sizes(watch, list(range(1000)))
    grew = [b for a, b in zip(sizes[:-1], sizes[1:], strict=True) if b != a]
    assert all(b >= 2 * a for a, b in zip([sizes[0], *grew[:-1]], grew, strict=True))
    assert len(grew) <= 11


def test_rows_the_record_spans_up_to_its_last_do_not_grow_it():
    """The same rows at a later checkpoint (up to the record's last row, inclusive) leave it as it was, and
    are not told again."""
    watch = LossWatch("autograd", "x")
    watch(np.array([np.nan, 1.0, np.inf]), Rows(10, 3))  # rows 10, 12: a record of 3
    assert len(watch._warned) == 3
    with pytest.warns(RuntimeWarning, match=r"for 2 rows \(10, 12\)"):
        watch.flush()
    watch.checkpoint = 1
    watch(np.array([np.nan, 1.0, np.inf]), Rows(10, 3))
    assert len(watch._warned) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.flush()  # told before: nothing


class _Broken(Exception):
    pass


def test_an_error_whose_notes_are_not_a_list_is_raised_as_it_is():
    """add_note raises TypeError where __notes__ is not a list: the pass's own error is still the one raised,
    not a TypeError from adding the warning to it (killed mutant L10: TypeError not suppressed)."""
    watch = LossWatch("autograd", "x")
    error = _Broken("data gone")
    error.__notes__ = ("an earlier note",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_Broken) as raised:
            with watch.flushed():
                watch(np.array([np.nan]), Rows(0, 1))
                raise error
    assert raised.value is error and error.__notes__ == ("an earlier note",)


def test_an_error_with_notes_gets_the_warning_appended():
    watch = LossWatch("autograd", "x")
    error = _Broken("data gone")
    error.add_note("an earlier note")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_Broken):
            with watch.flushed():
                watch(np.array([np.nan]), Rows(4, 1))
                raise error
    assert error.__notes__[0] == "an earlier note"
    assert error.__notes__[1].startswith("RuntimeWarning: loss_fn gives a NaN or infinite loss for row 4 ")
    assert len(error.__notes__) == 2


def test_a_note_on_an_error_without_add_note_is_appended_to_its_notes():
    """The pre-3.11 path of _noted (no add_note): appended to __notes__, earlier notes kept (killed mutant
    L11: the notes replaced)."""
    error = types.SimpleNamespace(__notes__=["first"])
    _noted(error, "second")
    assert error.__notes__ == ["first", "second"]
    bare = types.SimpleNamespace()
    _noted(bare, "only")
    assert bare.__notes__ == ["only"]
