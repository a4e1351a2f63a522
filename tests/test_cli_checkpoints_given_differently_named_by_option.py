"""Checkpoints given as files for one store and in memory for the other cannot be compared; the command line's
warning of it names the sides by its options (--test / --train, path and --whitening's gradients), once per
command, not by the library's "test" / "train"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tracin
from tracin.cli import main
from tracin.torch import export_gradients

UNCHECKED = "cannot check that both sides were exported at the same checkpoints"


@pytest.fixture
def stores(tmp_path):
    """Stores of one tiny model: "test" (checkpoints given in memory), "train" (given as files)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    states, files = [], []
    for c in range(2):
        states.append({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        files.append(tmp_path / f"c{c}.pt")
        torch.save(states[-1], files[-1])
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss(reduction="none")
    paths = {}
    for name, given, rows in (("test", states, slice(0, 2)), ("train", files, slice(2, 6))):
        paths[name] = tmp_path / name
        export_gradients(model, [(c, 0.1) for c in given], (x[rows], y[rows]), loss, store=paths[name], progress=False)
    return paths


def _warned(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if UNCHECKED in line]


@pytest.mark.parametrize("command", ["score", "aggregate"])
def test_the_options_are_named_once(stores, tmp_path, capsys, command):
    argv = [command, "--test", str(stores["test"]), "--train", str(stores["train"]), "-o", str(tmp_path / "o.csv")]
    assert main(argv) == 0
    lines = _warned(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"tracin {command}: warning: checkpoints [0, 1] were given in memory for --test and as a file or folder "
        "path for --train (metadata['checkpoint_sources'])"
    ), lines[0]
    assert "export --test and --train with their checkpoints given the same way" in lines[0], lines[0]


def test_the_other_way_round(stores, tmp_path, capsys):
    argv = ["score", "--test", str(stores["train"]), "--train", str(stores["test"]), "-o", str(tmp_path / "o.csv")]
    assert main(argv) == 0
    lines = _warned(capsys)
    assert len(lines) == 1 and "as a file or folder path for --test and in memory for --train" in lines[0], lines


def test_self_influence_names_path_and_the_whitenings_gradients(stores, tmp_path, capsys):
    tracin.Whitening.fit(tracin.GradientStore.open(stores["train"]), progress=False).save(tmp_path / "w.npz")
    argv = [
        "self-influence",
        str(stores["test"]),
        "--whitening",
        str(tmp_path / "w.npz"),
        "-o",
        str(tmp_path / "o.csv"),
    ]
    assert main(argv) == 0
    lines = _warned(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "tracin self-influence: warning: checkpoints [0, 1] were given in memory for path and as a file or folder "
        "path for the gradients --whitening was fitted on"
    ), lines[0]
