"""fx352: tracin.jax warns once, at the end of an export, about rows whose gradient is all 0 at every checkpoint
(in memory and into a store); a row 0 at only one checkpoint gives no warning. Checked against float64 NumPy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jnp = pytest.importorskip("jax.numpy")

from tracin._export.sinks import ZERO_STARTS  # noqa: E402
from tracin.jax import export_gradients  # noqa: E402

W = [np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)]
X = np.array([[2.0, 1.0], [1.0, 2.0], [0.5, 3.0], [1.0, 1.0], [3.0, 1.0]], dtype=np.float32)


def _loss(params, x, y):
    return (x @ params["w"] - y) ** 2


@pytest.mark.parametrize("store", [False, True])
def test_a_row_zero_at_every_checkpoint_is_named_and_one_zero_at_one_only_is_not(tmp_path, store):
    for zero_at_both, expected in ((True, [3]), (False, [])):
        y = np.array([0.0, 1.0, 0.0, 1.0 if zero_at_both else 0.0, 0.0], np.float32)
        ref = [2 * (X.astype(np.float64) @ w - y)[:, None] * X for w in W]  # float64 reference rows
        assert [r for r in range(5) if not (ref[0][r].any() or ref[1][r].any())] == expected
        assert not ref[0][1].any() and ref[1][1].any()  # row 1: 0 at checkpoint 0 only
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_gradients(
                _loss,
                [({"w": jnp.asarray(w)}, 1.0) for w in W],
                (X, y),
                batch_size=2,
                progress=False,
                store=tmp_path / f"s{zero_at_both}" if store else None,
            )
        said = [w for w in caught if str(w.message).startswith(ZERO_STARTS)]
        if expected:
            assert len(said) == 1 and str(said[0].message).startswith(f"{ZERO_STARTS}row 3 of the data: its")
            assert said[0].category is UserWarning and said[0].filename == __file__
        else:
            assert said == []
