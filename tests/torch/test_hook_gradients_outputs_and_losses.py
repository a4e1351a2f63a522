"""What a hooked pass keeps of the model's outputs and the per-example losses (hook_gradients.output_leaves,
model_outputs, recording, recorded_losses, HookGradients.outputs), against hand-built trees and tensors."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from torch import nn

from tracin.torch.hook_gradients import (
    COMPARED_ELEMENTS,
    HookGradients,
    model_outputs,
    output_leaves,
    recorded_losses,
    recording,
)
from tracin.torch.losses import loss_mismatch

CE = nn.CrossEntropyLoss(reduction="none")


def test_output_leaves_are_the_floating_tensors_of_any_mapping_and_sequence_depth_first_detached():
    """Integer tensors (token ids, lengths) and non-tensors are left out; a Mapping that is not a dict (a read-only
    view, as Hugging Face's ModelOutput is an OrderedDict) is walked in its own order."""
    logits = torch.randn(2, 3, requires_grad=True)
    h1, h2 = torch.randn(2, 4), torch.randn(2, 5, dtype=torch.float64)
    tree = types.MappingProxyType(
        {"logits": logits * 2, "ids": torch.zeros(2, 3, dtype=torch.long), "past": (h1, [h2, "text"]), "n": 3}
    )
    leaves = output_leaves(tree)
    assert [t.shape for t in leaves] == [(2, 3), (2, 4), (2, 5)]
    assert torch.equal(leaves[0], logits.detach() * 2) and leaves[1] is not h1 and torch.equal(leaves[1], h1)
    assert torch.equal(leaves[2], h2) and not any(t.requires_grad for t in leaves)
    assert output_leaves(torch.arange(3)) == [] and output_leaves("logits") == []


class _Wide(nn.Module):
    """Each example's output is `width` copies of its one input value."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.expand(len(x), self.width), x[:, 0]


@pytest.mark.parametrize("rows", [1, 2])
def test_model_outputs_keep_up_to_compared_elements_a_row_and_unhook_on_exit(rows):
    """rows x COMPARED_ELEMENTS elements are kept as they are, one more is replaced by an empty (rows, 0) tensor;
    other outputs of the same call are kept; once the context is closed the model runs unhooked."""
    x = torch.ones(rows, 1)
    model = _Wide(COMPARED_ELEMENTS)
    with model_outputs(model, rows) as seen:
        model(x)
        model.width += 1
        model(x)
    assert [[tuple(t.shape) for t in call] for call in seen] == [
        [(rows, COMPARED_ELEMENTS), (rows,)],
        [(rows, 0), (rows,)],
    ]
    assert not model._forward_hooks
    model(x)
    assert len(seen) == 2


class _ThreeArgLoss(nn.Module):
    def forward(self, outputs, targets, weights):
        return (CE(outputs, targets) * weights).sum()


def test_a_recorded_loss_module_keeps_its_forwards_signature_for_the_mismatch_message():
    """recording wraps a loss module's forward (not the module): a loss_fn that cannot take (outputs, targets) is
    named with its forward's signature, as without the recording."""
    loss = _ThreeArgLoss()
    recorded = recording(loss, [])
    assert list(inspect.signature(recorded).parameters) == ["outputs", "targets", "weights"]
    with pytest.raises(TypeError) as raised:
        recorded(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    message = loss_mismatch(recorded, raised.value)
    assert message is not None and "_ThreeArgLoss.forward(outputs, targets, weights) cannot take them" in message


def test_recorded_losses_are_one_calls_batch_or_one_call_per_example_and_nothing_else():
    """One (rows,) call, or `rows` calls of (1,) (one example at a time), concatenated; anything else (another
    count or shape, a non-tensor) gives None. One call's losses are a copy: the loss_fn's tensor changed in place
    later does not change them."""
    batch = torch.tensor([1.0, 2.0, 3.0], requires_grad=True) * 1
    got = recorded_losses([batch], 3)
    assert torch.equal(got, torch.tensor([1.0, 2.0, 3.0])) and not got.requires_grad
    with torch.no_grad():
        batch.add_(10)
    assert torch.equal(got, torch.tensor([1.0, 2.0, 3.0]))
    ones = [torch.tensor([float(i)]) for i in range(3)]
    assert torch.equal(recorded_losses(ones, 3), torch.tensor([0.0, 1.0, 2.0]))
    assert recorded_losses(ones[:2], 3) is None  # two calls of one example: not 3 rows
    assert recorded_losses([torch.zeros(3, 1)], 3) is None and recorded_losses([torch.zeros(2)], 3) is None
    assert recorded_losses([1.0], 1) is None and recorded_losses([], 1) is None
    assert recorded_losses([torch.zeros(1), 2.0], 2) is None


def test_the_outputs_of_a_pass_are_kept_only_when_the_model_ran_once():
    """HookGradients.outputs: the detached floating outputs of the one forward of the pass; None when the model
    ran twice in it (here a loss_fn calling it again), its outputs then not those of one batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    columns = {"0.weight": (0, 12), "0.bias": (12, 3)}
    hooks = HookGradients(model, list(columns), CE)
    hooks(model.state_dict(), x, y, torch.empty(5, 15, dtype=torch.float64), columns)
    assert len(hooks.outputs) == 1 and torch.equal(hooks.outputs[0], model(x).detach())
    twice = HookGradients(model, list(columns), lambda out, t: CE(out, t) + 0.0 * model(x).sum(1))
    twice(model.state_dict(), x, y, torch.empty(5, 15, dtype=torch.float64), columns)
    assert twice.outputs is None
