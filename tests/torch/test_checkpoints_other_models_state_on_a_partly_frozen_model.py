"""An unnamed Adam state of another model, given with a partly frozen model (a LoRA-like fine-tune, whose
optimizer holds only the trainable parameters), is refused naming the first trainable parameter whose shape
the state's moments there do not have, in the order of the trainable parameters, not a frozen parameter the
optimizer never held."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _frozen_first(*widths: int, last_bias: bool = True) -> torch.nn.Sequential:
    """A frozen Linear(3, 4), then trainable layers of the given widths ending at 2 classes."""
    layers: list = [torch.nn.Linear(3, 4), torch.nn.ReLU()]
    sizes = [4, *widths, 2]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        layers += [torch.nn.Linear(a, b, bias=last_bias or not last)] + ([] if last else [torch.nn.ReLU()])
    model = torch.nn.Sequential(*layers)
    model[0].requires_grad_(False)
    return model


def _adam_state(model, x, y) -> dict:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x), y).mean().backward()
        opt.step()
    return opt.state_dict()


def test_another_models_state_names_a_trainable_parameter_of_a_partly_frozen_model():
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    model = _frozen_first()  # 0.weight (4, 3), 0.bias (4,) frozen; 2.weight (2, 4), 2.bias (2,) trainable
    other = _adam_state(_frozen_first(5, last_bias=False), x, y)  # trainable (5, 4), (5,), (2, 5): 3 of them
    with pytest.raises(ValueError) as info:
        export_gradients(
            model, [(model.state_dict(), 0.1, other)], (x, y), _loss, preconditioner="adam", progress=False
        )
    message = str(info.value)
    assert "holds 3 parameters, the model has 4 (2 trainable)" in message
    assert "at position 0 (in the order of the model's trainable parameters" in message
    assert "the model's 2.weight has shape (2, 4), while the state's exp_avg there has shape (5, 4)" in message
    assert "0.weight" not in message  # frozen: never in the optimizer
    assert "The state is not this model's" in message


def test_a_fully_trainable_model_still_compares_in_named_parameters_order():
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    model = _frozen_first()
    model.requires_grad_(True)
    other_model = _frozen_first(4, 4)
    other_model.requires_grad_(True)
    other = _adam_state(other_model, x, y)  # (4, 3), (4,), (4, 4), (4,), (4, 4), (4,), (2, 4), (2,)
    with pytest.raises(ValueError) as info:
        export_gradients(
            model, [(model.state_dict(), 0.1, other)], (x, y), _loss, preconditioner="adam", progress=False
        )
    message = str(info.value)
    assert "at position 2 (in model.named_parameters() order) the model's 2.weight has shape (2, 4)" in message
    assert "exp_avg there has shape (4, 4)" in message
