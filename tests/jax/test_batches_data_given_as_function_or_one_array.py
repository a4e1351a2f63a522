"""data given as a generator function (not a generator) or as one array gets an error that says what to pass."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients


def _loss(params, x, y):
    return (x @ params["w"] - y) ** 2


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 3), dtype=np.float32), rng.standard_normal(6).astype(np.float32)


def test_a_generator_function_is_told_to_pass_an_object_whose_iter_makes_a_generator():
    x, y = _data()

    def batches():
        for s in range(0, 6, 2):
            yield x[s : s + 2], y[s : s + 2]

    checkpoints = [({"w": jnp.ones(3)}, 0.1), ({"w": jnp.zeros(3)}, 0.1)]
    with pytest.raises(TypeError, match=r"got function \(a function, not an iterable") as info:
        export_gradients(_loss, checkpoints, batches, progress=False)
    assert "def __iter__(self): return batches()" in str(info.value)

    class Batches:  # the advice, followed, works
        def __iter__(self):
            return batches()

    rows = export_gradients(_loss, checkpoints, Batches(), progress=False)
    assert rows.matrices[0].shape == (6, 3)


def test_one_array_is_told_to_pass_inputs_and_targets_or_none():
    x, _ = _data()
    with pytest.raises(TypeError, match=r"got ndarray \(one array: pass \(inputs, targets\), or \(inputs, None\)"):
        export_gradients(_loss, [({"w": jnp.ones(3)}, 0.1)], x, progress=False)
    # the advice, followed, works with a loss that takes no targets
    rows = export_gradients(lambda p, x, _: (x @ p["w"]) ** 2, [({"w": jnp.ones(3)}, 0.1)], (x, None), progress=False)
    np.testing.assert_allclose(rows.matrices[0], 2 * (x @ np.ones(3))[:, None] * x, rtol=1e-5)
