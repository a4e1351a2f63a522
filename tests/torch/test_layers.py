"""Choosing parameters by module-name prefix or glob, and finding the last Linear layer."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch.layers import last_linear, linear_by_name, linear_name, select_parameters


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


def test_unmatched_patterns_list_the_parameters_too():
    """The parameter names are listed after the modules, and alone for a model without submodules (a bare
    nn.Linear, whose 'weight' and 'bias' are what layers= can name: review88 F3 / review87 F1 listed [])."""
    with pytest.raises(ValueError, match=r"modules are \['encoder'.*; parameters are \['encoder\.layer\.0\.weight'"):
        select_parameters(Net(), ["decoder"])
    message = r"'fc' matches no parameter; the model \(Linear\) has no submodules; its parameters are \['weight'"
    with pytest.raises(ValueError, match=message):
        select_parameters(nn.Linear(3, 2), ["fc"])
    assert select_parameters(nn.Linear(3, 2), ["weight"]) == ["weight"]


class _SharedAndScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a  # one module, two names
        self.scale = nn.Parameter(torch.ones(3))  # the model's own parameter

    def forward(self, x):
        return self.b(x) * self.scale


def test_a_shared_modules_second_name_and_the_models_own_parameter_are_named_usably():
    """Was (review60 F2): "'b' is no module of the model", a raw KeyError 'b' for 'b.weight', and for the
    model's own parameter "give the name of its module (_SharedAndScaled), ''"."""
    net = _SharedAndScaled()
    assert linear_by_name(net, "b") is net.a
    assert linear_name(net, "b") == linear_name(net, "a") == "a"
    with pytest.raises(
        ValueError,
        match=r"'b.weight' is a parameter, not a module: give the name of its module "
        r"\(Linear\), 'b'$",
    ):
        linear_by_name(net, "b.weight")
    with pytest.raises(
        ValueError,
        match=r"'scale' is a parameter of the model \(_SharedAndScaled\) itself, not of an nn.Linear module "
        r"\(its nn.Linear modules: 'a', 'b'\)$",
    ):
        linear_by_name(net, "scale")


def test_last_linear_is_the_last_to_run_not_the_last_defined():
    net = Net()
    assert last_linear(net, lambda: net(torch.randn(2, 3))) == "fc2"
    assert isinstance(linear_by_name(net, "fc"), nn.Linear)
    with pytest.raises(ValueError, match="'encoder' is ModuleDict"):
        linear_by_name(net, "encoder")
    with pytest.raises(
        ValueError,
        match=r"'head' is no module of the model \(its nn.Linear modules: 'encoder.layer.0', 'encoder.layer.1', "
        r"'encoder.layer.2', 'fc2', 'fc'\)",
    ):
        linear_by_name(net, "head")
    # was "'fc.weight' is nothing" (review56 F7)
    with pytest.raises(
        ValueError,
        match=r"'fc.weight' is a parameter, not a module: give the name of its module "
        r"\(Linear\), 'fc'$",
    ):
        linear_by_name(net, "fc.weight")
    with pytest.raises(ValueError, match=r"'encoder.layer.1.bias' is a parameter.*\(Linear\), 'encoder.layer.1'$"):
        linear_by_name(net, "encoder.layer.1.bias")
    conv = nn.Sequential(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="none ran"):
        last_linear(conv, lambda: conv(torch.randn(1, 1, 3)))


class TiedLM(nn.Module):
    """The head's weight is the embedding's (its first name), its bias its own."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_a_pattern_leaving_out_a_tied_weight_says_so():
    """layers=['head'] exported head.bias alone without a word; the weight is chosen by its first name."""
    with pytest.warns(UserWarning, match=r"leaves out 'head.weight' \(tied to 'emb.weight'\).*add \['emb.weight'\]"):
        assert select_parameters(TiedLM(), ["head"]) == ["head.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_parameters(TiedLM(), ["emb", "head"]) == ["emb.weight", "head.bias"]
        assert select_parameters(TiedLM(), ["*"]) == ["emb.weight", "head.bias"]
        assert select_parameters(TiedLM(), ["head"], note_tied=False) == ["head.bias"]


def test_factored_mode_on_a_tied_head_names_the_tie_and_the_alternatives():
    """Was "['head.weight'] of 'head' is not chosen" (with no way to choose it)."""
    from tracin.torch import export_gradients

    model = TiedLM()
    data = (torch.randint(0, 7, (4,)), torch.randint(0, 7, (4,)))
    with pytest.raises(
        ValueError,
        match=r"cannot factor 'head': 'head.weight' is tied to 'emb.weight'.*mode='last_layer' with "
        r"layers=\['head'\].*mode='full' with layers=\['emb.weight', 'head.bias'\]",
    ):
        export_gradients(
            model,
            [(model.state_dict(), 1.0)],
            data,
            nn.CrossEntropyLoss(reduction="none"),
            mode="factored",
            layers=["head"],
            progress=False,
        )


class LoRALinear(nn.Module):
    """A frozen base Linear plus trainable low-rank adapters A, B (as peft's LoRA)."""

    def __init__(self, size, rank=2):
        super().__init__()
        self.base = nn.Linear(size, size).requires_grad_(False)
        self.A, self.B = nn.Linear(size, rank, bias=False), nn.Linear(rank, size, bias=False)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class LoRANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(LoRALinear(6), nn.Tanh(), LoRALinear(6))
        self.head = nn.Linear(6, 3).requires_grad_(False)

    def forward(self, x):
        return self.head(self.enc(x))


ADAPTERS = ["enc.0.A.weight", "enc.0.B.weight", "enc.2.A.weight", "enc.2.B.weight"]


def test_a_pattern_over_trainable_and_frozen_parameters_chooses_the_trainable_ones():
    """Was (review31 s8_frozen.py): layers=['enc'] chose the frozen base weights too, 544 of 672 columns
    the gradients of weights training never changed, without a word."""
    net = LoRANet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_parameters(net, None) == ADAPTERS
        assert select_parameters(net, ["enc"]) == ADAPTERS
        assert select_parameters(net, "enc.*") == ADAPTERS
        assert select_parameters(net, ["enc.0"]) == ADAPTERS[:2]
        # patterns matching frozen parameters only choose them: a frozen layer, a parameter's full name
        assert select_parameters(net, ["enc.0.base"]) == ["enc.0.base.weight", "enc.0.base.bias"]
        assert select_parameters(net, ["enc", "enc.2.base.weight", "head"]) == [
            *ADAPTERS[:2],
            "enc.2.base.weight",
            *ADAPTERS[2:],
            "head.weight",
            "head.bias",
        ]
        assert select_parameters(net, ["*.base.*"]) == [
            "enc.0.base.weight",
            "enc.0.base.bias",
            "enc.2.base.weight",
            "enc.2.base.bias",
        ]


def test_exported_rows_over_a_lora_encoder_are_the_adapters_gradients():
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    net, loss = LoRANet(), nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    g = export_gradients(net, [(net.state_dict(), 1.0)], (x, y), loss, layers=["enc"], progress=False)
    assert [p["name"] for p in g.metadata["params"]] == ADAPTERS
    twin = copy.deepcopy(net).double()
    params = [p for n, p in twin.named_parameters() if n in ADAPTERS]
    want = [
        torch.cat(
            [d.reshape(-1) for d in torch.autograd.grad(loss(twin(x[i : i + 1].double()), y[i : i + 1]).sum(), params)]
        )
        for i in range(5)
    ]
    np.testing.assert_allclose(g.matrices[0], torch.stack(want).numpy(), rtol=1e-5, atol=1e-7)


def test_factored_mode_missing_a_frozen_bias_says_how_to_choose_it():
    from tracin.torch import export_gradients

    net = nn.Sequential(nn.Linear(4, 3))
    net[0].bias.requires_grad_(False)
    data = (torch.randn(4, 4), torch.randint(0, 3, (4,)))
    with pytest.raises(
        ValueError, match=r"\['0.bias'\] of '0' is not chosen \(0.bias: frozen.*add \['0.bias'\] to layers="
    ):
        export_gradients(
            net,
            [(net.state_dict(), 1.0)],
            data,
            nn.CrossEntropyLoss(reduction="none"),
            mode="factored",
            layers=["0"],
            progress=False,
        )
    assert select_parameters(net, ["0", "0.bias"]) == ["0.weight", "0.bias"]


def test_a_pattern_not_matching_a_tied_second_name_does_not_warn_about_it():
    """The tied-weight warning is for patterns that match the second name (head.weight): layers=['head.bias']
    chooses nothing tied, and says nothing (r297 M18: every export of such a model warned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_parameters(TiedLM(), ["head.bias"]) == ["head.bias"]


def test_factored_mode_names_a_tied_bias_as_a_tie():
    """A Linear whose bias is another Linear's (tied): the refusal names the tie, as for a tied weight."""
    from tracin.torch.layers import linear_modules_of

    class TiedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.bias = self.a.bias

    with pytest.raises(ValueError, match=r"cannot factor 'b': 'b.bias' is tied to 'a.bias'"):
        linear_modules_of(TiedBias(), ["b.weight"])
