"""Optimizer states preconditioner="adam" cannot read are refused in words that fit them: an RMSprop, Adagrad or
Adafactor state (which has eps) is not an Adam-type state, having no exp_avg / exp_avg_sq, and says what to do; a
state of one parameter holds "1 parameter"; a named state (param_names) of another model is called another
model's, naming the names the model lacks, not blamed on one parameter's shape."""

from __future__ import annotations

import copy

import pytest
import torch

from tracin.torch import export_gradients


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


def _refusal(model: torch.nn.Module, state: dict) -> str:
    with pytest.raises(ValueError) as raised:
        export_gradients(
            model, [(model.state_dict(), 0.1, state)], _data(), _loss, progress=False, preconditioner="adam"
        )
    return str(raised.value)


OTHERS = {"RMSprop": "square_avg", "Adagrad": "sum", "Adafactor": "row_var"}


@pytest.mark.parametrize("optimizer", sorted(OTHERS))
def test_another_optimizers_state_with_eps_is_not_blamed_on_eps(optimizer):
    if not hasattr(torch.optim, optimizer):
        pytest.skip(f"torch.optim.{optimizer} is not in this torch")
    model = _mlp(5)
    text = _refusal(model, _stepped(model, getattr(torch.optim, optimizer)(model.parameters(), lr=0.01)))
    assert "is not the state of an Adam-type optimizer: it has no Adam moments exp_avg / exp_avg_sq" in text, text
    assert f"its entries hold {OTHERS[optimizer]}" in text or f", {OTHERS[optimizer]}" in text, text
    assert "param group no betas (its settings:" in text, text
    assert "betas / eps" not in text and "lacks" not in text, text
    assert "export with preconditioner=None (plain TracIn" in text


def test_adams_moments_with_a_group_without_betas_say_so():
    model = _mlp(5)
    state = _stepped(model, torch.optim.Adam(model.parameters()))
    del state["param_groups"][0]["betas"]
    text = _refusal(model, state)
    assert "holds Adam's moments (exp_avg, exp_avg_sq) but a param group has no betas (its settings:" in text, text
    assert "pass the optimizer's state_dict() as it saved it" in text


def test_a_state_of_one_parameter_is_counted_in_the_singular():
    model = _mlp(5)
    text = _refusal(model, _stepped(model, torch.optim.Adam([model[2].weight])))
    assert "holds 1 parameter, the model has 4 (4 trainable)" in text, text


def test_a_named_state_of_a_deeper_model_is_called_another_models():
    model, deeper = _mlp(5), _mlp(5, depth=2)
    text = _refusal(model, _stepped(deeper, torch.optim.AdamW(deeper.named_parameters(), lr=0.01)))
    assert text.endswith(
        "holds 6 parameters, the model has 4 (4 trainable): the state's parameters are not the model's: it names "
        "4.weight, 4.bias, which the model has none of, and its exp_avg of 2.weight has shape (5, 5) where the "
        "model's 2.weight has (3, 5). The state is not this model's: another model's (another depth, width or "
        "vocabulary), or one saved before a parameter was resized (resize_token_embeddings); pass the optimizer "
        "state saved with these weights, or export with preconditioner=None (plain TracIn) without the state"
    ), text
    # the model's own names with another shape (a wider model): the per-parameter message, as before
    wider = _mlp(7)
    text = _refusal(model, _stepped(wider, torch.optim.AdamW(wider.named_parameters(), lr=0.01)))
    assert "the first moment of 0.weight has shape (7, 4), the parameter has (5, 4)" in text, text
