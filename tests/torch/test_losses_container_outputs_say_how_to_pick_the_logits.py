"""A model returning more than its logits (a tuple (logits, features), a dict) hands that whole container
to loss_fn; where the loss fails on it with a TypeError (nn.CrossEntropyLoss: "must be Tensor, not tuple"),
the error says what the model returned and how to pick the logits in loss_fn."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import tracin.torch

LOSS = nn.CrossEntropyLoss(reduction="none")


class _Net(nn.Module):
    def __init__(self, returns: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc, self.returns = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 3), returns

    def forward(self, x: torch.Tensor):
        features = torch.relu(self.conv(x)).flatten(1)
        logits = self.fc(features)
        if self.returns == "tuple":
            return logits, features
        if self.returns == "dict":
            return {"logits": logits, "features": features}
        return logits


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _export(model: nn.Module, loss_fn) -> np.ndarray:
    g = tracin.torch.export_gradients(model, [(model.state_dict(), 0.1)], _data(), loss_fn, progress=False)
    return np.asarray(g.matrices[0])


@pytest.mark.parametrize(("returns", "pick"), [("tuple", "outputs[0]"), ("dict", "outputs['logits']")])
def test_a_container_of_outputs_is_named_with_how_to_pick_the_logits(returns: str, pick: str) -> None:
    with pytest.raises(TypeError) as e:
        _export(_Net(returns), LOSS)
    message = str(e.value)
    assert "must be Tensor" in message  # torch's own words kept
    assert f"the model returned a {returns} of 2" in message
    assert "(8, 3)" in message or "(2, 3)" in message  # the logits' shape, on the rows the loss ran on
    assert "lambda outputs, targets: loss(outputs" in message and pick in message
    # the advice works: the same rows as a model returning its logits alone
    picked = (lambda o, t: LOSS(o[0], t)) if returns == "tuple" else (lambda o, t: LOSS(o["logits"], t))
    np.testing.assert_array_equal(_export(_Net(returns), picked), _export(_Net("logits"), LOSS))


def test_a_type_error_on_plain_tensor_outputs_is_left_as_it_was() -> None:
    def wrong(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return LOSS(outputs, targets.tolist())  # a loss bug of its own: no outputs container to name

    with pytest.raises(TypeError) as e:
        _export(_Net("logits"), wrong)
    assert "the model returned" not in str(e.value)
