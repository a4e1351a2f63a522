"""tracin.jax.export_gradients interrupted mid-pass after a NaN-loss row, with warnings as errors: the pass's
own error is raised, not the NaN-loss warning flushed on the way out (review343 M1)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients


def _taken(params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Cross entropy read with take_along_axis: label -100 gives a NaN loss (its gradient is all 0)."""
    logits = x @ params["w"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1, mode="fill")[:, 0]


class _Interrupted:
    """Two batches of four rows: the first holds a NaN-loss row (label -100), then `error` is raised before
    the second (a Ctrl-C, a disk gone while reading)."""

    def __init__(self, error: BaseException):
        self.error = error
        self.x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
        self.y = np.array([0, -100, 2, 1, 0, 1, 2, 0])

    def __len__(self) -> int:
        return 2

    def __iter__(self):
        yield self.x[:4], self.y[:4]
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk gone while reading batch 2")])
def test_an_interrupted_pass_raises_its_own_error_when_warnings_are_errors(error):
    params = {"w": jnp.full((4, 3), 0.1, jnp.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)) as raised:
            export_gradients(_taken, [(params, 1.0)], _Interrupted(error), batch_size=4, progress=False)
    assert raised.value is error


def test_an_interrupted_pass_still_warns_of_its_nan_rows():
    """Without the error filter, the interrupted pass still names the NaN-loss row it stored, then raises."""
    params = {"w": jnp.full((4, 3), 0.1, jnp.float32)}
    error = OSError("disk gone")
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite loss for row 1 of the data"):
        with pytest.raises(OSError) as raised:
            export_gradients(_taken, [(params, 1.0)], _Interrupted(error), batch_size=4, progress=False)
    assert raised.value is error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk gone while reading batch 2")])
def test_an_interrupted_pass_with_warnings_as_errors_names_its_nan_rows_in_a_note(error):
    """The NaN-loss warning the pass cannot raise (its own error is) is a note on that error: the rows stored
    are not computed, nor told about, again on resume."""
    params = {"w": jnp.full((4, 3), 0.1, jnp.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)):
            export_gradients(_taken, [(params, 1.0)], _Interrupted(error), batch_size=4, progress=False)
    assert [n.split(":")[:2] for n in getattr(error, "__notes__", [])] == [
        ["RuntimeWarning", " loss_fn gives a NaN or infinite loss for row 1 of the data at checkpoint 0"]
    ]
