"""Checkpoints given as files on one side and in memory on the other are digested differently
(metadata['checkpoint_sources']), so scoring cannot compare them: a list in another order was scored without a
word. Now a warning says so, naming the checkpoints; sides given alike are compared (or refused) as before."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from tracin.torch import export_gradients

UNCHECKED = "cannot check that both sides were exported at the same checkpoints"


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    states, files = [], []
    for c in range(3):
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        states.append(state)
        files.append(tmp_path / f"c{c}.pt")
        torch.save(state, files[-1])
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss(reduction="none")

    def export(checkpoints, rows):
        return export_gradients(model, [(c, 0.1) for c in checkpoints], (x[rows], y[rows]), loss, progress=False)

    return states, files, export


def _unchecked(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(r.message) for r in record if UNCHECKED in str(r.message)]


def test_checkpoints_given_as_files_on_one_side_and_in_memory_on_the_other_warn(setup):
    states, files, export = setup
    test = export([files[0], files[2], files[1]], slice(0, 2))  # another order, as r391 found: not caught
    train = export(states, slice(2, 6))
    said = _unchecked(lambda: tracin.scores(test, train))
    assert len(said) == 1
    assert said[0].startswith(
        "checkpoints [0, 1, 2] were given as a file or folder path for test and in memory for train "
        "(metadata['checkpoint_sources'])"
    ), said[0]
    assert "export both sides with their checkpoints given the same way" in said[0]
    assert len(_unchecked(lambda: tracin.top_k(train, test, k=2))) == 1  # the other way round too


def test_sides_given_alike_are_compared_without_the_warning(setup):
    states, files, export = setup
    for given in (files, states):
        test, train = export(given, slice(0, 2)), export(given, slice(2, 6))
        assert _unchecked(lambda t=test, x=train: tracin.scores(t, x)) == []
        shuffled = export([given[0], given[2], given[1]], slice(0, 2))
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=r"checkpoints \[1, 2\] differ"):
            tracin.scores(shuffled, train)
    # one checkpoint given differently: only it is named
    mixed = export([files[0], states[1], files[2]], slice(0, 2))
    said = _unchecked(lambda: tracin.scores(mixed, export(files, slice(2, 6))))
    assert len(said) == 1 and said[0].startswith("checkpoints [1] were given in memory for test and as a file"), said
    with pytest.warns(UserWarning, match=UNCHECKED):
        warned = tracin.scores(mixed, export(files, slice(2, 6)))
    expected = tracin.scores(export(files, slice(0, 2)), export(files, slice(2, 6)))
    np.testing.assert_allclose(warned, expected, rtol=1e-6)  # scores are untouched by the warning


def test_a_whitened_side_is_warned_of_once_per_call(setup):
    """The whitening's recorded train side is compared with the other side too: one warning per call, not two."""
    states, files, export = setup
    train_files, train_states = export(files, slice(2, 6)), export(states, slice(2, 6))
    whitened = tracin.Whitening.fit(train_states, progress=False).apply(export(states, slice(0, 2)), progress=False)
    said = _unchecked(lambda: tracin.top_k(whitened, train_files, k=2))
    assert len(said) == 1 and said[0].startswith("checkpoints [0, 1, 2] were given in memory for test"), said


def test_checkpoints_given_differently_each_way_are_told_so(setup):
    states, files, export = setup
    test = export([states[0], files[1], files[2]], slice(0, 2))
    train = export([files[0], states[1], files[2]], slice(2, 6))
    said = _unchecked(lambda: tracin.scores(test, train))
    assert len(said) == 1
    assert said[0].startswith(
        "checkpoints [0, 1] were given some as file or folder paths for test and in memory for train, some the other"
    ), said[0]


def test_the_cli_warns_once_with_whitening(setup, tmp_path, capsys):
    from tracin.cli import main

    states, files, export = setup
    model_rows = {"test": (states, slice(0, 2)), "train": (files, slice(2, 6))}
    paths = {}
    for name, (given, rows) in model_rows.items():
        got = export(given, rows)
        paths[name] = tmp_path / name
        w = tracin.GradientStore.create(paths[name], got.n_rows, list(got.dims), got.weights, metadata=got.metadata)
        for c, m in enumerate(got.matrices):
            w.write(c, 0, m)
        w.finalize()
    tracin.Whitening.fit(tracin.GradientStore.open(paths["train"]), progress=False).save(tmp_path / "w.npz")
    argv = ["--test", str(paths["test"]), "--train", str(paths["train"]), "-o", str(tmp_path / "o.csv")]
    assert main(["score", *argv, "--whitening", str(tmp_path / "w.npz")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if UNCHECKED in line]
    assert len(lines) == 1 and lines[0].startswith("tracin score: warning: checkpoints [0, 1, 2] were given"), lines
