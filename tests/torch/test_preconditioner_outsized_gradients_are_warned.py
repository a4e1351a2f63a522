"""preconditioner="adam" on a CNN trained with AdamW whose Conv2d has a bias followed by BatchNorm2d: the bias
gets almost no gradient in training mode (BatchNorm takes out the batch mean, so v is rounding noise) and a
real one in the export's eval mode, which g / (sqrt(v) + eps) blows up into nearly all of each row. That is
warned about, naming the parameter and the way out; the way out (layers= without it) is not warned about,
nor is the same network without BatchNorm."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import tracin.torch

LOSS = nn.CrossEntropyLoss(reduction="none")


def _trained(batch_norm: bool) -> tuple[nn.Module, list, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    norm = nn.BatchNorm2d(2) if batch_norm else nn.Identity()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    adam = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    for i in range(0, 64 * 5, 16):
        model.train()
        adam.zero_grad()
        LOSS(model(x[i % 64 : i % 64 + 16]), y[i % 64 : i % 64 + 16]).mean().backward()
        adam.step()
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, 1e-2, copy.deepcopy(adam.state_dict()))
    return model.eval(), [checkpoint], (x[:8], y[:8])


def _outsized(model: nn.Module, checkpoints: list, data, **options) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracin.torch.export_gradients(model, checkpoints, data, LOSS, preconditioner="adam", progress=False, **options)
    return [str(w.message) for w in caught if "far larger than" in str(w.message) and w.filename == __file__]


def test_a_conv_bias_before_batch_norm_is_warned_about() -> None:
    model, checkpoints, data = _trained(batch_norm=True)
    (message,) = _outsized(model, checkpoints, data)
    assert "'0.bias'" in message and "'0.weight'" not in message
    assert "layers=" in message and "bias=False" in message


@pytest.mark.parametrize("batch_norm", [True, False])
def test_no_warning_without_the_bias_or_without_batch_norm(batch_norm: bool) -> None:
    model, checkpoints, data = _trained(batch_norm)
    layers = ["0.weight", "1", "4"] if batch_norm else None
    assert _outsized(model, checkpoints, data, layers=layers) == []
