"""export_gradients' refusals and error notes name exactly what they saw: the argument's type, the meta
tensors (three and a count), the batch's shapes as the data's own structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tracin.torch import export_gradients

LOSS = nn.CrossEntropyLoss(reduction="none")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("model", [lambda x: x, "model.pt", None], ids=["function", "path", "None"])
def test_a_model_that_is_not_a_module_is_a_type_error_naming_model_and_its_type(model):
    state = _mlp().state_dict()
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got " + type(model).__name__ + "$"):
        export_gradients(model, [(state, 1.0)], _data(), LOSS, progress=False)


def test_a_meta_model_lists_its_first_three_meta_tensors_and_counts_the_rest():
    state = _mlp().state_dict()
    with torch.device("meta"):
        model = _mlp()  # six parameters on the meta device
    with pytest.raises(ValueError, match=r"meta device \(0\.weight, 0\.bias, 2\.weight and 3 more\):"):
        export_gradients(model, [(state, 1.0)], _data(), LOSS, progress=False)


def test_a_meta_model_with_three_meta_tensors_lists_them_all_without_a_count():
    torch.manual_seed(0)
    state = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4, bias=False)).state_dict()
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match=r"meta device \(0\.weight, 0\.bias, 1\.weight\):"):
        export_gradients(model, [(state, 1.0)], _data(), LOSS, progress=False)


class _Pair(nn.Module):
    """Takes its input as one positional tensor of a tuple, or two."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x, scale=None):
        return self.fc(x if scale is None else x * scale)


def _broken(outputs, targets):
    raise RuntimeError("broken loss")


@pytest.mark.parametrize(
    "inputs, shapes",
    [
        (lambda x: (x,), "((8, 6),)"),  # a tuple of one: Python's own spelling, with its comma
        (lambda x: (x, x[:, :1]), "((8, 6), (8, 1))"),
        (lambda x: {"x": x}, "{'x': (8, 6)}"),
    ],
    ids=["tuple_of_one", "tuple_of_two", "dict"],
)
def test_the_first_rows_note_gives_the_batch_shapes_in_the_datas_structure(inputs, shapes):
    x, y = _data()
    model = _Pair()
    with pytest.raises(RuntimeError) as e:
        export_gradients(model, [(model.state_dict(), 1.0)], (inputs(x), y), _broken, progress=False)
    assert str(e.value) == (
        "broken loss (tracin's check ran the model and loss_fn on rows 0..1 of the first batch of 8; "
        f"the batch's inputs {shapes}, targets (8,))"
    )


class _ShapeError(ValueError):
    """A library's own error type, with a constructor of its own (not message-only)."""

    def __init__(self, rows: int, why: str):
        super().__init__(f"{why} ({rows} rows)")
        self.rows = rows


class _NeedsTwoRows(nn.Module):
    """BatchNorm without running statistics; refuses a batch of one row with its own error type."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 4)

    def forward(self, x):
        if x.shape[0] == 1:
            raise _ShapeError(1, "needs two rows")
        return self.fc(self.norm(x))


def test_a_last_layer_search_error_of_the_models_own_type_passes_unchanged():
    """The BatchNorm note is added to plain RuntimeError / ValueError only: a subclass (its own constructor,
    its own fields) is raised as the model raised it."""
    model = _NeedsTwoRows()
    with pytest.raises(_ShapeError) as e:
        export_gradients(model, [(model.state_dict(), 1.0)], _data(), LOSS, mode="last_layer", progress=False)
    assert str(e.value) == "needs two rows (1 rows)" and e.value.rows == 1


def test_the_first_rows_note_of_a_batch_of_one_row_names_row_0_alone():
    x, y = _data()
    model = _Pair()
    with pytest.raises(RuntimeError) as e:
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), _broken, batch_size=1, progress=False)
    assert str(e.value) == (
        "broken loss (tracin's check ran the model and loss_fn on rows 0..0 of the first batch of 1; "
        "the batch's inputs (1, 6), targets (1,))"
    )


@pytest.mark.parametrize("error", [RuntimeError, IndexError, ValueError])
def test_an_error_on_data_read_as_two_batches_says_how_it_was_read_whatever_its_type(error):
    """data, two pairs of tensors, is read as two batches (tracin.torch.data.TWO_BATCHES): an error of the loss on
    the first of them says so, as one of its own type."""
    x, y = _data()
    model = _Pair()

    def failing(outputs, targets):
        raise error("the loss failed")

    data = ((x[:4], y[:4]), (x[4:], y[4:]))
    with pytest.raises(error) as e:
        export_gradients(model, [(model.state_dict(), 1.0)], data, failing, progress=False)
    assert type(e.value) is error
    said = str(e.value)
    assert said.startswith("the loss failed")
    assert said.endswith(
        "(data, two pairs of tensors, was read as a list of two batches of (inputs, targets), data[0] and data[1] "
        "(PAIR_RULE); for one batch whose inputs and targets are tuples, pass a list of that one batch, "
        "[((x, k), (y, w))])"
    )


class _SecondPassChanges:
    """A re-iterable of one batch whose inputs or targets differ from its third pass on: pass 0 is the export's
    read-ahead (row count, first row), pass 1 checkpoint 0's, pass 2 checkpoint 1's."""

    def __init__(self, changed: str):
        self.changed, self.passes = changed, 0

    def __iter__(self):
        x, y = _data()
        if self.passes >= 2 and self.changed == "inputs":
            x = x + 1
        if self.passes >= 2 and self.changed == "targets":
            y = (y + 1) % 4
        self.passes += 1
        return iter([(x, y)])


@pytest.mark.parametrize("changed", ["inputs", "targets"])
def test_data_changing_between_checkpoints_names_which_of_inputs_and_targets_changed(changed):
    model = _Pair()
    state = model.state_dict()
    with pytest.raises(
        ValueError, match=rf"^checkpoint 1: batch 0 of the data holds other {changed} than on the first"
    ):
        export_gradients(model, [(state, 1.0), (state, 0.5)], _SecondPassChanges(changed), LOSS, progress=False)
