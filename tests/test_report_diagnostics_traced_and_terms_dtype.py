"""checkpoint_diagnostics: `traced` counts checkpoints from 1 (0 is refused, not taken as the last one), and
`terms` are float32 (n, C) to float32's precision of the float64 terms, as documented (mutation testing
m405: R11, R17)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.report import checkpoint_diagnostics


def _three_checkpoints() -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(405)
    return [rng.standard_normal((9, 4)).astype(np.float32) * s for s in (1.0, 30.0, 0.01)], [0.5, 0.25, 2.0]


@pytest.mark.parametrize("traced", [0, -1, 4, True, 1.0])
def test_traced_is_a_count_of_checkpoints_from_one(traced):
    mats, w = _three_checkpoints()
    with pytest.raises(ValueError, match=rf"traced must be a number of checkpoints from 1 to 3, got {traced!r}$"):
        checkpoint_diagnostics(tracin.Gradients(mats, w), traced=traced)


def test_traced_from_one_to_all_checkpoints_is_taken():
    mats, w = _three_checkpoints()
    for traced in (1, 3, np.int64(2)):
        assert checkpoint_diagnostics(tracin.Gradients(mats, w), traced=traced).top == 1


def test_terms_are_float32_to_float32_precision_of_the_float64_terms():
    mats, w = _three_checkpoints()
    diag = checkpoint_diagnostics(tracin.Gradients(mats, w), top=3)
    want = np.stack([wc * (m.astype(np.float64) ** 2).sum(1) for wc, m in zip(w, mats, strict=True)], 1)
    assert diag.terms.dtype == np.float32 and diag.terms.shape == (9, 3)
    np.testing.assert_allclose(diag.terms, want, rtol=2e-6)
    np.testing.assert_allclose(diag.share_all, want.sum(0) / want.sum(), rtol=1e-6)


def test_a_zero_gradient_row_is_no_negative_term_and_gives_no_warning():
    """A row whose gradient is 0 at a checkpoint has a term of 0, not below 0: the shares still lie in [0, 1],
    so the warning about negative checkpoint weights is not given."""
    import warnings

    mats, w = _three_checkpoints()
    mats[1][4] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag = checkpoint_diagnostics(tracin.Gradients(mats, w), top=2)
    assert diag.terms[4, 1] == 0.0 and ((diag.share_all >= 0) & (diag.share_all <= 1)).all()
