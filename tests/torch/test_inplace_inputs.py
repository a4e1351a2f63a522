"""Models and losses that change the batch in place (x -= mean in a forward, labels -= 1 in a loss_fn), and the
one-row failures the first-rows check explains (an output squeezed to 0-d, BatchNorm without running statistics)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tracin
from tracin.torch import export_gradients

LR = 0.1
LOSS = nn.CrossEntropyLoss(reduction="none")


class NormalizingNet(nn.Module):
    """Normalizes its input in place before two Linear layers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((6,), 0.5))
        self.register_buffer("std", torch.full((6,), 2.0))
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        x -= self.mean
        x /= self.std
        return self.b(torch.tanh(self.a(x)))


def _checkpoints(model: nn.Module) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Two states of `model`: its own and one with every parameter moved by a seeded Gaussian step."""
    g = torch.Generator().manual_seed(5)
    moved = {
        k: v + 0.3 * torch.randn(v.shape, generator=g) if k in dict(model.named_parameters()) else v.clone()
        for k, v in model.state_dict().items()
    }
    return [({k: v.clone() for k, v in model.state_dict().items()}, LR), (moved, LR)]


def _rows64(model: nn.Module, checkpoints, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> list[np.ndarray]:
    """Per-example float64 autograd gradients w.r.t. `names`, each example a fresh copy of its row."""
    out = []
    for state, _ in checkpoints:
        m = copy.deepcopy(model).double().eval()
        m.load_state_dict({k: v.double() for k, v in state.items()})
        params = dict(m.named_parameters())
        rows = []
        for i in range(len(y)):
            loss = LOSS(m(x[i : i + 1].double().clone()), y[i : i + 1]).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
        out.append(np.stack(rows))
    return out


@pytest.mark.parametrize("mode", ["full", "last_layer"])
@pytest.mark.parametrize("loader", [False, True])
def test_forward_normalizing_its_input_in_place(mode: str, loader: bool) -> None:
    torch.manual_seed(0)
    model = NormalizingNet()
    checkpoints = _checkpoints(model)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    x0 = x.clone()
    data = DataLoader(TensorDataset(x, y), batch_size=8) if loader else (x, y)
    g = export_gradients(model, checkpoints, data, LOSS, mode=mode, progress=False)
    assert torch.equal(x, x0)
    names = [p["name"] for p in g.metadata["params"]]
    assert names == (["b.weight", "b.bias"] if mode == "last_layer" else ["a.weight", "a.bias", "b.weight", "b.bias"])
    want = _rows64(model, checkpoints, x0, y, names)
    if mode == "full":
        for got, rows in zip(g.matrices, want, strict=True):
            np.testing.assert_allclose(got, rows, rtol=1e-5, atol=1e-6 * np.abs(rows).max())
    else:
        scores = sum(LR * rows @ rows.T for rows in want)
        np.testing.assert_allclose(tracin.scores(g, g), scores, rtol=1e-5, atol=1e-6 * np.abs(scores).max())


def test_loss_fn_changing_targets_in_place_is_refused_and_undone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.randint(1, 4, (12,))  # 1-based labels
    y0 = y.clone()

    def shifting(out, labels):
        labels -= 1
        return LOSS(out, labels)

    with pytest.raises(ValueError, match=r"loss_fn changes the batch's targets in place .*labels = labels - 1"):
        export_gradients(model, _checkpoints(model), (x, y), shifting, progress=False)
    assert torch.equal(y, y0)


def test_loss_fn_changing_targets_in_place_to_the_same_values_passes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    checkpoints = _checkpoints(model)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))

    def clamping(out, labels):
        labels.clamp_(0, 2)
        return LOSS(out, labels)

    got = export_gradients(model, checkpoints, (x, y), clamping, progress=False)
    want = export_gradients(model, checkpoints, (x, y), LOSS, progress=False)
    for a, b in zip(got.matrices, want.matrices, strict=True):
        np.testing.assert_array_equal(a, b)


class Squeezing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x).squeeze()  # (batch, 3); (3,) on one row


def test_output_squeezed_at_one_row_is_explained_in_full_mode() -> None:
    torch.manual_seed(0)
    model = Squeezing()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match=r"shape \(3,\) on one row and \(2, 3\) on two.*\.squeeze\(-1\)"):
        export_gradients(model, _checkpoints(model), (x, y), LOSS, mode="full", progress=False)


@pytest.mark.parametrize("layers", [None, ["3"]])
def test_batchnorm_without_running_statistics_is_named_with_the_remedy(layers: list[str] | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError) as raised, pytest.warns(RuntimeWarning, match="mix the examples"):
        export_gradients(model, _checkpoints(model), (x, y), LOSS, layers=layers, progress=False)
    message = str(raised.value)
    assert "'1' (BatchNorm without running statistics)" in message
    assert "whatever layers= chooses" in message and "track_running_stats=True" in message


def test_batchnorm_without_running_statistics_is_named_in_last_layer_mode_too() -> None:
    """fx281 left mode='last_layer' with torch's bare 'Expected more than 1 value per channel': looking for
    the last nn.Linear runs the model on the first row alone, and the error now names the BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError) as raised:
        export_gradients(model, _checkpoints(model), (x, y), LOSS, mode="last_layer", progress=False)
    message = str(raised.value)
    assert "Expected more than 1 value per channel" in message and "the last nn.Linear on the first row" in message
    assert "'1' (BatchNorm without running statistics)" in message and "track_running_stats=True" in message


class _ShapeError(ValueError):
    """A user's error type whose constructor takes two arguments."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(f"got {got} features, expected {expected}")


class _Checked(nn.Module):
    """BatchNorm without running statistics, then a Linear; raises _ShapeError on a wrong width."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[-1] != 4:
            raise _ShapeError(x.shape[-1], 4)
        return self.fc(self.bn(x))


def test_last_layer_mode_leaves_the_batchnorm_note_off_failures_of_any_batch_size() -> None:
    """review294 F1: a wrong input width (fails on every batch size) was blamed on the BatchNorm, and a
    user's error type whose constructor takes other arguments became a TypeError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError) as raised:
        export_gradients(model, _checkpoints(model), (x, y), LOSS, mode="last_layer", progress=False)
    assert "BatchNorm" not in str(raised.value) and "mat1 and mat2" in str(raised.value)
    checked = _Checked()
    with pytest.raises(_ShapeError, match="^got 5 features, expected 4$"):
        export_gradients(checked, _checkpoints(checked), (x, y), LOSS, mode="last_layer", progress=False)


def test_loss_fn_changing_targets_past_the_checked_rows_is_refused_and_undone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    y[5, 1] = float("nan")  # a missing value, past the rows the first-rows check runs on
    y0 = y.clone()

    def masked(out, target):
        seen = ~target.isnan()
        target.nan_to_num_(0.0)
        return ((out - target) ** 2 * seen).sum(1)

    with pytest.raises(ValueError, match=r"loss_fn changes the batch's targets in place"):
        export_gradients(model, _checkpoints(model), (x, y), masked, progress=False)
    assert torch.equal(y.isnan(), y0.isnan()) and torch.equal(y.nan_to_num(), y0.nan_to_num())


def test_one_tensor_given_twice_is_one_copy() -> None:
    from tracin.torch.data import call_model

    x = torch.randn(3, 4)
    seen = []
    call_model(lambda a, b: seen.append(a is b and a is not x), (x, x))
    assert seen == [True]


class KeywordNormalizingNet(NormalizingNet):
    """NormalizingNet taking its input as a keyword, from a dict of inputs."""

    def forward(self, *, x):
        return super().forward(x)


class PairNormalizingNet(NormalizingNet):
    """NormalizingNet taking (unused, x), from a tuple of inputs: the tensor normalized in place is the second."""

    def forward(self, unused, x):
        return super().forward(x)


@pytest.mark.parametrize("inputs", ["dict", "tuple"])
def test_forward_normalizing_its_input_in_place_from_a_dict_or_a_tuple(inputs: str) -> None:
    """r288: the copies reach the tensors inside a dict (model(**x)) and past a tuple's first item (model(*x))."""
    torch.manual_seed(0)
    plain = NormalizingNet()
    model = KeywordNormalizingNet() if inputs == "dict" else PairNormalizingNet()
    model.load_state_dict(plain.state_dict())
    checkpoints = _checkpoints(model)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    x0 = x.clone()
    given = {"x": x} if inputs == "dict" else (torch.zeros(20, 1), x)
    g = export_gradients(model, checkpoints, (given, y), LOSS, progress=False)
    assert torch.equal(x, x0)
    names = [p["name"] for p in g.metadata["params"]]
    for got, rows in zip(g.matrices, _rows64(plain, checkpoints, x0, y, names), strict=True):
        np.testing.assert_allclose(got, rows, rtol=1e-5, atol=1e-6 * np.abs(rows).max())


def test_loss_fn_changing_targets_in_place_and_failing_in_the_check_is_refused_and_undone() -> None:
    """r288: 0-based labels shifted in place (labels -= 1) fail inside the first-rows check (target -1): the
    error names the in-place change, from torch's IndexError, and the labels are put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.zeros(12, dtype=torch.long)
    y0 = y.clone()

    def shifting(out, labels):
        labels -= 1
        return LOSS(out, labels)

    with pytest.raises(ValueError, match=r"loss_fn changes the batch's targets in place") as raised:
        export_gradients(model, _checkpoints(model), (x, y), shifting, progress=False)
    assert isinstance(raised.value.__cause__, IndexError)
    assert torch.equal(y, y0)


def test_batchnorm2d_without_running_statistics_is_named_too() -> None:
    """r288: every BatchNorm kind is named (a CNN's BatchNorm2d on 1x1 maps), not BatchNorm1d alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)
    )
    x, y = torch.randn(8, 1, 3, 3), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError) as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the check's warning that the forward mixes the examples
        export_gradients(model, _checkpoints(model), (x, y), LOSS, progress=False)
    message = str(raised.value)
    assert "'1' (BatchNorm without running statistics)" in message and "track_running_stats=True" in message


def test_loss_fn_changing_targets_with_nans_in_place_to_the_same_values_passes() -> None:
    """r288: an in-place change leaving targets as they were passes with NaN among them (a missing value kept
    by clamp_): NaN is equal to NaN there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    checkpoints = _checkpoints(model)
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    y[0, 1] = y[5, 2] = float("nan")

    def clamping(out, target):
        target.clamp_(-10.0, 10.0)
        return ((out - target.nan_to_num()) ** 2).sum(1)

    got = export_gradients(model, checkpoints, (x, y), clamping, progress=False)
    want = export_gradients(
        model, checkpoints, (x, y), lambda out, t: ((out - t.nan_to_num()) ** 2).sum(1), progress=False
    )
    for a, b in zip(got.matrices, want.matrices, strict=True):
        np.testing.assert_array_equal(a, b)


def test_loss_fn_changing_targets_past_the_checked_rows_and_failing_is_refused_and_undone() -> None:
    """r288: a loss_fn that changes rows past the first-rows check's in place and then fails on them (a marker
    99 rewritten as -1, out of bounds) names the in-place change, from torch's error, with the labels put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    y[5] = 99
    y0 = y.clone()

    def remarking(out, labels):
        labels[labels == 99] = -1
        return LOSS(out, labels)

    with pytest.raises(ValueError, match=r"loss_fn changes the batch's targets in place") as raised:
        export_gradients(model, _checkpoints(model), (x, y), remarking, progress=False)
    assert raised.value.__cause__ is not None
    assert torch.equal(y, y0)
