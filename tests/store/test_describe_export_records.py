"""describe() / `tracin info STORE` show what the export recorded besides the metadata keys: the preconditioner
(kind, and that Adam state was used), the projection (kind, dim, seed) and the parameters of the rows and their
modules (counts, the first few names); a store without those records (written from NumPy, or by hand) says nothing
of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from tracin.cli import main
from tracin.store import describe
from tracin.torch import export_gradients


def _info(path, capsys) -> dict[str, str]:
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.strip() == describe(path)  # `tracin info` prints describe()
    return {line[:16].strip(): line[16:] for line in text.splitlines()}


@pytest.fixture
def data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss(reduction="none")
    return model, x, y, loss


def test_an_adam_preconditioned_projected_store(data, tmp_path, capsys):
    model, x, y, loss = data
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss(model(x), y).mean().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    export_gradients(
        model,
        [(model.state_dict(), 0.1, tmp_path / "opt.pt")],
        (x, y),
        loss,
        store=tmp_path / "s",
        preconditioner="adam",
        projection=tracin.Projection(5, seed=3),
        progress=False,
    )
    shown = _info(tmp_path / "s", capsys)
    assert shown["preconditioner"] == (
        "adam (gradients divided by Adam's sqrt(v) + eps; Adam state used: each checkpoint's optimizer state, "
        "given as a file)"
    )
    assert shown["projection"] == "rademacher to 5 dims, seed 3"
    assert shown["parameters"] == "6: 0.weight, 0.bias, 2.weight, 2.bias, ... and 2 more"
    assert shown["modules"] == "3: 0, 2, 4"
    assert list(shown)[-1] == "metadata"  # the keys' line last, as before


def test_a_plain_store_of_chosen_layers(data, tmp_path, capsys):
    model, x, y, loss = data
    export_gradients(
        model, [(model.state_dict(), 0.1)], (x, y), loss, layers=["4"], store=tmp_path / "s", progress=False
    )
    shown = _info(tmp_path / "s", capsys)
    assert shown["preconditioner"] == "none (no optimizer state used)"
    assert shown["projection"] == "none (unprojected rows)"
    assert shown["parameters"] == "2: 4.weight, 4.bias"
    assert shown["modules"] == "1: 4 (selected by the layers= patterns 4)"


@pytest.mark.parametrize(
    "metadata",
    [
        None,  # written from NumPy
        {"layers": 1, "params": "fc.weight", "projection": {"type": "tracin.Projection"}, "preconditioner": 3},
        {"params": [{"shape": [2]}], "projection": {"type": "other", "kind": "x", "dim": 2, "seed": 0}},
    ],
)
def test_a_store_without_those_records_says_nothing_of_them(tmp_path, capsys, metadata):
    w = tracin.GradientStore.create(tmp_path / "s", 2, [2], metadata=metadata)
    w.write(0, 0, np.ones((2, 2), np.float32))
    w.finalize()
    shown = _info(tmp_path / "s", capsys)
    assert not {"preconditioner", "projection", "parameters", "modules"} & set(shown), shown


@pytest.mark.filterwarnings("ignore:preconditioner='adam'.*second moments:RuntimeWarning")  # ReLU's dead rows
def test_a_factored_adam_store_says_v_was_factorised_and_its_modules_are_not_its_layers(data, tmp_path, capsys):
    """A factored store's "adam" rows divide by a rank-one factorisation of v (an approximation); the modules line
    counts the modules of the parameters, while "checkpoints" shows the layers per checkpoint that
    per_checkpoint=True columns are reshaped by (README: `layers` as `tracin info` shows it)."""
    model, x, y, loss = data
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss(model(x), y).mean().backward()
    opt.step()
    export_gradients(
        model,
        [(model.state_dict(), 0.1, opt.state_dict())] * 2,
        (x, y),
        loss,
        store=tmp_path / "s",
        mode="factored",
        layers=["2", "4"],
        preconditioner="adam",
        progress=False,
    )
    shown = _info(tmp_path / "s", capsys)
    assert shown["preconditioner"] == (
        "adam (gradients divided by Adam's sqrt(v) + eps (v through a rank-one factorisation: an approximation); "
        "Adam state used: each checkpoint's optimizer state, given in memory)"
    )
    assert shown["checkpoints"].startswith("2 x 2 layers")
    assert shown["modules"] == "2: 2, 4 (selected by the layers= patterns 2, 4)"


@pytest.mark.filterwarnings("ignore:the batched per-example hooks cover:UserWarning")
def test_a_parametrized_weight_is_its_modules(tmp_path, capsys):
    """weight_norm's parameters (0.parametrizations.weight.original0 / original1) belong to module 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    export_gradients(
        model,
        [(model.state_dict(), 0.1)],
        (x, y),
        nn.CrossEntropyLoss(reduction="none"),
        store=tmp_path / "s",
        progress=False,
    )
    shown = _info(tmp_path / "s", capsys)
    assert shown["parameters"].startswith("5: 0.bias, 0.parametrizations.weight.original0, ")
    assert shown["modules"] == "2: 0, 2"
