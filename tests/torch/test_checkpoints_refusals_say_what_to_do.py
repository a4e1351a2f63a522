"""The refusals of optimizer states the preconditioners cannot read say what to do next (export with
preconditioner=None for plain TracIn, or pass a plain Adam / AdamW state), and an unnamed state of another
model (other parameter count and shapes) is called another model's, naming the first shape that differs,
not blamed on missing parameter names. The plain-TracIn way out is checked against float64 NumPy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tracin.torch import export_gradients

WAY_OUT = r"export with preconditioner=None \(plain TracIn"


def _mlp(hidden: int, depth: int = 1) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(4, hidden)]
    for _ in range(depth - 1):
        layers += [torch.nn.Tanh(), torch.nn.Linear(hidden, hidden)]
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(hidden, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _stepped(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    x, y = _data()
    opt.zero_grad()
    _loss(model(x), y).sum().backward()
    opt.step()
    return copy.deepcopy(opt.state_dict())


def _export(model: torch.nn.Module, state: dict, **kw):
    return export_gradients(model, [(model.state_dict(), 0.1, state)], _data(), _loss, progress=False, **kw)


def test_an_sgd_state_is_refused_with_the_way_out():
    model = _mlp(5)
    state = _stepped(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match=r"is not the state of an Adam-type optimizer") as raised:
        _export(model, state, preconditioner="adam")
    text = str(raised.value)
    assert "momentum" in text  # what the group holds instead of betas / eps
    assert "preconditioner=None (plain TracIn" in text
    assert "(weights, learning_rate) without the optimizer state" in text
    assert "amsgrad=False and maximize=False" in text


@pytest.mark.parametrize("setting", [{"amsgrad": True}, {"maximize": True}])
def test_an_amsgrad_or_maximize_state_is_refused_with_the_way_out(setting):
    model = _mlp(5)
    state = _stepped(model, torch.optim.AdamW(model.parameters(), lr=0.01, **setting))
    (key,) = setting
    with pytest.raises(ValueError, match=rf"was trained with {key}=True .*{WAY_OUT}"):
        _export(model, state, preconditioner="adam")
    with pytest.raises(ValueError, match=rf"was trained with {key}=True .*{WAY_OUT}"):
        _export(model, state, preconditioner="adam_update")
    _check_the_way_out(model)


def _check_the_way_out(model: torch.nn.Module) -> None:
    """preconditioner=None and (weights, learning_rate) checkpoints, as the refusal advises, export the
    per-example gradients weighted by the rate: checked against float64 gradients of the loss written out
    by hand (tanh MLP, softmax cross entropy)."""
    got = export_gradients(model, [(model.state_dict(), 0.1)], _data(), _loss, progress=False)
    assert list(got.weights) == [pytest.approx(0.1)]
    rows = np.asarray(got.matrices[0], dtype=np.float64)
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in model.parameters())
    x, y = (t.numpy() for t in _data())
    x = x.astype(np.float64)
    h = np.tanh(x @ w1.T + b1)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p - np.eye(3)[y]
    dh = (dz @ w2) * (1 - h**2)
    want = np.concatenate(
        [
            np.einsum("ni,nj->nij", dh, x).reshape(6, -1),
            dh,
            np.einsum("ni,nj->nij", dz, h).reshape(6, -1),
            dz,
        ],
        axis=1,
    )
    np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-7)


def test_an_unnamed_state_of_a_deeper_model_is_called_another_models():
    """6 parameters against the model's 4, with a (5, 5) weight the model has none of: the parameters do
    not match whatever their names, and the message names the first position whose shape differs."""
    model, deeper = _mlp(5), _mlp(5, depth=2)
    state = _stepped(deeper, torch.optim.AdamW(deeper.parameters(), lr=0.01))
    with pytest.raises(ValueError) as raised:
        _export(model, state, preconditioner="adam")
    text = str(raised.value)
    assert "holds 6 parameters, the model has 4 (4 trainable)" in text
    assert "the state's parameters do not match the model's" in text
    assert "at position 2 (in model.named_parameters() order) the model's 2.weight has shape (3, 5)" in text
    assert "exp_avg there has shape (5, 5) (of a shape none of the model's parameters has)" in text
    assert "The state is not this model's" in text
    assert "Build the optimizer over named parameters" not in text  # names would not make it fit
    assert "preconditioner=None (plain TracIn" in text
    # every shape a state holds being one of the model's (an optimizer over its head only), names would let
    # it be matched: that message stays the one asking for them
    head_only = _stepped(model, torch.optim.Adam(model[2].parameters()))
    with pytest.raises(ValueError) as raised:
        _export(model, head_only, preconditioner="adam")
    text = str(raised.value)
    assert "holds 2 parameters, the model has 4 (4 trainable): without parameter names" in text
    assert "do not match the model's" not in text


def test_an_unnamed_state_of_a_smaller_model_names_a_shape_the_model_lacks():
    """A 2-parameter state of another width: (7, 4) at position 0, which the (5, 4)-first model has none of."""
    model = _mlp(5)
    other = torch.nn.Linear(4, 7)
    state = _stepped(torch.nn.Sequential(other, torch.nn.Linear(7, 3)), torch.optim.Adam(other.parameters()))
    with pytest.raises(ValueError) as raised:
        _export(model, state, preconditioner="adam")
    text = str(raised.value)
    assert "holds 2 parameters, the model has 4 (4 trainable): the state's parameters do not match" in text
    assert "at position 0 (in model.named_parameters() order) the model's 0.weight has shape (5, 4)" in text
    assert "has shape (7, 4) (of a shape none of the model's parameters has)" in text
