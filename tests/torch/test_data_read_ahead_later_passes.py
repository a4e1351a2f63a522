"""data._ReadAhead: mode="last_layer" without layers= reads the first batch of an iterable up front (first_row, to
find the last nn.Linear to run), and the export's first pass goes on from that read; every later pass (the next
checkpoint's) iterates the source anew. With two checkpoints, the rows of the second are those of float64 autograd
at that checkpoint's weights, for a list of batches and a DataLoader over an IterableDataset (r363 mutation testing:
later passes yielding nothing went unseen)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from tracin.torch import export_gradients

X = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
Y = torch.randn(10, generator=torch.Generator().manual_seed(1))


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y, strict=True))


def _loss(outputs, targets):
    return (outputs.squeeze(-1) - targets) ** 2


def _rows64(state: dict[str, torch.Tensor]) -> np.ndarray:
    """float64 NumPy per-example gradients of (w.x + b - y)^2 w.r.t. [w, b]: 2 r [x, 1]."""
    w, b = state["0.weight"].double().numpy()[0], float(state["0.bias"])
    x = X.double().numpy()
    r = x @ w + b - Y.double().numpy()
    return 2 * r[:, None] * np.concatenate([x, np.ones((len(x), 1))], axis=1)


@pytest.mark.parametrize(
    "data",
    [
        [(X[:4], Y[:4]), (X[4:], Y[4:])],
        DataLoader(_Stream(), batch_size=4),
    ],
    ids=["list_of_batches", "iterable_dataset_loader"],
)
def test_every_checkpoint_gets_every_row(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1))
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = {k: v + 0.5 for k, v in first.items()}
    got = export_gradients(model, [(first, 1.0), (second, 0.5)], data, _loss, mode="last_layer", progress=False)
    assert [(a.shape, b.shape) for a, b in zip(got.left, got.right, strict=True)] == [((10, 1), (10, 4))] * 2
    for left, right, state in zip(got.left, got.right, (first, second), strict=True):
        matrix = left.astype(np.float64) * right.astype(np.float64)  # out = 1: the outer product is this
        want = _rows64(state)
        assert np.abs(matrix - want).max() <= 1e-5 * np.abs(want).max()
