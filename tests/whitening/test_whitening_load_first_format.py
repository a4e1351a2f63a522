"""A whitening saved in the first format (tracin before 2026-12-02: np.savez of a spec without 'precision' and the
damped inverses alone, no second moments) is refused as what it is, an older version's file, and the user told to
fit again; not called 'not a saved tracin.Whitening' with WhiteningSpec's missing-argument TypeError as the reason."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening


def _first_format_file(path, g, damping=10.0):
    """What the first Whitening.save wrote for one checkpoint of full rows g (float64 NumPy, not our code)."""
    g64 = g.astype(np.float64)
    r = g64.T @ g64 / len(g64)
    lam = damping * np.trace(r) / len(r)
    spec = {
        "kind": "full",
        "damping": damping,
        "lambdas": [lam],
        "dims": [g.shape[1]],
        "n_rows": len(g),
        "mix_rows": 0,
        "mix_weight": 0.0,
        "fingerprint": "0123456789abcdef",
        "fitted_on": None,
        "space": {},
    }
    np.savez(path, spec=np.array(json.dumps(spec)), inverse_0=np.linalg.inv(r + lam * np.eye(len(r))))


def test_a_first_format_file_is_named_an_older_versions_and_refit_advised(tmp_path):
    g = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    path = tmp_path / "old.npz"
    _first_format_file(path, g)
    with pytest.raises(ValueError) as info:
        Whitening.load(path)
    message = str(info.value)
    assert message.startswith(f"{path} is a tracin.Whitening saved by an older version: ")
    assert "no 'precision'" in message and "no second moments" in message
    assert "fit it again from the train gradients (Whitening.fit)" in message
    assert "WhiteningSpec" not in message and "positional argument" not in message


def test_a_current_file_missing_another_field_is_still_not_a_whitening(tmp_path):
    g = np.random.default_rng(4).standard_normal((40, 6)).astype(np.float32)
    w = Whitening.fit(tracin.Gradients([g]))
    w.save(tmp_path / "w.npz")
    arrays = dict(np.load(tmp_path / "w.npz"))
    spec = json.loads(str(arrays["spec"]))
    del spec["fitted_on"]  # not the first format: that one lacks 'precision' alone
    np.savez(tmp_path / "odd.npz", **{**arrays, "spec": np.array(json.dumps(spec))})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'odd.npz'} is not a saved tracin.Whitening (")):
        Whitening.load(tmp_path / "odd.npz")
    loaded = Whitening.load(tmp_path / "w.npz")  # the current format still loads
    assert loaded.spec == w.spec
