"""tracin.torch.layers: last_linear's trial forward (no graph, no hooks left behind) and linear_modules_of's
refusal of Linear parameters other than weight and bias (weight_norm's weight_g, weight_v)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tracin.torch.layers import last_linear, linear_modules_of, select_parameters


def test_last_linears_trial_forward_builds_no_graph_and_leaves_no_hooks():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    outputs = []
    assert last_linear(net, lambda: outputs.append(net(torch.randn(2, 3)))) == "2"
    assert not outputs[0].requires_grad and outputs[0].grad_fn is None  # run under torch.no_grad()
    assert all(not m._forward_hooks for m in net.modules())


def test_last_linear_removes_its_hooks_when_the_forward_raises():
    net = nn.Sequential(nn.Linear(3, 4))

    def broken():
        net(torch.randn(2, 3))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        last_linear(net, broken)
    assert not net[0]._forward_hooks


def test_factored_mode_refuses_a_linears_parameters_other_than_weight_and_bias():
    """weight_norm's Linear holds weight_g, weight_v (and computes weight from them): factoring them as a weight's
    outer product would be wrong, so they are refused by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
        net = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 2)))
    names = [n for n, _ in net.named_parameters()]
    assert sorted(names) == ["0.bias", "0.weight_g", "0.weight_v"]
    with pytest.raises(ValueError, match=r"nn.Linear weight or bias; '0.weight_[gv]' is not \(choose layers="):
        linear_modules_of(net, names)
    assert linear_modules_of(nn.Sequential(nn.Linear(3, 2)), ["0.weight", "0.bias"]) == ["0"]


def test_an_unmatched_pattern_lists_up_to_30_names_and_marks_only_more():
    """Exactly 30 parameters are all listed, with no '...'; a 31st is cut and marked."""
    thirty = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(ValueError, match=r"parameters are \['0.weight', '0.bias', .*'14.weight', '14.bias'\]$"):
        select_parameters(thirty, ["head"])
    thirty.add_module("15", nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match=r"parameters are \['0.weight', .*'14.weight', '14.bias'\] \.\.\.$"):
        select_parameters(thirty, ["head"])
