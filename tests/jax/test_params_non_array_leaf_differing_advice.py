"""A non-array leaf that differs between checkpoints (a step counter in a dict beside the weights) is refused
saying what to do: leave it out of the params, or make it an array."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients


def test_a_differing_python_int_step_in_a_nested_dict_is_told_to_be_left_out_or_made_an_array():
    x, y = np.ones((4, 2), np.float32), np.zeros(4, np.float32)
    checkpoints = [({"state": {"step": s, "w": jnp.full(2, s + 1.0)}}, 0.1) for s in (0, 6)]
    with pytest.raises(ValueError, match=r"non-array leaf 'state/step' differs .*leave it out of the params you pass"):
        export_gradients(lambda c, x, y: (x @ c["state"]["w"] - y) ** 2, checkpoints, (x, y), progress=False)
