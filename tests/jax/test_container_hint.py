"""fr357: the 'loss_fn gets each checkpoint as given' hint (_container_hint) only where the checkpoint is a
state holding parameters, not a model the loss calls (an Equinox module) nor a mapping (OrderedDict)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients

X, Y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)


def _message(loss, checkpoint):
    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed") as caught:
        export_gradients(loss, [(checkpoint, 0.1)], (X, Y), progress=False)
    return str(caught.value)


def test_an_equinox_model_the_loss_calls_wrongly_gets_no_container_hint():
    """An Equinox module is the parameters: a loss calling it with a wrong argument is not told to pass the
    parameters alone (the error names the class, Linear.__call__())."""
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0))

    def loss(m, x, y):
        return ((m(x, y) - y) ** 2).sum(-1)

    message = _message(loss, model)
    assert "Linear.__call__" in message and "as given" not in message, message


def test_an_ordered_dict_checkpoint_gets_no_container_hint():
    def loss(p, x, y):
        return (((x @ p(0)) - y) ** 2).sum(-1)

    message = _message(loss, collections.OrderedDict(w=jnp.ones((3, 2))))
    assert "OrderedDict' object is not callable" in message and "as given" not in message, message


def test_a_train_state_subclass_is_told_to_read_state_params():
    pytest.importorskip("flax")
    import optax
    from flax.training.train_state import TrainState

    class MyState(TrainState):
        pass

    state = MyState.create(apply_fn=None, params={"w": jnp.ones((3, 2))}, tx=optax.sgd(0.1))
    message = _message(lambda p, x, y: (((x @ p["w"]) - y) ** 2).sum(-1), state)
    assert "here a MyState" in message and "state.params" in message, message
