"""The full-row "adam" warns about gradient where v is 0 once per parameter per checkpoint, also when blocks of a
checkpoint come back after another checkpoint's (its moments read again): the second visit says nothing, and
its rows are still g / eps there (float64 NumPy); and it looks for that gradient at the zero entries' own
columns of the row, for a parameter that is not the row's first too."""

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


def test_zero_v_of_a_later_parameter_is_found_at_its_own_columns_of_the_row():
    """v of the row's second parameter (a (4, 2) embedding after a (3,) bias) is 0 on its row 1, columns 3 + 2 and
    3 + 3 of the row: a block with gradient only there warns (naming it), one with gradient everywhere else does
    not; counted from the block by NumPy."""
    rng = np.random.default_rng(1)
    bias = AdamMoments(np.zeros(3, np.float32), rng.uniform(0.5, 2.0, 3).astype(np.float32), 2.0, 0.9, 0.99, 1e-3)
    v = rng.uniform(0.5, 2.0, (4, 2))
    v[1] = 0.0
    emb = AdamMoments(np.zeros(8, np.float32), v.reshape(-1).astype(np.float32), 2.0, 0.9, 0.99, 1e-3)
    zero_cols = [5, 6]
    elsewhere = rng.normal(size=(4, 11)).astype(np.float32)
    elsewhere[:, zero_cols] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Preconditioned("adam", lambda c: [bias, emb], {}, ["b", "emb.weight"], [(3,), (4, 2)]).apply(elsewhere, 0, 0)
    there = np.zeros((4, 11), np.float32)
    there[[0, 2], 5] = 1.0
    touch = int(np.count_nonzero(there[:, zero_cols].any(axis=1)))
    adam = Preconditioned("adam", lambda c: [bias, emb], {}, ["b", "emb.weight"], [(3,), (4, 2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adam.apply(there, 0, 0)
    (text,) = [str(w.message) for w in caught]
    assert text.startswith(
        f"preconditioner='adam': {touch} of the 4 rows of a batch have gradient where the second moment (v) of "
        "'emb.weight' is 0 in checkpoint 0 (2 of 8 entries; 1 of its 4 rows all 0: "
    ), text
