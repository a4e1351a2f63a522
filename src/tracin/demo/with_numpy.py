"""The demo on NumPy alone: SGD training of the MLP and exact per-example gradients, factored per layer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .._export.fingerprint import digest_arrays
from ..store import GradientStore
from .data import NoisyDigits
from .framework import SaveCheckpoint
from .mlp import LAYERS, Params, batch_gradient, forward, init_params, per_example_factors
from .training import TrainingConfig, accuracy, batches, sgd_momentum

_ROWS_PER_WRITE = 512


class NumpyMLP:
    """The trained MLP; checkpoints are .npz files of its parameters (mlp.Params)."""

    def __init__(self, params: Params, checkpoints: list[tuple[Path, float]], held_out_accuracy: np.ndarray):
        self.params = params
        self.checkpoints = checkpoints
        self.held_out_accuracy = held_out_accuracy

    def logits(self, x: np.ndarray) -> np.ndarray:
        return forward(self.params, x)[1]

    def logits_at(self, checkpoint: int, x: np.ndarray) -> np.ndarray:
        return forward(dict(np.load(self.checkpoints[checkpoint][0])), x)[1]

    def export(self, x: np.ndarray, y: np.ndarray, path: Path, progress: bool, traced: int) -> GradientStore:
        """A factored store of the first `traced` checkpoints: checkpoint c, layer l at position c * 2 + l,
        left d(loss)/d(output) (n, out), right [input, 1] (n, in + 1), weight the checkpoint's learning
        rate; metadata["fingerprints"]["checkpoints"] holds one digest per checkpoint."""
        states = [(dict(np.load(p)), lr) for p, lr in self.checkpoints[:traced]]
        dims = [(self.params[w].shape[1], self.params[w].shape[0] + 1) for _ in states for w, _ in LAYERS]
        weights = [lr for _, lr in states for _ in LAYERS]
        meta = {
            "framework": "numpy",
            "mode": "factored",
            "layers": None,
            "projection": None,
            "params": [{"name": k, "shape": list(v.shape)} for k, v in self.params.items()],
            "factors": {"left": "d(loss)/d(layer output)", "right": "layer input, with 1 appended"},
            # one digest per traced checkpoint (of its parameters), as the adapters record: it tells
            # `tracin info` and scoring that the store's slots are checkpoints of len(LAYERS) layers
            "fingerprints": {"checkpoints": [digest_arrays(params[k] for k in self.params) for params, _ in states]},
            "checkpoint_sources": ["state"] * len(states),
        }
        writer = GradientStore.create(path, len(x), dims, weights, factored=True, metadata=meta)
        with writer:
            for c, (params, _) in enumerate(states):
                for start in range(0, len(x), _ROWS_PER_WRITE):
                    rows = slice(start, start + _ROWS_PER_WRITE)
                    for layer, factors in enumerate(per_example_factors(params, x[rows], y[rows])):
                        writer.write(c * len(LAYERS) + layer, start, factors)
            return writer.finalize()


def train(data: NoisyDigits, config: TrainingConfig, save: SaveCheckpoint, on_epoch: Callable[[int], None]) -> NumpyMLP:
    """Trains on the noisy labels; saves its checkpoints (npz) by `save`. BLAS runs on
    one thread: on these small matrices more threads only wait for each other."""
    with threadpool_limits(1):
        return _train(data, config, save, on_epoch)


def _train(
    data: NoisyDigits, config: TrainingConfig, save: SaveCheckpoint, on_epoch: Callable[[int], None]
) -> NumpyMLP:
    params = init_params(data.x_train.shape[1], config.hidden, 10, config.seed)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    save_at = config.checkpoint_epochs()
    checkpoints, held_out = [], []
    for epoch, epoch_batches in batches(config, len(data.x_train)):
        lr = config.learning_rate_at(epoch)
        for rows in epoch_batches:
            grads = batch_gradient(params, data.x_train[rows], data.y_train[rows])
            params, velocity = sgd_momentum(params, velocity, grads, lr, config.momentum)
        held_out.append(accuracy(forward(params, data.x_test)[1], data.y_test))
        if epoch in save_at:
            path = save(epoch, lambda p, params=params: np.savez(p, **params))
            checkpoints.append((path, lr))
        on_epoch(epoch)
    return NumpyMLP(params, checkpoints, np.array(held_out))
