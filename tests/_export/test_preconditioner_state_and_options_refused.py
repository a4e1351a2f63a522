"""Refusals of the full-row Adam preconditioner that the formulas alone do not show: an optimizer state wider
than the row, a SparseAdam parameter among others for "adam_update", and betas of 1 (whose bias correction
1 - b^t is 0)."""

from __future__ import annotations

import numpy as np
import pytest

from tracin._export.preconditioner import AdamMoments, Preconditioned, adam_settings


def _moment(size: int, sparse: bool = False) -> AdamMoments:
    rng = np.random.default_rng(size)
    m = rng.normal(size=size).astype(np.float32)
    v = rng.uniform(0.5, 1.5, size).astype(np.float32)
    return AdamMoments(m, v, 2.0, 0.9, 0.99, 1e-3, sparse=sparse)


@pytest.mark.parametrize("kind", ["adam", "adam_update"])
def test_a_state_with_more_entries_than_the_row_is_refused_naming_both_counts(kind):
    """5 entries of state for a row of 3 columns: a state of another layer choice, refused by its counts (not a
    NumPy broadcasting error, nor rows cut to the state's first columns)."""
    t = Preconditioned(kind, lambda c: [_moment(3), _moment(2)], {})
    with pytest.raises(ValueError, match=r"^the optimizer state has 5 entries for a row of 3$"):
        t.apply(np.ones((2, 3), np.float32), 0, 0)


def test_adam_update_refuses_a_state_where_any_one_parameter_is_sparse():
    """One SparseAdam parameter among dense ones is enough: its rows the gradient misses would not move."""
    t = Preconditioned("adam_update", lambda c: [_moment(3), _moment(2, sparse=True)], {})
    with pytest.raises(ValueError, match="preconditioner='adam_update' cannot follow torch.optim.SparseAdam"):
        t.apply(np.ones((2, 5), np.float32), 0, 0)


def test_adam_takes_a_state_with_a_sparse_parameter_by_the_formula():
    """'adam' is g / (sqrt(v / (1 - b2^t)) + eps) whether or not the step was sparse (float64 NumPy)."""
    moments = [_moment(3), _moment(2, sparse=True)]
    g = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    got = Preconditioned("adam", lambda c: moments, {}).apply(g, 0, 0)
    v = np.concatenate([a.v for a in moments]).astype(np.float64)
    np.testing.assert_allclose(got, g / (np.sqrt(v / (1 - 0.99**2.0)) + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("key", ["b1", "b2"])
def test_a_beta_of_one_is_refused_naming_the_key_and_the_range(key):
    """b2 = 1 makes the bias correction 1 - b2^t zero (v_hat = v / 0), b1 = 1 freezes m: both are outside [0, 1)."""
    with pytest.raises(ValueError, match=rf"^preconditioner_options\['{key}'\] must be in \[0, 1\), got 1\.0$"):
        adam_settings({key: 1.0})
    assert adam_settings({key: 0.0})[key] == 0.0  # the closed end is allowed
