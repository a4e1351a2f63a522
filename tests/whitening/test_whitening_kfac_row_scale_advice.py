"""A K-FAC damping so large that a factor's whitened rows fall below float32's smallest normal number is refused
naming a damping that is enough: a factor's rows scale as 1 / sqrt(damping) (lambda_B = sqrt(damping) x mean
eigenvalue), so the advice squares the rows' shortfall (mutant W6: advised as for full rows, 1 / damping, a damping
still refused)."""

from __future__ import annotations

import re

import numpy as np

import tracin
from tracin.whitening import Whitening

_TINY = float(np.finfo(np.float32).tiny)


def test_the_advised_damping_for_kfac_rows_is_accepted_and_whitens_to_normal_floats():
    rng = np.random.default_rng(0)
    scale = 1e25  # rows about 1 / (sqrt(damping) x scale): 3e-41 at damping 1e31, whose scores are still normal
    left, right = ((rng.standard_normal((50, k)) * scale).astype(np.float32) for k in (6, 7))
    train = tracin.FactoredGradients([left], [right])
    try:
        Whitening.fit(train, damping=1e31)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("damping 1e31 was accepted")
    assert "left factor's rows" in message or "right factor's rows" in message, message
    advised = float(re.search(r"use a damping of about (\S+) or less", message).group(1))
    # hand-worked: rows ~ 1 / (sqrt(damping) x scale) reach float32's smallest normal at damping (1 / (tiny scale))^2
    assert 1e24 <= advised <= (1.0 / (_TINY * scale)) ** 2, advised
    w = Whitening.fit(train, damping=advised)  # the advice is enough
    white = w.apply(train)
    for given, got, lam in ((left, white.left[0], w.spec.lambdas[0][0]), (right, white.right[0], w.spec.lambdas[0][1])):
        g = given.astype(np.float64)
        factor = g.T @ g / len(g)
        assert np.isclose(lam, np.sqrt(advised) * np.trace(factor) / len(factor), rtol=1e-6)
        exact = g @ np.linalg.inv(factor + lam * np.eye(len(factor)))  # float64 NumPy reference
        assert np.sqrt(np.mean(exact**2)) >= _TINY  # the rows are normal floats, not subnormals
        np.testing.assert_allclose(got.astype(np.float64), exact, rtol=1e-5, atol=0.0)
