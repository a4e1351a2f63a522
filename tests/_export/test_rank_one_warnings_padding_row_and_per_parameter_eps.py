"""The rank-one "adam" factorisation's warnings: an embedding's padding_idx row (v 0 there by design) is left out
of the zero-v warning and its counts; and the over-Adam warning bounds each column by its own parameter's
1 / (sqrt(eps_root) + eps) (a weight and a bias in param groups with different eps), checked against float64
NumPy's factorisation of v_hat + eps^2."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tracin._export.preconditioner import AdamMoments
from tracin._export.rank_one import _scales

STEP, B2 = 3.0, 0.99


def _adam(v: np.ndarray, eps: float) -> AdamMoments:
    v = np.asarray(v, np.float32).reshape(-1)
    return AdamMoments(np.zeros_like(v), v, STEP, 0.9, B2, eps)


def _ratio(v_parts: list[np.ndarray], eps: list[float], p: int) -> np.ndarray:
    """float64 NumPy: each entry's rank-one scale left_i right_j over full Adam's largest weight of its column."""
    vh = np.hstack([np.asarray(v, np.float32).astype(np.float64).reshape(p, -1) for v in v_parts]) / (1 - B2**STEP)
    floor = np.hstack([np.full(np.size(v) // p, e**2) for v, e in zip(v_parts, eps, strict=True)])
    limit = np.hstack([np.full(np.size(v) // p, 1 / e) for v, e in zip(v_parts, eps, strict=True)])
    r, c = (vh + floor).sum(1), (vh + floor).sum(0)
    return np.sqrt(r.sum() / r)[:, None] / np.sqrt(c)[None] / limit[None]


def _over_adam(caught) -> list[str]:
    return [str(w.message) for w in caught if "the most the full-row 'adam' weighs" in str(w.message)]


def test_the_padding_row_is_left_out_of_the_zero_v_warning_and_its_counts():
    """v of a (6, 3) embedding: row 0 (padding_idx) and row 3 (a token never seen) are 0. With padding_row=0 the
    warning counts 3 zeros of the 15 other entries and 1 of 5 rows; with only the padding row 0, nothing is said.
    Both zero rows are scaled by 0 either way."""
    v = np.random.default_rng(0).uniform(0.5, 2.0, (6, 3))
    v[[0, 3]] = 0.0
    with pytest.warns(RuntimeWarning) as caught:
        left, right = _scales([_adam(v, 1e-8)], 0, False, 6, "'emb.weight'", 0, True, padding_row=0)
    (text,) = [str(w.message) for w in caught]
    assert text.startswith(
        "preconditioner='adam': 3 of 15 second moments (v) of 'emb.weight' (its padding_idx row 0 left out: it never "
        "has gradient) are 0 in checkpoint 0: 1 of 5 rows and 0 of 3 columns of v are all 0"
    ), text
    assert not left[[0, 3]].any() and left[[1, 2, 4, 5]].all() and right.all()
    only_padding = v.copy()
    only_padding[3] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _scales([_adam(only_padding, 1e-8)], 0, False, 6, "'emb.weight'", 0, True, padding_row=0)


def test_a_column_weighed_far_over_its_own_parameters_bound_is_warned_about():
    """Bias eps 1e-2 (its group's), weight eps 1e-8; the bias's v and the weight's row 2 near 0: that row's
    bias entry gets ~2e5, ~2e3 times the 1 / 1e-2 full Adam weighs any bias entry, though under 100 / 1e-8."""
    rng = np.random.default_rng(1)
    weight = rng.uniform(50, 150, (6, 3))
    weight[2] = 1e-20
    bias = np.full(6, 1e-20)
    ratio = _ratio([weight, bias], [1e-8, 1e-2], 6)
    top = ratio.max()
    assert top > 1e3 and ratio[:, :3].max() < 100  # the setting the test means: only the bias column is far over
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _scales([_adam(weight, 1e-8), _adam(bias, 1e-2)], 0, True, 6, "'fc.weight'", 1)
    (text,) = _over_adam(caught)
    assert text.startswith(
        "preconditioner='adam': the rank-one factorisation of the second moments (v) of 'fc.weight' in checkpoint 1 "
        "weighs gradient entries in 1 of 6 rows and 1 of 4 columns (the bias's, the last, among them) by up to "
        f"{top:.1e} times"
    ), text


def test_weight_entries_within_their_own_parameters_bound_are_not_warned_about():
    """Weight eps 1e-8, bias eps 1e-2; the weight's v ~1e-12 everywhere: its entries get ~1e5, as full Adam's
    1 / (sqrt(v_hat) + 1e-8) gives them (far under 100 / 1e-8), though over 100 times the bias's 1 / 1e-2: no
    warning."""
    rng = np.random.default_rng(2)
    weight = rng.uniform(0.5, 2.0, (4, 3)) * 1e-12
    bias = rng.uniform(0.5, 2.0, 4)
    ratio = _ratio([weight, bias], [1e-8, 1e-2], 4)
    assert ratio.max() < 1e-2 and (ratio[:, :3] / 1e-8 * 1e-2).min() > 100  # yet every weight entry is over 100 / 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _scales([_adam(weight, 1e-8), _adam(bias, 1e-2)], 0, True, 4, "'fc.weight'", 1)


def test_the_zero_v_warning_names_the_full_row_divisor_with_eps_root():
    """optax's eps_root: where v is 0 the full-row "adam" divides by sqrt(eps_root) + eps (1e-2 + 1e-8 here), not
    eps; the rank-one warning says so, as the full-row one does."""
    v = np.random.default_rng(3).uniform(0.5, 2.0, (4, 3))
    v[1] = 0.0
    moments = AdamMoments(
        np.zeros(12, np.float32), v.reshape(-1).astype(np.float32), STEP, 0.9, B2, 1e-8, eps_root=1e-4
    )
    with pytest.warns(RuntimeWarning) as caught:
        _scales([moments], 0, False, 4, "'emb.weight'", 0)
    (text,) = [str(w.message) for w in caught]
    assert f"by sqrt(eps_root) + eps={np.sqrt(1e-4) + 1e-8:g} instead" in text, text
