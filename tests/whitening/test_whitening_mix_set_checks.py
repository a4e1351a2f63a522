"""fit checks the mix set as it checks train (mutant W16: only train checked): a whitened mix set is refused
(its rows are already multiplied by an inverse, so blending their moments into R is wrong), and a mix set of no
rows is refused by name rather than dividing its moments by 0."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening


def test_a_whitened_or_empty_mix_set_is_refused_naming_mix():
    rng = np.random.default_rng(11)
    g = rng.standard_normal((40, 6)).astype(np.float32)
    train = tracin.Gradients([g])
    whitened = Whitening.fit(train).apply(tracin.Gradients([g[:5]]))
    with pytest.raises(ValueError, match=r"^mix is already whitened \(metadata\['whitening'\]\); fit on unwhitened"):
        Whitening.fit(train, mix=whitened)
    with pytest.raises(ValueError, match=r"^mix has no rows; whitening needs at least one gradient to fit"):
        Whitening.fit(train, mix=tracin.Gradients([g[:0]]))
    # an ordinary mix set is blended: R = 0.5 R_train + 0.5 R_mix (float64 NumPy reference)
    e = rng.standard_normal((9, 6)).astype(np.float32)
    w = Whitening.fit(train, mix=tracin.Gradients([e]), precision="float64")
    g64, e64 = g.astype(np.float64), e.astype(np.float64)
    r = 0.5 * g64.T @ g64 / 40 + 0.5 * e64.T @ e64 / 9
    lam = 10.0 * np.trace(r) / 6
    np.testing.assert_allclose(w.inverses[0], np.linalg.inv(r + lam * np.eye(6)), rtol=1e-10)
