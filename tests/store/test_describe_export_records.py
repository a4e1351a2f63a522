"""describe() / `tracin info STORE` show what the export recorded besides the metadata keys: the preconditioner
(kind, and that Adam state was used), the projection (kind, dim, seed) and the parameters and layers of the rows
(counts, the first few names); a store without those records (written from NumPy, or by hand) says nothing of them."""

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
    assert shown["layers"] == "3: 0, 2, 4"
    assert list(shown)[-1] == "metadata"  # the keys' line last, as before


def test_a_plain_store_of_chosen_layers(data, tmp_path, capsys):
    model, x, y, loss = data
    export_gradients(
        model, [(model.state_dict(), 0.1)], (x, y), loss, layers=["4"], store=tmp_path / "s", progress=False
    )
    shown = _info(tmp_path / "s", capsys)
    assert shown["preconditioner"] == "none (no optimizer state used)"
    assert shown["projection"] == "none (full gradients)"
    assert shown["parameters"] == "2: 4.weight, 4.bias"
    assert shown["layers"] == "1: 4 (selected by the layers= patterns 4)"


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
    assert not {"preconditioner", "projection", "parameters", "layers"} & set(shown), shown
