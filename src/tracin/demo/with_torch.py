"""The demo on PyTorch: the same MLP trained with torch.optim.SGD, gradients by tracin.torch (factored mode)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..store import GradientStore
from ..torch import export_gradients
from .data import NoisyDigits
from .framework import SaveCheckpoint
from .mlp import init_params
from .training import TrainingConfig, accuracy, batches


def _per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread inside (the model is tiny: threads cost more than they give), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TorchMLP:
    """The trained nn.Sequential; checkpoints are .pt state dicts."""

    def __init__(self, model: nn.Module, checkpoints: list[tuple[Path, float]], held_out_accuracy: np.ndarray):
        self.model = model
        self.checkpoints = checkpoints
        self.held_out_accuracy = held_out_accuracy

    def logits(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()

    def logits_at(self, checkpoint: int, x: np.ndarray) -> np.ndarray:
        model = copy.deepcopy(self.model)
        model.load_state_dict(torch.load(self.checkpoints[checkpoint][0], weights_only=True))
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    def export(self, x: np.ndarray, y: np.ndarray, path: Path, progress: bool, traced: int) -> GradientStore:
        """tracin.torch.export_gradients in "factored" mode at the first `traced` checkpoints: exact, both layers."""
        with _one_thread():
            return export_gradients(
                self.model,
                self.checkpoints[:traced],
                (torch.from_numpy(x), torch.from_numpy(y)),
                _per_example_cross_entropy,
                mode="factored",
                store=path,
                progress=progress,
            )


def _model(data: NoisyDigits, config: TrainingConfig) -> nn.Module:
    """nn.Sequential(Linear, ReLU, Linear) holding mlp.init_params (nn.Linear keeps weights as (out, in))."""
    params = init_params(data.x_train.shape[1], config.hidden, 10, config.seed)
    model = nn.Sequential(nn.Linear(data.x_train.shape[1], config.hidden), nn.ReLU(), nn.Linear(config.hidden, 10))
    with torch.no_grad():
        for layer, (w, b) in zip((model[0], model[2]), (("w1", "b1"), ("w2", "b2")), strict=True):
            layer.weight.copy_(torch.from_numpy(params[w].T))
            layer.bias.copy_(torch.from_numpy(params[b]))
    return model


def train(data: NoisyDigits, config: TrainingConfig, save: SaveCheckpoint, on_epoch: Callable[[int], None]) -> TorchMLP:
    """Trains on the noisy labels; saves its checkpoints (pt) by `save`."""
    with _one_thread():
        model = _model(data, config)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
        x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        x_held_out = torch.from_numpy(data.x_test)
        save_at = config.checkpoint_epochs()
        checkpoints, held_out = [], []
        for epoch, epoch_batches in batches(config, len(x)):
            lr = config.learning_rate_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for rows in epoch_batches:
                rows = torch.from_numpy(rows)
                optimizer.zero_grad()
                F.cross_entropy(model(x[rows]), y[rows]).backward()
                optimizer.step()
            with torch.no_grad():
                held_out.append(accuracy(model(x_held_out).numpy(), data.y_test))
            if epoch in save_at:
                path = save(epoch, lambda p: torch.save(model.state_dict(), p))
                checkpoints.append((path, lr))
            on_epoch(epoch)
    return TorchMLP(model, checkpoints, np.array(held_out))
