"""Trains the demo's MLP with SGD and keeps checkpoints with the learning rate in force."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 150
    batch_size: int = 64
    hidden: int = 128
    learning_rate: float = 0.1
    decay_at: float = 0.6  # fraction of epochs after which the rate drops 10x
    checkpoints: int = 5
    seed: int = 0


def make_model(hidden: int):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_with_checkpoints(x: np.ndarray, y: np.ndarray, config: TrainingConfig, directory: Path,
                           on_epoch: Callable[[int], None] | None = None):
    """Trains until the model fits the (noisy) labels; saves `config.checkpoints` evenly spaced
    checkpoints to directory/checkpoint_E.pt. Returns (model, [(path, learning_rate), ...])."""
    import torch
    import torch.nn.functional as F

    if config.checkpoints < 1 or config.checkpoints > config.epochs:
        raise ValueError(f"checkpoints must be between 1 and epochs ({config.epochs}), got {config.checkpoints}")
    torch.manual_seed(config.seed)
    model = make_model(config.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(config.seed)
    save_at = set(np.linspace(0, config.epochs, config.checkpoints + 1, dtype=int)[1:] - 1)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints = []
    for epoch in range(config.epochs):
        lr = config.learning_rate * (1.0 if epoch < config.decay_at * config.epochs else 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), config.batch_size):
            batch = order[start:start + config.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
        if epoch in save_at:
            path = directory / f"checkpoint_{epoch + 1:04d}.pt"
            torch.save(model.state_dict(), path)
            checkpoints.append((path, lr))
        if on_epoch is not None:
            on_epoch(epoch)
    return model, checkpoints
