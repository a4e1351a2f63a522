"""What a Hugging Face user's first mistakes are told: a Trainer checkpoint-N folder given without its
learning rate (the error names the rate its trainer_state.json logged at that step), a loss_fn returning
the model's own `outputs.loss` (the batch mean), and Trainer-style dict batches holding their "labels"."""

from __future__ import annotations

import json

import pytest
import torch

import tracin.torch

transformers = pytest.importorskip("transformers")

_T = 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=_T, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, 40, (6, _T), generator=torch.Generator().manual_seed(1))


def _loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits[:, :-1].transpose(1, 2)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:], reduction="none").sum(1)


def _trainer_folder(tmp_path, model: torch.nn.Module, step: int = 4) -> str:
    """A checkpoint-N folder as a transformers Trainer writes it (weights and trainer_state.json)."""
    folder = tmp_path / f"checkpoint-{step}"
    model.save_pretrained(folder)
    history = [
        {"epoch": 0.5, "learning_rate": 0.0009, "loss": 3.7, "step": step},
        {"epoch": 1.0, "learning_rate": 0.0005, "loss": 3.6, "step": 2 * step},  # a later log: not this one
    ]
    state = {"global_step": step, "log_history": history, "max_steps": 3 * step}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return str(folder)


@pytest.mark.parametrize("entry", ["bare", "one", "none"])
def test_trainer_folder_without_its_learning_rate_names_the_rate_logged_at_its_step(tmp_path, entry):
    model = _model()
    folder = _trainer_folder(tmp_path, model)
    checkpoint = {"bare": folder, "one": (folder,), "none": (folder, None)}[entry]
    ids = _ids()
    with pytest.raises(TypeError, match=r"checkpoints\[0\]") as caught:
        tracin.torch.export_gradients(model, [checkpoint], ({"input_ids": ids}, ids), _loss, progress=False)
    message = str(caught.value)
    assert "trainer_state.json" in message and "0.0009" in message and "step 4" in message, message
    assert "0.0005" not in message, message  # the rate logged at a later step is not this checkpoint's


def test_a_folder_without_trainer_state_keeps_the_plain_message(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "weights")
    ids = _ids()
    with pytest.raises(TypeError, match=r"checkpoints\[0\] must be a") as caught:
        tracin.torch.export_gradients(
            model, [str(tmp_path / "weights")], ({"input_ids": ids}, ids), _loss, progress=False
        )
    assert "trainer_state.json" not in str(caught.value)


def test_returning_the_models_own_outputs_loss_is_named():
    model = _model()
    ids = _ids()
    data = ({"input_ids": ids, "labels": ids}, ids)
    with pytest.raises(ValueError, match=r"outputs\.loss") as caught:
        tracin.torch.export_gradients(
            model, [(model.state_dict(), 0.1)], data, lambda outputs, labels: outputs.loss, progress=False
        )
    assert "logits" in str(caught.value)


def test_trainer_style_dict_batches_with_labels_are_told_how_to_split_them():
    ids = _ids()

    class Passages(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "attention_mask": torch.ones(_T, dtype=torch.long), "labels": ids[i]}

    model = _model()
    loader = torch.utils.data.DataLoader(Passages(), batch_size=3)
    with pytest.raises(TypeError, match=r"'labels'") as caught:
        tracin.torch.export_gradients(model, [(model.state_dict(), 0.1)], loader, _loss, progress=False)
    assert "collate_fn" in str(caught.value) and "pop('labels')" in str(caught.value), str(caught.value)


def test_trainer_folder_without_a_rate_logged_at_its_step_says_to_recompute_the_schedule(tmp_path):
    model = _model()
    folder = _trainer_folder(tmp_path, model, step=3)  # logged at steps 3 and 6: rewrite without step 3
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    state["log_history"] = state["log_history"][1:]
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    ids = _ids()
    with pytest.raises(TypeError, match=r"no learning_rate at step 3.*recompute the schedule"):
        tracin.torch.export_gradients(model, [(folder, None)], ({"input_ids": ids}, ids), _loss, progress=False)


def test_adam_preconditioning_of_a_trainer_folder_without_its_state_shows_the_folder_as_third_item(tmp_path):
    model = _model()
    folder = _trainer_folder(tmp_path, model)
    torch.save({"state": {}, "param_groups": []}, f"{folder}/optimizer.pt")
    ids = _ids()
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state") as caught:
        tracin.torch.export_gradients(
            model, [(folder, 0.0009)], ({"input_ids": ids}, ids), _loss, preconditioner="adam", progress=False
        )
    assert f"({folder!r}, learning_rate, {folder!r})" in str(caught.value), caught.value


def test_adam_preconditioning_of_a_folder_without_optimizer_pt_gets_no_folder_hint(tmp_path):
    model = _model()
    folder = _trainer_folder(tmp_path, model)
    ids = _ids()
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state") as caught:
        tracin.torch.export_gradients(
            model, [(folder, 0.0009)], ({"input_ids": ids}, ids), _loss, preconditioner="adam", progress=False
        )
    assert "optimizer.pt" not in str(caught.value), caught.value


@pytest.mark.parametrize("history", [None, [], [{"step": 3, "loss": 3.7}]])
def test_trainer_folder_whose_log_history_holds_no_rate_is_not_blamed_on_logging_steps(tmp_path, history):
    """fr353: no log_history (or none holding a learning_rate) is not 'logging_steps does not divide save_steps'."""
    model = _model()
    folder = _trainer_folder(tmp_path, model, step=3)
    state = {"global_step": 3} if history is None else {"global_step": 3, "log_history": history}
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    ids = _ids()
    with pytest.raises(TypeError, match=r"no learning_rate at step 3.*recompute the schedule") as caught:
        tracin.torch.export_gradients(model, [folder], ({"input_ids": ids}, ids), _loss, progress=False)
    assert "logging_steps" not in str(caught.value), str(caught.value)
    assert "no learning_rate at any step" in str(caught.value), str(caught.value)


def test_returning_outputs_loss_on_a_batch_of_one_row_is_named_too():
    """fr353: a 1-row batch (a dataset's last batch, one query) whose loss_fn returns outputs.loss is told
    so, not that a .squeeze() dropped its batch dimension."""
    model = _model()
    ids = _ids()[:1]
    data = ({"input_ids": ids, "labels": ids}, ids)
    with pytest.raises(ValueError, match=r"outputs\.loss") as caught:
        tracin.torch.export_gradients(
            model, [(model.state_dict(), 0.1)], data, lambda outputs, labels: outputs.loss, progress=False
        )
    assert "squeeze" not in str(caught.value), str(caught.value)
