"""Inputs that change between the passes over the data (one per checkpoint), as a Dataset with random
augmentation gives them, are refused with a hint at augmentation and what to do (export with the
evaluation transforms)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

import tracin.torch


class _Augmented(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]  # a random transform, new on every read


def test_random_augmentation_is_named_with_the_way_out() -> None:
    model = nn.Linear(4, 3)
    state = model.state_dict()
    checkpoints = [({k: v.clone() for k, v in state.items()}, 0.1), ({k: v.clone() for k, v in state.items()}, 0.1)]
    with pytest.raises(ValueError, match=r"holds other inputs than on the first pass") as e:
        tracin.torch.export_gradients(
            model, checkpoints, _Augmented(), nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    assert "random augmentation in the Dataset" in str(e.value)
    assert "evaluation transforms" in str(e.value)
