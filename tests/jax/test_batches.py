"""BatchPlan: fixed-size padded batches from arrays or iterables, and bad data."""

from __future__ import annotations

import numpy as np
import pytest

from tracin.jax.batches import BatchPlan


def test_arrays_are_cut_and_the_last_batch_padded_with_its_last_row():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    plan = BatchPlan((x, y), batch_size=4)
    batches = list(plan)
    assert plan.n_rows == 10 and plan.size == 4 and not plan.one_shot
    assert [(b.start, b.count) for b in batches] == [(0, 4), (4, 4), (8, 2)]
    assert all(b.inputs.shape == (4, 2) and b.targets.shape == (4,) for b in batches)
    np.testing.assert_array_equal(batches[2].targets, [8, 9, 9, 9])
    np.testing.assert_array_equal(batches[2].inputs, x[[8, 9, 9, 9]])
    assert BatchPlan((x, y), None).size == 10  # default 64, capped at n


def test_iterables_take_the_first_batch_size_and_cut_longer_batches():
    x, y = np.arange(10.0)[:, None], np.arange(10)
    plan = BatchPlan([(x[:3], y[:3]), (x[3:10], y[3:10])], batch_size=None)
    assert plan.n_rows == 10
    batches = list(plan)
    assert [(b.start, b.count) for b in batches] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    np.testing.assert_array_equal(batches[3].targets, [9, 9, 9])
    generator = BatchPlan(((x[i : i + 5], y[i : i + 5]) for i in (0, 5)), batch_size=None)
    assert generator.one_shot and generator.n_rows is None


@pytest.mark.parametrize(
    "data, batch_size, error, message",
    [
        ((np.zeros((4, 2)), np.zeros(3)), None, ValueError, "same number of rows"),
        ((np.zeros((0, 2)), np.zeros(0)), None, ValueError, "no rows"),
        (np.zeros((4, 2)), None, TypeError, "iterable of \\(inputs, targets\\) batches"),
        ("data", None, TypeError, "must be \\(inputs, targets\\) arrays"),
        ([np.zeros((4, 2))], None, TypeError, r"data\[0\]: each batch must be an \(inputs, targets\) pair"),
        ([(np.zeros((4, 2)), np.float32(1))], None, ValueError, "leading batch dimension"),
        ((np.zeros((4, 2)), np.zeros(4)), 0, ValueError, "batch_size must be a positive int"),
        ((np.zeros((4, 2)), np.zeros(4)), 2.5, TypeError, "batch_size must be a positive int"),
    ],
)
def test_bad_data(data, batch_size, error, message):
    with pytest.raises(error, match=message):
        list(BatchPlan(data, batch_size))
