"""Whitening.fit refuses a mix= set that does not go with train (kind, checkpoints, dims), saying what to give."""

from __future__ import annotations

import numpy as np
import pytest

import tracin

_ADVICE = "; give mix= gradients exported the same way as train (model, checkpoints, layers, mode, projection)"


def _rows(rng, n, d):
    return rng.standard_normal((n, d)).astype(np.float32)


def test_each_mix_refusal_names_mix_train_and_the_next_step(rng):
    train = tracin.Gradients([_rows(rng, 6, 4), _rows(rng, 6, 3)], [0.5, 0.25])
    cases = {
        "mix dims [4, 2] differ from train's dims [4, 3]": tracin.Gradients(
            [_rows(rng, 5, 4), _rows(rng, 5, 2)], [0.5, 0.25]
        ),
        "mix has 1 checkpoint but train has 2 checkpoints": tracin.Gradients([_rows(rng, 5, 4)], [0.5]),
        "mix gradients are factored but train is for full gradients": tracin.FactoredGradients(
            [_rows(rng, 5, 2), _rows(rng, 5, 1)], [_rows(rng, 5, 2), _rows(rng, 5, 3)], [0.5, 0.25]
        ),
    }
    for words, mix in cases.items():
        with pytest.raises(ValueError) as caught:
            tracin.Whitening.fit(train, mix=mix, progress=False)
        assert str(caught.value) == words + _ADVICE


def test_a_matching_mix_is_fitted(rng):
    """The same advice never reaches a mix that goes with train: R is the weighted mean of both sets' moments."""
    a, b = _rows(rng, 6, 3), _rows(rng, 4, 3)
    w = tracin.Whitening.fit(
        tracin.Gradients([a]), mix=tracin.Gradients([b]), mix_weight=0.25, damping=1.0, progress=False
    )
    r = 0.75 * (a.astype(np.float64).T @ a) / 6 + 0.25 * (b.astype(np.float64).T @ b) / 4
    lam = np.trace(r) / 3
    test = _rows(rng, 2, 3)
    expect = test.astype(np.float64) @ np.linalg.inv(r + lam * np.eye(3))
    np.testing.assert_allclose(w.apply(tracin.Gradients([test])).matrices[0], expect, rtol=1e-5, atol=1e-6)
