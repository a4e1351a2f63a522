"""One (Trainer checkpoint-N folder, learning_rate) pair given alone, not in a list, is told to be put in a
list (the shared parser's "this looks like one pair itself"), not that the folder came without its learning
rate: the user gave the rate. A folder given bare, in a list, is still told the rate its trainer_state.json
logged."""

from __future__ import annotations

import json

import pytest
import torch

import tracin.torch


def _folder(tmp_path, model: torch.nn.Module) -> str:
    """A checkpoint-N folder as a transformers Trainer writes it: weights and trainer_state.json."""
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    state = {"global_step": 10, "log_history": [{"step": 10, "learning_rate": 0.0009, "loss": 1.0}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return str(folder)


def _export(model, checkpoints):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    loss = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    return tracin.torch.export_gradients(model, checkpoints, (x, y), loss, progress=False)


@pytest.mark.parametrize("form", ["pair", "triple", "list pair", "tensor rate"])
def test_one_pair_not_in_a_list_is_told_to_be_put_in_one(tmp_path, form):
    model = torch.nn.Linear(3, 2)
    folder = _folder(tmp_path, model)
    checkpoints = {
        "pair": (folder, 0.1),
        "triple": (folder, 0.1, folder),
        "list pair": [folder, 0.1],
        "tensor rate": (folder, torch.tensor(0.1)),
    }[form]
    with pytest.raises(TypeError, match=r"this looks like one pair itself .*pass a list") as caught:
        _export(model, checkpoints)
    assert "Trainer checkpoint folder" not in str(caught.value) and "bare path" not in str(caught.value)


def test_the_pair_in_a_list_is_taken_and_a_bare_folder_still_gets_the_logged_rate(tmp_path):
    model = torch.nn.Linear(3, 2)
    folder = _folder(tmp_path, model)
    assert _export(model, [(folder, 0.1)]).weights == pytest.approx([0.1])
    with pytest.raises(TypeError, match=r"checkpoints\[0\] is a Trainer checkpoint folder .* bare path") as caught:
        _export(model, [folder])
    assert "learning_rate 0.0009 at step 10" in str(caught.value)
