"""Checkpoint files are opened once, without blocking: a FIFO (or device) at a checkpoint's path, there
from the start or swapped in after the fingerprint, is refused naming the checkpoint, never waited on."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch_oracle import classification_data, mlp, train_checkpoints

import tracin.torch.checkpoints as checkpoints_module
from tracin._export import driver
from tracin.torch import export_gradients
from tracin.torch.checkpoints import load_checkpoint, parse_checkpoints

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")

LOSS = nn.CrossEntropyLoss(reduction="none")
REFUSED = "not a regular file (a FIFO, device or socket"


def _without_hanging(fn: Callable[[], Any], fifo: Path) -> list:
    """[the exception fn raised, or None] when fn returns within 30 s; [] when it hangs (an open of `fifo`
    waiting for a writer), which is then released by opening the FIFO for writing."""
    outcome: list = []

    def target() -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - returned to the test to check
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # the old code: blocked in open(); a writer lets it go on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        return []
    return outcome


@pytest.fixture
def setup(tmp_path):
    model = mlp()
    data = classification_data(12, seed=5)
    return model, train_checkpoints(model, *data, tmp_path, steps=1), data


def test_a_fifo_at_a_checkpoint_path_is_refused_not_waited_on(setup, tmp_path):
    model, _, _ = setup
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    outcome = _without_hanging(lambda: load_checkpoint(str(fifo), 3, model.state_dict()), fifo)
    assert outcome and isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith(f"checkpoints[3] ({fifo}) cannot be read: {REFUSED}")
    with pytest.raises(ValueError, match=r"^checkpoints\[0\] \(/dev/null\) cannot be read: not a regular file"):
        load_checkpoint("/dev/null", 0, model.state_dict())


def test_a_fifo_for_an_optimizer_state_is_refused_when_its_moments_are_read(setup, tmp_path):
    model, checkpoints, _ = setup
    fifo = tmp_path / "optimizer.pt"
    os.mkfifo(fifo)
    (entry,) = parse_checkpoints([(checkpoints[0][0], 0.1, str(fifo))], model)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    outcome = _without_hanging(lambda: entry.optimizer.moments(params), fifo)
    assert outcome and isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith(f"checkpoints[0][2] (optimizer state) cannot be read ({fifo}): {REFUSED}")


def _swap_for_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_swapped_for_a_fifo_after_its_fingerprint_is_refused(setup, tmp_path, monkeypatch, suffix):
    """The digest opened the file without blocking, torch.load opened the path again, blocking: a FIFO put
    in its place between the two hung the export forever. A *.safetensors file is opened the same way."""
    model, checkpoints, data = setup
    path = tmp_path / f"swapped{suffix}"
    if suffix == ".pt":
        path.write_bytes(Path(checkpoints[1][0]).read_bytes())
    else:
        save_file = pytest.importorskip("safetensors.torch").save_file
        save_file(torch.load(checkpoints[1][0], weights_only=True), str(path))
    real_digest = driver.checkpoint_file_digest
    swapped = []

    def digest_then_swap(source: Any, index: int) -> str:
        digest = real_digest(source, index)
        if os.fspath(source) == str(path) and not swapped:
            swapped.append(index)
            _swap_for_fifo(path)
        return digest

    monkeypatch.setattr(driver, "checkpoint_file_digest", digest_then_swap)
    run = lambda: export_gradients(model, [checkpoints[0], (str(path), 1.0)], data, LOSS, progress=False)  # noqa: E731
    outcome = _without_hanging(run, path)
    assert swapped == [1]
    assert outcome and isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith(f"checkpoints[1] ({path}) cannot be read: {REFUSED}")


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_weight_file_of_a_folder_swapped_for_a_fifo_after_it_was_listed_is_refused(
    setup, tmp_path, monkeypatch, weights
):
    """The folder's weight files are listed (regular files only), then each is opened: safetensors, which
    opens a file by its path itself, is given the open descriptor's (/dev/fd/N)."""
    model, checkpoints, _ = setup
    state = torch.load(checkpoints[1][0], weights_only=True)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    if weights == "model.safetensors":
        save_file = pytest.importorskip("safetensors.torch").save_file
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    loaded = load_checkpoint(str(folder), 0, model.state_dict())
    for key, t in state.items():  # read whole through the descriptor
        torch.testing.assert_close(loaded[key], t, rtol=0, atol=0)
    real_weight_files = checkpoints_module.weight_files

    def list_then_swap(*args: Any) -> Any:
        found = real_weight_files(*args)
        _swap_for_fifo(folder / weights)
        return found

    monkeypatch.setattr(checkpoints_module, "weight_files", list_then_swap)
    outcome = _without_hanging(lambda: load_checkpoint(str(folder), 0, model.state_dict()), folder / weights)
    assert outcome and isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith(f"checkpoints[0] ({folder}) cannot be read ({folder / weights}): {REFUSED}")


def test_a_file_swapped_for_a_fifo_after_the_completeness_check_listed_it_is_refused(setup, tmp_path, monkeypatch):
    """check_whole looks for a file (os.path.isfile) before it reads the end of a zip archive."""
    model, checkpoints, _ = setup
    path = tmp_path / "swapped.pt"
    path.write_bytes(Path(checkpoints[0][0]).read_bytes())
    real_isfile = os.path.isfile

    def isfile_then_swap(p: Any) -> bool:
        found = real_isfile(p)
        if os.fspath(p) == str(path) and found:
            _swap_for_fifo(path)
        return found

    monkeypatch.setattr(checkpoints_module.os.path, "isfile", isfile_then_swap)
    outcome = _without_hanging(lambda: parse_checkpoints([(str(path), 1.0)], model), path)
    monkeypatch.undo()
    assert outcome and isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith(f"checkpoints[0] ({path}) cannot be read: {REFUSED}")


def test_a_file_read_through_its_open_descriptor_gives_the_state_torch_load_gives(setup):
    model, checkpoints, _ = setup
    loaded = load_checkpoint(checkpoints[2][0], 2, model.state_dict())
    expected = torch.load(checkpoints[2][0], weights_only=True)
    assert loaded.keys() == expected.keys()
    for key, t in expected.items():
        torch.testing.assert_close(loaded[key], t, rtol=0, atol=0)


@pytest.mark.parametrize("text", [b"hello world\n", b"a,b,c\n1,2,3\n"])
def test_a_text_file_whose_first_byte_is_a_pickle_opcode_is_named_as_no_torch_save_file(tmp_path, text):
    """torch's weights_only unpickler reads 'h' (BINGET: KeyError) and 'a' (APPEND: IndexError) as opcodes."""
    path = tmp_path / "notes.pt"
    path.write_bytes(text * 20)
    with pytest.raises(ValueError, match=rf"\({re.escape(str(path))}\) is not a torch.save file \(it starts with"):
        load_checkpoint(str(path), 0, nn.Linear(2, 2).state_dict())


def test_a_folder_without_weight_files_is_refused_before_anything_under_it_is_digested(setup, tmp_path, monkeypatch):
    """A training run's directory given in place of one of its checkpoints: every file under it (other
    checkpoints, hundreds of GB) was read and hashed before the loader said it held no weights."""
    model, checkpoints, data = setup
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    with open(run / "checkpoint-10" / "big.bin", "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    digested = []
    real_digest = driver.checkpoint_file_digest
    monkeypatch.setattr(driver, "checkpoint_file_digest", lambda s, i: digested.append(i) or real_digest(s, i))
    with pytest.raises(ValueError, match=r"^checkpoints\[1\] \(.*run\) is a directory without model\.safetensors"):
        export_gradients(model, [checkpoints[0], (str(run), 1.0)], data, LOSS, progress=False)
    assert digested == []
