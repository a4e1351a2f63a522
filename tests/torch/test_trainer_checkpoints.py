"""A real transformers Trainer run's checkpoint-N folders as checkpoints: its optimizer.pt (two unnamed
param groups, weight decay and none) read as the Trainer built them, and a state of another step."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import tracin.torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

_VOCAB, _T, _N = 32, 8, 8
_LAYERS = ["transformer.h.0.*"]  # decayed weights, and biases and a LayerNorm that are not decayed


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, _VOCAB, (_N, _T), generator=g)


class _Passages(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A tiny GPT-2 trained 4 AdamW steps by a default Trainer (cosine schedule, weight decay), saved at steps 2, 4."""
    out = str(tmp_path_factory.mktemp("trainer") / "run")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=_VOCAB, n_positions=_T, n_embd=16, n_layer=1, n_head=2)
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=_Passages(_ids())
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return out


def _loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits[:, :-1].transpose(1, 2)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:], reduction="none").sum(1)


def _export(model: torch.nn.Module, checkpoints: list) -> np.ndarray:
    ids = _ids()
    g = tracin.torch.export_gradients(
        model, checkpoints, (ids, ids), _loss, layers=_LAYERS, preconditioner="adam", progress=False
    )
    return np.asarray(g.matrices[0])


def _model(run: str) -> torch.nn.Module:
    return transformers.GPT2LMHeadModel.from_pretrained(os.path.join(run, "checkpoint-4"))


def _state(run: str, step: int) -> dict:
    return torch.load(os.path.join(run, f"checkpoint-{step}", "optimizer.pt"), weights_only=True)


def test_trainer_state_is_read_as_its_decay_split(run, tmp_path):
    """Rows from checkpoint-N (weights and optimizer.pt) equal those from its state named by hand (the
    refusal's recipe, with a Trainer's own get_decay_parameter_names), and differ from the rows of the
    same state with its groups' names exchanged within each shape (a wrong reading would show)."""
    model = _model(run)
    folder = os.path.join(run, "checkpoint-2")
    state = _state(run, 2)
    assert [("param_names" in g, g["weight_decay"]) for g in state["param_groups"]] == [(False, 0.01), (False, 0.0)]
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "unused"), report_to=[], use_cpu=True),
    )
    decay = set(trainer.get_decay_parameter_names(model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state["param_groups"][0]["param_names"] = [n for n in names if n in decay]
    state["param_groups"][1]["param_names"] = [n for n in names if n not in decay]
    assert {"transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"} <= set(
        state["param_groups"][1]["param_names"]
    )
    named = str(tmp_path / "named.pt")
    torch.save(state, named)
    ours = _export(model, [(folder, 1e-2, folder)])
    np.testing.assert_array_equal(ours, _export(model, [(folder, 1e-2, named)]))
    # the two LayerNorms' weights exchanged: only param_names tell them apart, and the rows change
    nodecay = state["param_groups"][1]["param_names"]
    i, j = nodecay.index("transformer.h.0.ln_1.weight"), nodecay.index("transformer.h.0.ln_2.weight")
    nodecay[i], nodecay[j] = nodecay[j], nodecay[i]
    torch.save(state, named)
    assert not np.allclose(ours, _export(model, [(folder, 1e-2, named)]))


def test_trainer_state_that_does_not_fit_is_refused(run, tmp_path):
    """Beside a trainer_state.json, a two-group state that is not the Trainer's split is refused saying
    why; away from one (another optimizer's groups may fit by chance), the plain refusal."""
    model = _model(run)
    folder = os.path.join(run, "checkpoint-2")
    with pytest.raises(ValueError, match=r"2 param groups and no parameter names.*decay\]$"):
        _export(model, [(folder, 1e-2, _state(run, 2))])
    shutil.copy(os.path.join(folder, "trainer_state.json"), tmp_path)
    rates = _state(run, 2)
    rates["param_groups"][1]["lr"] /= 10
    torch.save(rates, tmp_path / "rates.pt")
    with pytest.raises(ValueError, match=r"learning rates .* while a Trainer's share one rate"):
        _export(model, [(folder, 1e-2, str(tmp_path / "rates.pt"))])
    swapped = _state(run, 2)
    swapped["param_groups"].reverse()
    torch.save(swapped, tmp_path / "swapped.pt")
    with pytest.raises(ValueError, match=r"2 param groups and no parameter names.*Trainer's split it does not fit: "):
        _export(model, [(folder, 1e-2, str(tmp_path / "swapped.pt"))])
    other = _state(run, 2)  # another vocabulary's: the embedding's moments are (40, 16)
    key = other["param_groups"][0]["params"][0]
    for moment in ("exp_avg", "exp_avg_sq"):
        other["state"][key][moment] = torch.zeros(40, 16)
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"position 0 \(decay group\) is transformer\.wte\.weight of shape \(32, 16\)"):
        _export(model, [(folder, 1e-2, str(tmp_path / "other.pt"))])


def test_state_of_another_step_than_the_weights(run):
    """checkpoint-2's weights (trainer_state.json global_step 2) with checkpoint-4's state: refused; the
    reverse, a state of fewer steps (as a mixed-precision run's skipped steps leave), warned about."""
    model = _model(run)
    two, four = (os.path.join(run, f"checkpoint-{s}") for s in (2, 4))
    with pytest.raises(ValueError, match=r"has taken 4 steps, while its checkpoint's trainer_state\.json records "):
        _export(model, [(two, 1e-2, four)])
    with pytest.warns(UserWarning, match=r"has taken 2 steps, .* global_step 4: fewer"):
        _export(model, [(four, 1e-2, two)])


def test_state_one_step_past_the_weights_is_refused(run, tmp_path):
    """A state one step past its checkpoint's global_step (checkpoint-2's state stepped once more) is
    another checkpoint's: refused as four steps are (r266: the boundary went unchecked)."""
    model = _model(run)
    folder = os.path.join(run, "checkpoint-2")
    shutil.copy(os.path.join(folder, "trainer_state.json"), tmp_path)
    later = _state(run, 2)
    for entry in later["state"].values():
        entry["step"] = entry["step"] + 1
    torch.save(later, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match=r"has taken 3 steps, while its checkpoint's trainer_state\.json records "):
        _export(model, [(folder, 1e-2, str(tmp_path / "optimizer.pt"))])


def test_two_groups_whose_second_decays_are_not_read_as_the_trainers_split(run, tmp_path):
    """Beside a trainer_state.json, two unnamed groups of one rate whose second group decays are not a
    Trainer's decay / no-decay split: refused saying so (r266: only the rates were checked)."""
    model = _model(run)
    folder = os.path.join(run, "checkpoint-2")
    shutil.copy(os.path.join(folder, "trainer_state.json"), tmp_path)
    decaying = _state(run, 2)
    decaying["param_groups"][1]["weight_decay"] = 0.01
    torch.save(decaying, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match=r"the second weight_decay 0\.01, while a Trainer's share one rate"):
        _export(model, [(folder, 1e-2, str(tmp_path / "optimizer.pt"))])
