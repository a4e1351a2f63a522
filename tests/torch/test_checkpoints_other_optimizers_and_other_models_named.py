"""Optimizer states preconditioner="adam" cannot read are refused in words that fit them: an RMSprop, Adagrad or
Adafactor state (which has eps) is not an Adam-type state, having no exp_avg / exp_avg_sq, and says what to do; a
state of one parameter holds "1 parameter"; a named state (param_names) of another model is called another
model's, naming the names the model lacks, not blamed on one parameter's shape."""

from __future__ import annotations

import pytest
import torch
from test_checkpoints_refusals_say_what_to_do import _data, _loss, _mlp, _stepped

from tracin.torch import export_gradients


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


def _adafactor_state(model: torch.nn.Module, beta1: bool) -> dict:
    """A transformers Adafactor(beta1=0.9) state over 1-D parameters, written out: each entry has step, exp_avg,
    exp_avg_sq and RMS (its factored row / column moments are kept only for parameters of 2 or more dims)."""
    params = list(model.parameters())
    group = {"lr": None, "eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "weight_decay": 0.0}
    group.update(scale_parameter=True, relative_step=True, warmup_init=False, params=list(range(len(params))))
    if beta1:
        group["beta1"] = 0.9
    entry = {"step": torch.tensor(2.0), "exp_avg": None, "exp_avg_sq": None, "RMS": torch.tensor(1.0)}
    state = {
        i: {**entry, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.ones_like(p)} for i, p in enumerate(params)
    }
    return {"state": state, "param_groups": [group]}


@pytest.mark.parametrize("beta1", [True, False])
def test_an_adafactor_state_with_exp_avg_is_not_told_it_lost_adams_betas(beta1):
    model = _mlp(5)
    text = _refusal(model, _adafactor_state(model, beta1))
    assert "is not the state of an Adam-type optimizer: its entries hold RMS, exp_avg, exp_avg_sq, step" in text, text
    assert "param group no betas (its settings:" in text, text
    assert "holds Adam's moments" not in text and "as it saved it" not in text, text
    assert "export with preconditioner=None (plain TracIn" in text


def test_adams_moments_with_a_beta1_group_are_not_adams():
    model = _mlp(5)
    state = _stepped(model, torch.optim.Adam(model.parameters()))
    group = state["param_groups"][0]
    group["beta1"] = group.pop("betas")[0]
    text = _refusal(model, state)
    assert "is not the state of an Adam-type optimizer: its entries hold exp_avg, exp_avg_sq, step" in text, text
    assert "holds Adam's moments" not in text, text


def test_a_transformers_adafactor_with_beta1_over_biases_is_not_adam():
    optimization = pytest.importorskip("transformers.optimization")
    model = _mlp(5)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    state = _stepped(model, optimization.Adafactor(biases, beta1=0.9))
    assert all({"exp_avg", "exp_avg_sq", "RMS"} <= set(e) for e in state["state"].values()), state["state"]
    text = _refusal(model, state)
    assert "is not the state of an Adam-type optimizer" in text and "RMS" in text, text
    assert "holds Adam's moments" not in text, text


def test_an_rmsprop_refusal_does_not_say_only_adam_keeps_a_second_moment():
    model = _mlp(5)
    text = _refusal(model, _stepped(model, torch.optim.RMSprop(model.parameters(), lr=0.01)))
    assert "square_avg" in text, text
    assert "only Adam / AdamW keep" not in text, text
    assert "the preconditioners read only Adam's exp_avg_sq with its betas" in text, text
