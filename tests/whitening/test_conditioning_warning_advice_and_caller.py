"""fit and with_damping's ill-conditioning warning (whitening._conditioning): it names the SMALLEST power-of-two
multiple of the damping that keeps the stated worst case (4 + sqrt(d) / 2) x cond x 2^-24 within 4e-3, cond that
of R + lambda I worked out in float64 NumPy (mutant C2: multiples of four, a larger damping than needed), and it is
attributed to the caller's line (mutant C1: stacklevel one short, pointing into tracin)."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

import tracin
from tracin.whitening import Whitening


def _worst_case(g: np.ndarray, damping: float) -> float:
    """(4 + sqrt(d) / 2) x cond(R + lambda I) x 2^-24 from float64 NumPy eigenvalues."""
    g = g.astype(np.float64)
    r = g.T @ g / len(g)
    d = len(r)
    lam = damping * np.trace(r) / d
    eig = np.clip(np.linalg.eigvalsh(r), 0.0, None)
    return (4.0 + math.sqrt(d) / 2.0) * (eig[-1] + lam) / (eig[0] + lam) * 2.0**-24


def test_the_advised_damping_is_the_smallest_doubling_that_keeps_the_worst_case_within_4e_3():
    rng = np.random.default_rng(3)
    g = (rng.standard_normal((40, 2)) @ rng.standard_normal((2, 30))).astype(np.float32)  # rank 2 of 30 dims
    damping = 1e-7
    for call in (
        lambda: Whitening.fit(tracin.Gradients([g]), damping=damping, precision="float64"),
        lambda: Whitening.fit(tracin.Gradients([g]), damping=1.0, precision="float64").with_damping(damping),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        safe = float(re.search(r"a damping of (\S+) or more", messages[0]).group(1))
        doublings = math.log2(safe / damping)
        assert abs(doublings - round(doublings)) < 1e-2, (safe, doublings)  # a power-of-two multiple (3 digits)
        exact = damping * 2.0 ** round(doublings)
        assert _worst_case(g, exact) <= 4e-3 < _worst_case(g, exact / 2), (exact, doublings)


def test_the_warning_points_at_the_line_that_called_fit_or_with_damping():
    rng = np.random.default_rng(4)
    g = (rng.standard_normal((20, 2)) @ rng.standard_normal((2, 16))).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = Whitening.fit(tracin.Gradients([g]), damping=1e-6, precision="float64")
        w.with_damping(1e-7)
    found = [(c.filename, c.lineno) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(found) == 2, found
    assert all(filename == __file__ for filename, _ in found), found
