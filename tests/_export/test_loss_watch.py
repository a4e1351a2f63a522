"""LossWatch (tracin._export.loss_watch): the framework-free warning about examples whose loss is NaN or
infinite, in the framework's words; tracin.jax's wording is the one it had before the move."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from tracin._export.loss_watch import LossWatch


@dataclass
class Rows:
    start: int
    count: int


def test_the_warning_names_the_rows_the_checkpoint_and_the_frameworks_words():
    watch = LossWatch("autograd", "a mean over no tokens")
    watch.checkpoint = 2
    watch(np.array([1.0, np.inf, 2.0]), Rows(5, 3))
    with pytest.warns(RuntimeWarning) as caught:
        watch.flush()
    assert [str(w.message) for w in caught] == [
        "loss_fn gives a NaN or infinite loss for row 6 of the data at checkpoint 2: its gradient row is "
        "stored as autograd gives it, which may be NaN (scoring then refuses the set, naming the row) or all 0 "
        "(a mean over no tokens: that example then scores as having no influence); drop that example or fix "
        "its targets"
    ]
    assert caught[0].filename == __file__  # the first frame outside tracin


def test_rows_past_count_are_padding_and_a_flush_with_nothing_found_warns_nothing():
    watch = LossWatch("autograd", "x")
    watch(np.array([0.0, 1.0, np.nan]), Rows(0, 2))  # the NaN is padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.flush()


def test_two_rows_are_counted_and_listed_and_a_flush_forgets_them_but_not_that_they_were_warned_about():
    watch = LossWatch("autograd", "x")
    watch(np.array([np.nan, 0.0]), Rows(0, 2))
    watch(np.array([-np.inf]), Rows(2, 1))
    with pytest.warns(RuntimeWarning, match=r"for 2 rows \(0, 2\) of the data at checkpoint 0: "):
        watch.flush()
    watch.checkpoint = 1
    watch(np.array([np.nan, 0.0, np.nan]), Rows(0, 3))  # row 0 again (not counted), row 2 again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.flush()


def test_the_jax_warning_is_worded_as_before_the_move():
    from tracin.jax.batches import Batch
    from tracin.jax.per_example import LossWatch as JaxLossWatch

    watch = JaxLossWatch()
    watch(np.array([np.nan, 1.0]), Batch(3, 2, None, None))
    with pytest.warns(RuntimeWarning) as caught:
        watch.flush()
    assert [str(w.message) for w in caught] == [
        "loss_fn gives a NaN or infinite loss for row 3 of the data at checkpoint 0: its gradient row is "
        "stored as jax.grad gives it, which may be NaN (scoring then refuses the set, naming the row) or all 0 "
        "(a label outside [0, classes) read with take_along_axis or optax's integer-label cross entropy, such as "
        "the -100 'ignore' label: that example then scores as having no influence); drop that example or fix "
        "its targets"
    ]


def test_the_first_ten_rows_are_listed_over_several_batches_and_the_rest_counted():
    watch = LossWatch("autograd", "x")
    watch(np.full(8, np.nan), Rows(0, 8))
    watch(np.array([np.inf, np.nan, -np.inf, np.nan, 1.0]), Rows(8, 5))  # rows 8..11 not finite, 12 finite
    with pytest.warns(RuntimeWarning) as caught:
        watch.flush()
    assert [str(w.message).split(":")[0] for w in caught] == [
        "loss_fn gives a NaN or infinite loss for 12 rows (0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more) of the data at "
        "checkpoint 0"
    ]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_infinite_16_bit_loss_may_be_an_overflow_with_a_right_gradient_and_float32_is_advised(dtype):
    """review343 L1: a float16 loss above 65504 is inf while its gradient row is finite and right; the warning
    said only that the row may be NaN or all 0, and to drop the example. A 16-bit infinite loss (as given, or
    named by `dtype` where the adapter passes a float64 copy) now says it may be an overflow, and to compute
    loss_fn in float32."""
    import ml_dtypes

    given = np.array([1.0, np.inf], dtype=np.float16 if dtype == "float16" else ml_dtypes.bfloat16)
    for watch_it in (lambda w: w(given, Rows(0, 2)), lambda w: w(given.astype(np.float64), Rows(0, 2), dtype=dtype)):
        watch = LossWatch("autograd", "x")
        watch_it(watch)
        with pytest.warns(RuntimeWarning) as caught:
            watch.flush()
        assert [str(w.message) for w in caught] == [
            "loss_fn gives a NaN or infinite loss for row 1 of the data at checkpoint 0: its gradient row is "
            "stored as autograd gives it, which may be NaN (scoring then refuses the set, naming the row) or all 0 "
            f"(x: that example then scores as having no influence), or finite and right (a {dtype} loss that "
            "overflowed to infinity); compute loss_fn in float32 if it overflowed, else drop that example or fix "
            "its targets"
        ]


def test_a_nan_16_bit_loss_or_an_infinite_float32_one_is_not_called_an_overflow():
    watch = LossWatch("autograd", "x")
    watch(np.array([np.nan, 1.0], dtype=np.float16), Rows(0, 2))
    watch(np.array([np.inf, np.inf]), Rows(2, 2))
    with pytest.warns(RuntimeWarning) as caught:
        watch.flush()
    assert [str(w.message) for w in caught] == [
        "loss_fn gives a NaN or infinite loss for 3 rows (0, 2, 3) of the data at checkpoint 0: their gradient rows "
        "are stored as autograd gives them, which may be NaN (scoring then refuses the set, naming the rows) or all "
        "0 (x: those examples then score as having no influence); drop those examples or fix their targets"
    ]


def test_rows_far_apart_and_in_any_order_are_warned_about_once_per_export():
    """review343 L3 (the rows warned about kept compactly): rows found in any order, far apart (the record
    grown past them), at its edges, are each counted once over the export's checkpoints, and a row next
    to one warned about is still new."""
    watch = LossWatch("autograd", "x")
    watch(np.array([np.nan, 1.0, 1.0, 1.0, 1.0, np.inf]), Rows(0, 6))  # rows 0 and 5
    watch(np.array([1.0, np.nan, 1.0]), Rows(1_000_000, 3))  # row 1000001
    watch(np.array([np.nan, np.nan]), Rows(63, 2))  # rows 63, 64
    with pytest.warns(RuntimeWarning, match=r"for 5 rows \(0, 5, 1000001, 63, 64\) of the data at checkpoint 0"):
        watch.flush()
    watch.checkpoint = 1
    watch(np.array([np.nan, np.nan, np.nan]), Rows(1_000_000, 3))  # 1000001 again; 1000000, 1000002 new
    watch(np.array([np.nan] * 7), Rows(0, 7))  # 0, 5 again; 1..4, 6 new
    watch(np.array([np.nan, np.nan, np.nan]), Rows(62, 3))  # 63, 64 again; 62 new
    with pytest.warns(RuntimeWarning) as caught:
        watch.flush()
    assert [str(w.message).split(":")[0] for w in caught] == [
        "loss_fn gives a NaN or infinite loss for 8 rows (1000000, 1000002, 1, 2, 3, 4, 6, 62) of the data at "
        "checkpoint 1"
    ]
    watch(np.array([np.nan] * 5), Rows(1_999_998, 5))  # 1999998..2000002, past everything so far
    watch(np.array([np.nan] * 2), Rows(2_000_001, 2))  # 2000001 again, 2000002 again
    with pytest.warns(RuntimeWarning, match=r"for 5 rows \(1999998, 1999999, 2000000, 2000001, 2000002\) "):
        watch.flush()


def test_a_row_warned_about_before_does_not_make_a_new_nan_row_an_overflow():
    """An infinite float16 loss warned about at checkpoint 0 and still infinite at checkpoint 1 is not named
    again: a row newly NaN there (a float16 NaN, no overflow) is not said to be one that overflowed."""
    watch = LossWatch("autograd", "x")
    watch(np.array([np.inf, 1.0], dtype=np.float16), Rows(0, 2))
    with pytest.warns(RuntimeWarning, match="overflowed to infinity"):
        watch.flush()
    watch.checkpoint = 1
    watch(np.array([np.inf, np.nan], dtype=np.float16), Rows(0, 2))
    with pytest.warns(RuntimeWarning) as caught:
        watch.flush()
    assert [str(w.message) for w in caught] == [
        "loss_fn gives a NaN or infinite loss for row 1 of the data at checkpoint 1: its gradient row is stored as "
        "autograd gives it, which may be NaN (scoring then refuses the set, naming the row) or all 0 (x: that "
        "example then scores as having no influence); drop that example or fix its targets"
    ]


def test_rows_far_from_row_0_are_kept_in_memory_of_their_span_not_of_their_ids():
    """A distributed shard's watch sees rows far from row 0 only (its rows [10**9, ...)): the record of rows
    warned about spans the rows seen (a few bytes), not every row id up to them (a GB); rows below the first
    seen, and far above, are still each warned about once."""
    watch = LossWatch("autograd", "x")
    watch(np.array([1.0, np.nan, np.inf]), Rows(10**9, 3))  # rows 1000000001, 1000000002
    watch(np.array([np.nan, 1.0]), Rows(10**9 - 2, 2))  # row 999999998, below the first seen
    watch(np.array([np.nan]), Rows(10**9 + 50, 1))  # row 1000000050
    with pytest.warns(RuntimeWarning, match=r"for 4 rows \(1000000001, 1000000002, 999999998, 1000000050\) "):
        watch.flush()
    assert watch._warned.nbytes < 1000
    watch(np.array([np.nan] * 60), Rows(10**9 - 5, 60))  # 999999995 .. 1000000054: 56 of them new
    with pytest.warns(RuntimeWarning, match=r"for 56 rows \(999999995, 999999996, 999999997, 999999999, "):
        watch.flush()
    watch(np.array([np.nan] * 3), Rows(0, 3))  # rows 0, 1, 2: the record spans them too
    with pytest.warns(RuntimeWarning, match=r"for 3 rows \(0, 1, 2\) of the data"):
        watch.flush()
