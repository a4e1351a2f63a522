"""A generator given as data for several checkpoints is told how to pass data larger than memory: an object
whose __iter__ starts a new pass."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients


def test_a_generator_for_two_checkpoints_is_told_of_an_object_whose_iter_starts_a_new_pass():
    x, y = np.ones((4, 2), np.float32), np.zeros(4, np.float32)

    def make_batches():
        yield x[:2], y[:2]
        yield x[2:], y[2:]

    checkpoints = [({"w": jnp.ones(2)}, 0.1), ({"w": jnp.zeros(2)}, 0.1)]
    with pytest.raises(ValueError, match=r"one-shot iterator.*an object whose __iter__ starts a new pass"):
        export_gradients(lambda p, x, y: (x @ p["w"] - y) ** 2, checkpoints, make_batches(), progress=False)
