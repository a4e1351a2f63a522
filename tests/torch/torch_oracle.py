"""Shared pieces of the torch adapter tests: tiny models, checkpoints written by real SGD steps,
and Captum's TracInCP / TracInCPFast driven as the independent oracle."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LRS = (0.5, 0.1, 0.02)


def mlp(seed: int = 0, bias_last: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4, bias=bias_last))


class MeanMix(nn.Module):
    """Mixes the examples of a batch: adds `share` of the batch mean to every row."""

    def __init__(self, share: float):
        super().__init__()
        self.share = share

    def forward(self, x):
        return x + self.share * x.mean(0, keepdim=True)


class SharedQuery(nn.Module):
    """A Linear run once on a learned (1, 4) query that the whole batch shares: the hooks expand it, rightly."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 4))
        self.q = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x + self.q(self.query))


class SmallCNN(nn.Module):
    """Conv + BatchNorm + dropout + a Linear head, for paths that go through vmap (3 classes)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5)
        )
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def cnn_with_checkpoints(tmp_path: Path, n: int):
    """A SmallCNN trained on n random 6 x 6 images (left in train mode), its checkpoints, and the
    data: (model, [(path, lr), ...], (x, y))."""
    torch.manual_seed(0)
    model = SmallCNN()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return model, train_checkpoints(model, x, y, tmp_path), (x, y)


def classification_data(n: int, seed: int, features: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_checkpoints(
    model: nn.Module, inputs, targets, tmp_path: Path, lrs=LRS, steps: int = 4, call=None
) -> list[tuple[str, float]]:
    """SGD with each learning rate in turn; the state after each phase saved to tmp_path.
    Returns [(path, lr), ...]; the model is left in its trained state (train mode)."""
    call = call or (lambda m, x: m(*x) if isinstance(x, tuple) else m(x))
    model.train()
    loss = nn.CrossEntropyLoss()
    out = []
    for c, lr in enumerate(lrs):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss(call(model, inputs), targets).backward()
            opt.step()
        path = tmp_path / f"ckpt{c}.pt"
        torch.save(model.state_dict(), path)
        out.append((str(path), lr))
    return out


def captum_tracin(model: nn.Module, checkpoints, train: tuple, *, layers=None, fast_layer: str | None = None):
    """Captum TracInCP (or TracInCPFast on `fast_layer`) over `train` = (*inputs, targets), on an
    eval-mode copy of `model` (Captum loads checkpoints into the model it is given)."""
    from captum.influence import TracInCP, TracInCPFast

    model = copy.deepcopy(model).eval()
    rates = {path: lr for path, lr in checkpoints}

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True))
        return rates[path]

    loader = DataLoader(TensorDataset(*train), batch_size=16, shuffle=False)
    paths = [p for p, _ in checkpoints]
    if fast_layer is not None:
        layer = dict(model.named_modules())[fast_layer]
        return TracInCPFast(
            model,
            layer,
            loader,
            paths,
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=16,
        )
    return TracInCP(
        model,
        loader,
        paths,
        checkpoints_load_func=load,
        layers=layers,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=16,
    )


def captum_scores(tracin, test: tuple) -> np.ndarray:
    return tracin.influence(test).detach().numpy().astype(np.float64)


def assert_scores_match(ours: np.ndarray, theirs: np.ndarray, rtol: float = 1e-4) -> None:
    """Entrywise agreement relative to the largest score (both sides are float32 sums)."""
    scale = np.abs(theirs).max()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * scale)
