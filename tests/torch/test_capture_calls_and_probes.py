"""tracin.torch.capture against hand-worked values: what one pass records per call (input, output gradient,
zeros where the loss does not reach, a call by keyword, a call shared by the batch), the probes that size
and classify the passes, and the words and tests its callers build on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch.capture import (
    bytes_of_one,
    capture,
    device_failure,
    fails_without_hooks,
    ids_shared_by_the_batch,
    one_at_a_time,
    stream,
)


def _half_squares(outputs, targets):
    """L_i = sum_j (y_ij - t_ij)^2 / 2: dL_i/dy_i = y_i - t_i."""
    return ((outputs - targets) ** 2).sum(1) / 2


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _linear_expectation(fc: nn.Linear, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    w, b = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
    return x.double().numpy() @ w.T + b - t.double().numpy()


class _ByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(input=x)  # the layer's input by keyword: no positional argument


def test_a_call_by_keyword_is_captured_with_its_input_and_output_gradient():
    torch.manual_seed(0)
    model = _ByKeyword()
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    calls = capture(model, ["fc"], _state(model), _half_squares, x, t)
    (call,) = calls["fc"]
    np.testing.assert_array_equal(call.input.numpy(), x.numpy())
    np.testing.assert_allclose(call.grad.double().numpy(), _linear_expectation(model.fc, x, t), rtol=1e-5, atol=1e-6)


class _SideBranch(nn.Module):
    """`unused` runs but the loss never sees its output."""

    def __init__(self):
        super().__init__()
        self.fc, self.unused = nn.Linear(3, 2), nn.Linear(3, 5)

    def forward(self, x):
        self.unused(x)
        return self.fc(x)


def test_a_call_the_loss_does_not_reach_is_handed_over_with_a_zero_gradient_of_its_output_shape():
    torch.manual_seed(0)
    model = _SideBranch()
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    seen = []
    counts = stream(model, ["fc", "unused"], _state(model), _half_squares, x, t, lambda *a: seen.append(a))
    assert counts == {"fc": 1, "unused": 1}
    assert [(name, index) for name, index, _ in seen] == [("fc", 0), ("unused", 0)]  # reached first, in backward
    unused = seen[1][2]
    assert unused.grad.shape == (4, 5)
    assert not unused.grad.any()
    np.testing.assert_allclose(seen[0][2].grad.double().numpy(), _linear_expectation(model.fc, x, t), rtol=1e-5)


def test_the_hooks_are_removed_after_a_pass_and_after_a_failed_one():
    torch.manual_seed(0)
    model = _SideBranch()
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    capture(model, ["fc", "unused"], _state(model), _half_squares, x, t)
    assert not model.fc._forward_hooks and not model.unused._forward_hooks

    def broken(outputs, targets):
        raise RuntimeError("broken loss")

    with pytest.raises(RuntimeError, match="broken loss"):
        capture(model, ["fc", "unused"], _state(model), broken, x, t)
    assert not model.fc._forward_hooks and not model.unused._forward_hooks
    # and a later pass records each call once
    calls = capture(model, ["fc"], _state(model), _half_squares, x, t)
    assert len(calls["fc"]) == 1


class _Grid(nn.Module):
    """An embedding called on a (1, 2) grid of ids, then on a (1, 3) one: both batch-1 calls in a batch of rows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 2)

    def forward(self, x):
        a = self.emb(torch.zeros(1, 2, dtype=torch.long)).sum(1)  # (1, 2), broadcast over the batch
        b = self.emb(torch.ones(1, 3, dtype=torch.long)).sum(1)
        return x + a + b


def test_expanded_calls_are_named_and_their_input_shape_is_the_one_before_the_first_expansion():
    torch.manual_seed(0)
    model = _Grid()
    x, t = torch.randn(3, 2), torch.randn(3, 2)
    expanded, shapes, seen = set(), {}, []
    stream(model, ["emb"], _state(model), _half_squares, x, t, lambda *a: seen.append(a), expanded, shapes)
    assert expanded == {"emb"}
    assert shapes == {"emb": (1, 2)}
    # each call expanded to the batch: per-example output gradients, each row its own dL_i/dy_i
    assert sorted(tuple(c.input.shape) for _, _, c in seen) == [(3, 2), (3, 3)]
    r = (x + model.emb.weight[0].detach() * 2 + model.emb.weight[1].detach() * 3 - t).double().numpy()
    for _, _, call in seen:
        tokens = call.input.shape[1]
        np.testing.assert_allclose(call.grad.double().numpy(), np.repeat(r[:, None, :], tokens, 1), rtol=1e-5)


def test_a_batch_of_one_row_is_not_taken_for_a_call_shared_by_the_batch():
    torch.manual_seed(0)
    model = _Grid()
    x, t = torch.randn(1, 2), torch.randn(1, 2)
    expanded, shapes = set(), {}
    stream(model, ["emb"], _state(model), _half_squares, x, t, lambda *a: None, expanded, shapes)
    assert expanded == set() and shapes == {}


def test_bytes_of_one_counts_every_calls_input_and_output():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    one = torch.randn(1, 6)
    # layer 0: input 6 + output 4 floats; layer 2: input 4 + output 3 floats; 4 bytes each
    assert bytes_of_one(model, ["0", "2"], _state(model), one) == (6 + 4 + 4 + 3) * 4
    assert bytes_of_one(model.double(), ["0"], _state(model), one.double()) == (6 + 4) * 8


class _Forces(nn.Module):
    """A forward that differentiates inside itself (forces = -dE/dx): fails under no_grad after `fc` ran."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = x.detach().requires_grad_(True)
        energy = self.fc(x).sum()
        return -torch.autograd.grad(energy, x, create_graph=True)[0]


def test_bytes_of_one_of_a_forward_needing_autograd_counts_the_pass_with_gradients_only():
    model = _Forces()
    assert bytes_of_one(model, ["fc"], _state(model), torch.randn(1, 3)) == (3 + 2) * 4


class _RowLoop(nn.Module):
    """Runs `emb` once per row (a loop over the examples): more calls with more rows."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(5, 2), nn.Embedding(5, 2)

    def forward(self, ids):
        rows = [self.emb(ids[i]) for i in range(ids.shape[0])]
        return torch.stack(rows).sum(1) + self.pos(torch.arange(ids.shape[1])).sum(0)


def test_ids_shared_by_the_batch_takes_a_module_called_more_often_with_more_rows_as_shared():
    model = _RowLoop()
    ids = torch.tensor([[1, 2, 3], [0, 4, 1]])
    assert ids_shared_by_the_batch(model, ["emb", "pos"], _state(model), ids) == {"emb", "pos"}
    plain = nn.Embedding(5, 2)
    assert ids_shared_by_the_batch(plain, [""], _state(plain), torch.tensor([1, 2])) == set()


class _FlatThenRows(nn.Module):
    """`emb` on the batch's ids flattened, then once more for each row after the first: one call for one
    example, two calls (of other lengths) for two."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 2)

    def forward(self, ids):
        out = self.emb(ids.flatten()).view(*ids.shape, 2).sum(1)
        extra = [self.emb(ids[i]).sum(0) for i in range(1, ids.shape[0])]
        return out + sum(extra) if extra else out


def test_ids_shared_by_the_batch_takes_a_module_called_a_different_number_of_times_as_shared():
    model = _FlatThenRows()
    ids = torch.tensor([[1, 2, 3], [0, 4, 1]])
    assert ids_shared_by_the_batch(model, ["emb"], _state(model), ids) == {"emb"}


class _OnePosition(nn.Module):
    """A position embedding on the 1-D ids arange(1), added to (rows, 1, d) hidden states."""

    def __init__(self):
        super().__init__()
        self.wpe = nn.Embedding(3, 2)

    def forward(self, x):
        return (x[:, None, :] + self.wpe(torch.arange(1))).sum(1)


def test_a_one_dimensional_call_of_batch_one_is_not_expanded_and_keeps_the_models_shapes():
    torch.manual_seed(0)
    model = _OnePosition()
    x, t = torch.randn(3, 2), torch.randn(3, 2)
    expanded, seen = set(), []
    stream(model, ["wpe"], _state(model), _half_squares, x, t, lambda *a: seen.append(a), expanded)
    assert expanded == set()
    ((_, _, call),) = seen
    assert tuple(call.input.shape) == (1,)
    r = (x + model.wpe.weight[0].detach() - t).double().numpy()
    np.testing.assert_allclose(call.grad.double().numpy(), r.sum(0, keepdims=True), rtol=1e-5, atol=1e-6)


def test_a_forward_that_fails_on_its_own_is_told_from_one_that_runs():
    model = nn.Linear(3, 2)
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    assert fails_without_hooks(model, _state(model), _half_squares, x, t) is False
    assert fails_without_hooks(model, _state(model), _half_squares, torch.randn(4, 5), t) is True


def test_the_words_for_layers_run_one_example_at_a_time_count_the_layers():
    one = one_at_a_time({"fc"}, 4)
    assert one.startswith("layer 'fc' ran on batch-1 tensors in a batch of 4 rows, which the hooks")
    two = one_at_a_time({"b", "a"}, 4)
    assert two.startswith("layers 'a', 'b' ran on batch-1 tensors in a batch of 4 rows")


@pytest.mark.parametrize(
    "error, failed",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"), False),
        (RuntimeError("a CUDA error: later in the words"), False),
        (ValueError("CUDA error: in a user's own ValueError"), False),  # a RuntimeError's text alone
        (KeyError("CUDA error: a key"), False),
    ],
)
def test_device_failure_is_the_devices_own_error_only(error, failed):
    assert device_failure(error) is failed
