"""A run trained with SGD, then AdamW, gives checkpoints with and without an optimizer state; with
preconditioner="adam" the refusal says how to export such a run (two calls whose results add up), and
the advice holds: the parts' self-influence add up to that of all the checkpoints (plain rows here)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import tracin
import tracin.torch

LOSS = nn.CrossEntropyLoss(reduction="none")


def _run() -> tuple[nn.Module, list, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = nn.Linear(4, 3)
    checkpoints = []
    for optimizer, lr in ((torch.optim.SGD(model.parameters(), lr=0.1), 0.1),):
        for _ in range(2):
            optimizer.zero_grad()
            LOSS(model(x), y).mean().backward()
            optimizer.step()
            checkpoints.append(({k: v.clone() for k, v in model.state_dict().items()}, lr))
    adam = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    for _ in range(2):
        adam.zero_grad()
        LOSS(model(x), y).mean().backward()
        adam.step()
        checkpoints.append(
            ({k: v.clone() for k, v in model.state_dict().items()}, 1e-2, copy.deepcopy(adam.state_dict()))
        )
    return model, checkpoints, x, y


def test_sgd_then_adam_checkpoints_are_told_to_export_in_two_parts() -> None:
    model, checkpoints, x, y = _run()
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state") as e:
        tracin.torch.export_gradients(model, checkpoints, (x, y), LOSS, preconditioner="adam", progress=False)
    assert "2 of the 4 checkpoints carry one" in str(e.value)
    assert "in a call of their own with preconditioner=None" in str(e.value)
    # the advice's arithmetic: parts over disjoint checkpoints add up to the whole
    whole = tracin.torch.export_gradients(model, [c[:2] for c in checkpoints], (x, y), LOSS, progress=False)
    a = tracin.torch.export_gradients(model, checkpoints[:2], (x, y), LOSS, progress=False)
    b = tracin.torch.export_gradients(model, [c[:2] for c in checkpoints[2:]], (x, y), LOSS, progress=False)
    np.testing.assert_allclose(
        tracin.self_influence(a) + tracin.self_influence(b), tracin.self_influence(whole), rtol=1e-5
    )


def test_every_checkpoint_without_a_state_gets_no_split_advice() -> None:
    model, checkpoints, x, y = _run()
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state") as e:
        tracin.torch.export_gradients(
            model, [c[:2] for c in checkpoints], (x, y), LOSS, preconditioner="adam", progress=False
        )
    assert "carry one" not in str(e.value)
