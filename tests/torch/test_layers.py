"""Choosing parameters by module-name prefix or glob, and finding the last Linear layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tracin.torch.layers import last_linear, linear_by_name, select_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])})
        self.fc2 = nn.Linear(3, 2)
        self.fc = nn.Linear(2, 2)  # defined after fc2 but runs before it

    def forward(self, x):
        for layer in self.encoder["layer"]:
            x = layer(x)
        return self.fc2(torch.cat([self.fc(x[:, :2]), x[:, 2:]], dim=1))


def test_prefix_matches_whole_module_names_only():
    names = select_parameters(Net(), ["fc"])
    assert names == ["fc.weight", "fc.bias"]  # not fc2.*


def test_globs_and_prefixes_combine_in_model_order():
    names = select_parameters(Net(), ["fc2", "encoder.layer.2.*", "*.0.bias"])
    assert names == ["encoder.layer.0.bias", "encoder.layer.2.weight", "encoder.layer.2.bias", "fc2.weight", "fc2.bias"]
    assert select_parameters(Net(), "fc2") == ["fc2.weight", "fc2.bias"]


def test_default_is_every_trainable_parameter():
    net = Net()
    net.encoder.requires_grad_(False)
    assert select_parameters(net, None) == ["fc2.weight", "fc2.bias", "fc.weight", "fc.bias"]
    # a frozen layer named explicitly is still exported
    assert select_parameters(net, ["encoder.layer.1"]) == ["encoder.layer.1.weight", "encoder.layer.1.bias"]
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(net, None)


def test_unmatched_patterns_list_the_modules():
    with pytest.raises(ValueError, match=r"'decoder' matches no parameter; modules are \['encoder'"):
        select_parameters(Net(), ["fc", "decoder"])
    with pytest.raises(TypeError, match="layers must be"):
        select_parameters(Net(), [3])
    with pytest.raises(TypeError, match="layers must be"):
        select_parameters(Net(), [])


def test_last_linear_is_the_last_to_run_not_the_last_defined():
    net = Net()
    assert last_linear(net, lambda: net(torch.randn(2, 3))) == "fc2"
    assert isinstance(linear_by_name(net, "fc"), nn.Linear)
    with pytest.raises(ValueError, match="'encoder' is ModuleDict"):
        linear_by_name(net, "encoder")
    with pytest.raises(ValueError, match="is nothing"):
        linear_by_name(net, "head")
    conv = nn.Sequential(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="none ran"):
        last_linear(conv, lambda: conv(torch.randn(1, 1, 3)))
