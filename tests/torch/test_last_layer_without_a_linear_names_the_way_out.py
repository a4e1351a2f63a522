"""A CNN whose head is a Conv2d (no nn.Linear runs) asked for mode="last_layer" is told which module is its
last layer and how to take its exact gradients (mode="full", layers=[that module]); the advice works."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import tracin.torch


class _ConvHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.bn, self.head = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.body(x)))).flatten(1)


def test_a_conv_head_is_named_with_mode_full_and_layers() -> None:
    model = _ConvHead().eval()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g))
    loss = nn.CrossEntropyLoss(reduction="none")
    checkpoints = [(model.state_dict(), 0.1)]
    with pytest.raises(ValueError, match="none ran") as e:
        tracin.torch.export_gradients(model, checkpoints, data, loss, mode="last_layer", progress=False)
    assert "'head', a Conv2d" in str(e.value)
    assert "mode='full' with layers=['head']" in str(e.value)
    rows = tracin.torch.export_gradients(model, checkpoints, data, loss, layers=["head"], progress=False)
    assert np.asarray(rows.matrices[0]).shape == (6, 3 * 2 * 4 * 4 + 3)
