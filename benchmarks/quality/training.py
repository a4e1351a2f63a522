"""An MLP trained with SGD on the CPU, with its checkpoints (weights and learning rate) and the
per-epoch margins and accuracies the baselines and the recipes read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import Training


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    learning_rate: float
    epoch: int


@dataclass
class Trajectory:
    """checkpoints: ascending in epoch; margins: float32 (epochs, n) logit of the training label minus
    the largest other logit, after each epoch; train_accuracy / val_accuracy: (epochs,) on the labels
    trained on and on the validation rows (empty without them)."""

    model: nn.Module
    checkpoints: list[Checkpoint]
    margins: np.ndarray
    train_accuracy: np.ndarray
    val_accuracy: np.ndarray


def mlp(features: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n,) logit of class y minus the largest other logit."""
    assigned = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return assigned - others.max(dim=1).values


def train(
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    spec: Training,
    seed: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> Trajectory:
    """Trains mlp(features, spec.hidden, classes) on (x float32 (n, f), y int64 (n,)) from `seed`,
    its accuracy on the validation rows (x_val, y_val) recorded after each epoch if given."""
    torch.manual_seed(seed)
    model = mlp(x.shape[1], spec.hidden, classes)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xv = torch.from_numpy(x_val) if x_val is not None else None
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)
    loss_fn = nn.CrossEntropyLoss()
    keep = set(spec.checkpoint_epochs())
    checkpoints, margin_rows, train_acc, val_acc = [], [], [], []
    for epoch in range(spec.epochs):
        rate = spec.rate_at(epoch)
        for group in opt.param_groups:
            group["lr"] = rate
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), spec.batch_size):
            rows = perm[start : start + spec.batch_size]
            opt.zero_grad()
            loss_fn(model(xt[rows]), yt[rows]).backward()
            opt.step()
        with torch.no_grad():
            logits = model(xt)
            margin_rows.append(margins(logits, yt).numpy())
            train_acc.append(float((logits.argmax(1) == yt).float().mean()))
            if xv is not None:
                val_acc.append(accuracy(model, x_val, y_val))
        if epoch + 1 in keep:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            checkpoints.append(Checkpoint(state, rate, epoch + 1))
    return Trajectory(model, checkpoints, np.stack(margin_rows), np.array(train_acc), np.array(val_acc))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of the rows of `x` that `model` gives their label `y`."""
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_losses(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 (n,) cross-entropy of `model` on each example, its softmax taken in float64: in float32 a
    confident example's loss rounds to 0 in every subset model, and the LDS of that example (a Spearman
    correlation over the subset models) to 0 however good the attribution."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
        return nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none").numpy()
