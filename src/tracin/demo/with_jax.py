"""The demo on JAX: the same MLP trained with a jitted SGD step, gradients by tracin.jax (full rows)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..jax import export_gradients
from ..store import GradientStore
from .data import NoisyDigits
from .framework import SaveCheckpoint
from .mlp import Params, init_params
from .training import TrainingConfig, accuracy, batches, sgd_momentum


def _logits(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _per_example_loss(params, x, y):
    """Cross-entropy per example, shape (batch,)."""
    log_p = jax.nn.log_softmax(_logits(params, x))
    return -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]


def _mean_loss(params, x, y):
    return _per_example_loss(params, x, y).mean()


class JaxMLP:
    """The trained parameters (a dict of arrays); checkpoints are .npz files of them."""

    def __init__(self, params: Params, checkpoints: list[tuple[Path, float]], held_out_accuracy: np.ndarray):
        self.params = params
        self.checkpoints = checkpoints
        self.held_out_accuracy = held_out_accuracy

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(_logits)(self.params, x))

    def logits_at(self, checkpoint: int, x: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(_logits)(dict(np.load(self.checkpoints[checkpoint][0])), x))

    def export(self, x: np.ndarray, y: np.ndarray, path: Path, progress: bool, traced: int) -> GradientStore:
        """tracin.jax.export_gradients in "full" mode at the first `traced` checkpoints: one row of all
        parameters per example and checkpoint."""
        states = [(dict(np.load(p)), lr) for p, lr in self.checkpoints[:traced]]
        return export_gradients(_per_example_loss, states, (x, y), store=path, progress=progress)


def train(data: NoisyDigits, config: TrainingConfig, save: SaveCheckpoint, on_epoch: Callable[[int], None]) -> JaxMLP:
    """Trains on the noisy labels; saves its checkpoints (npz) by `save`."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    @jax.jit
    def epoch_steps(params, velocity, epoch_batches, lr):
        """One epoch, compiled whole (one call per epoch instead of one per batch)."""
        for rows in epoch_batches:
            grads = jax.grad(_mean_loss)(params, x[rows], y[rows])
            params, velocity = sgd_momentum(params, velocity, grads, lr, config.momentum)
        return params, velocity

    params = {k: jnp.asarray(v) for k, v in init_params(data.x_train.shape[1], config.hidden, 10, config.seed).items()}
    velocity = {k: jnp.zeros_like(v) for k, v in params.items()}
    save_at = config.checkpoint_epochs()
    checkpoints, held_out = [], []
    logits = jax.jit(_logits)
    for epoch, epoch_batches in batches(config, len(data.x_train)):
        lr = config.learning_rate_at(epoch)
        params, velocity = epoch_steps(params, velocity, epoch_batches, jnp.float32(lr))
        held_out.append(accuracy(logits(params, data.x_test), data.y_test))
        if epoch in save_at:
            arrays = {k: np.asarray(v) for k, v in params.items()}
            path = save(epoch, lambda p, arrays=arrays: np.savez(p, **arrays))
            checkpoints.append((path, lr))
        on_epoch(epoch)
    return JaxMLP({k: np.asarray(v) for k, v in params.items()}, checkpoints, np.array(held_out))
