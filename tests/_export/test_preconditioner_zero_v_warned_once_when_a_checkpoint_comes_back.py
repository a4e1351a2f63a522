"""The full-row "adam" warns about gradient where v is 0 once per parameter per checkpoint, also when blocks of a
checkpoint come back after another checkpoint's (its moments read again): the second visit says nothing, and
its rows are still g / eps there (float64 NumPy)."""

from __future__ import annotations

import warnings

import numpy as np

from tracin._export.preconditioner import AdamMoments, Preconditioned


def test_a_checkpoint_that_comes_back_is_not_warned_about_again():
    rng = np.random.default_rng(0)
    v = rng.uniform(0.5, 2.0, (4, 3))
    v[2] = 0.0  # a token the training never held
    emb = AdamMoments(np.zeros(12, np.float32), v.reshape(-1).astype(np.float32), 2.0, 0.9, 0.99, 1e-3)
    adam = Preconditioned("adam", lambda c: [emb], {}, ["emb.weight"], [(4, 3)])
    g = rng.normal(size=(3, 12)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adam.apply(g, 0, 0)
        adam.apply(g, 1, 0)
        out = adam.apply(g, 0, 0)  # checkpoint 0 again: its moments read again, no second warning
    texts = [str(w.message) for w in caught]
    assert [t.split(" is 0 in ")[1][:12] for t in texts] == ["checkpoint 0", "checkpoint 1"], texts
    expected = g.astype(np.float64) / (np.sqrt(v.reshape(-1) / (1 - 0.99**2)) + 1e-3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
