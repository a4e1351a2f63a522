"""tracin.jax.export_gradients stopped by the export itself, not by the data (a store refusing a NaN gradient
row, a Ctrl-C while a batch is stored), after a NaN-loss row, with warnings as errors: the error is raised with
the NaN-loss warning as a note on it (review360 F3: the batches generator saw only a GeneratorExit, and the
warning was lost)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interrupts import ctrl_c_on_call
from tracin._export.sinks import StoreSink
from tracin.jax import export_gradients


def _loss(params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    logits = x @ params["w"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    x[1] = np.nan  # a NaN loss and a NaN gradient row, in the first batch
    return x, np.array([0, 1, 2, 1, 0, 2, 1, 1, 0, 0, 2, 1])


_NOTE = [["RuntimeWarning", " loss_fn gives a NaN or infinite loss for row 1 of the data at checkpoint 0"]]


def test_a_store_refusing_the_nan_row_raises_with_the_warning_in_a_note(tmp_path):
    params = {"w": jnp.full((4, 3), 0.1, jnp.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="row 1 of checkpoint 0 holds NaN or Inf gradient values") as raised:
            export_gradients(_loss, [(params, 1.0)], _data(), store=tmp_path / "g", batch_size=3, progress=False)
    assert [n.split(":")[:2] for n in getattr(raised.value, "__notes__", [])] == _NOTE


def test_a_ctrl_c_storing_the_second_batch_raises_with_the_warning_in_a_note(tmp_path):
    params = {"w": jnp.full((4, 3), 0.1, jnp.float32)}
    x, y = _data()
    x[1] = 0.0
    y = y.copy()
    y[1] = -100  # a NaN loss read with take_along_axis, its gradient row all 0: the store takes it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ctrl_c_on_call(StoreSink, "write", 2) as raised:
            export_gradients(_loss, [(params, 1.0)], (x, y), store=tmp_path / "g", batch_size=3, progress=False)
    assert [n.split(":")[:2] for n in getattr(raised.value, "__notes__", [])] == _NOTE
