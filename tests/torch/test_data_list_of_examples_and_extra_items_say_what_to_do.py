"""A first-hour image classifier user's data mistakes get advice that fits them: a Python list of single
(image, label) examples (labels 0-d, images several dimensions) is told to collate them, not that a label
is "a setting shared by every example"; a Dataset or DataLoader whose items carry a third element (the
example's index, a weight: the usual trick when hunting mislabelled data) is told to keep (inputs, targets)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, default_collate

import tracin.torch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def _images(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


LOSS = nn.CrossEntropyLoss(reduction="none")


def _export(model: nn.Module, data) -> np.ndarray:
    grads = tracin.torch.export_gradients(model, [(model.state_dict(), 0.1)], data, LOSS, progress=False)
    return np.asarray(grads.matrices[0])


@pytest.mark.parametrize("label", ["tensor", "int"])
def test_a_list_of_single_image_examples_is_told_to_collate_them(label: str) -> None:
    x, y = _images()
    data = [(x[i], y[i] if label == "tensor" else int(y[i])) for i in range(len(x))]
    with pytest.raises(ValueError) as e:
        _export(_model(), data)
    message = str(e.value)
    assert "list of 12 (inputs, targets) pairs" in message
    assert "default_collate(data)" in message and "DataLoader(data, batch_size=64)" in message
    # the advice works: the collated pair exports as the (inputs, targets) tensors do
    assert np.array_equal(_export(_model(), default_collate(data)), _export(_model(), (x, y)))


def test_a_list_of_batches_sharing_a_0d_target_is_told_both_readings() -> None:
    """Batches of 6 images whose target is one value each (a setting of the loss, not a label per row) cannot
    be told from single examples by their shapes: the message gives collating and functools.partial both."""
    x, _ = _images()
    data = [(x[:6], torch.tensor(0.0)), (x[6:], torch.tensor(0.0))]
    with pytest.raises(ValueError) as e:
        _export(_model(), data)
    message = str(e.value)
    assert "default_collate(data)" in message
    assert "shared by every example (a setting of the loss), it belongs with loss_fn" in message
    assert "functools.partial(loss_fn, setting=...)" in message


def test_a_list_of_batches_with_a_stray_0d_target_keeps_the_setting_advice() -> None:
    x, y = _images()
    data = [(x[:6], y[:6]), (x[6:], y[6:]), (x[:2], torch.tensor(1))]  # data[0] a real batch
    with pytest.raises(ValueError, match="batch 2 targets") as e:
        _export(_model(), data)
    assert "default_collate(data)" not in str(e.value)


class _WithIndex(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


@pytest.mark.parametrize("wrap", ["dataset", "loader"])
def test_items_with_a_third_element_are_told_to_keep_inputs_and_targets(wrap: str) -> None:
    x, y = _images()
    data = _WithIndex(x, y) if wrap == "dataset" else DataLoader(_WithIndex(x, y), batch_size=5)
    with pytest.raises(TypeError) as e:
        _export(_model(), data)
    message = str(e.value)
    assert "got list of length 3" in message or "got tuple of length 3" in message
    assert "collate_fn=lambda items: default_collate(items)[:2]" in message
    assert "((x1, x2), y)" in message  # several model inputs go as one tuple
    # the advice works (one batch of all rows, as the tensors are: the same bits)
    fixed = DataLoader(_WithIndex(x, y), batch_size=len(x), collate_fn=lambda items: default_collate(items)[:2])
    assert np.array_equal(_export(_model(), fixed), _export(_model(), (x, y)))
