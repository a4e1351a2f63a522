"""Which files of a save_pretrained folder are its weights, and the refusal of a folder holding none."""

from __future__ import annotations

import json
import os
import re

import pytest

from tracin._export.pretrained_folder import weight_files, without_weights


def test_a_folder_without_weight_files_is_told_and_named_without_reading_its_files(tmp_path, monkeypatch):
    """A run directory (logs, other checkpoints: possibly hundreds of GB) is told apart by its file names."""
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "model.safetensors").write_bytes(b"x")  # one level down: not this folder's weights
    (run / "log.txt").write_text("step 10")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    assert weight_files(run, "checkpoints[0] (run)") is None
    error = without_weights(run, "checkpoints[0] (run)")
    assert opened == []
    assert str(error).startswith("checkpoints[0] (run) is a directory without model.safetensors, pytorch_model.bin")
    assert "PEFT" not in str(error)
    (run / "adapter_model.bin").write_bytes(b"x")
    assert "It holds adapter_model.bin, a PEFT adapter's weights alone" in str(without_weights(run, "checkpoints[0]"))


def test_a_folder_with_weights_gives_them_in_first_use_order_after_their_index(tmp_path):
    index = '{"weight_map": {"a": "s-2.safetensors", "b": "s-1.safetensors", "c": "s-2.safetensors"}}'
    (tmp_path / "model.safetensors.index.json").write_text(index)
    for shard in ("s-1.safetensors", "s-2.safetensors"):
        (tmp_path / shard).write_bytes(b"x")
    found = weight_files(tmp_path, "checkpoints[0]")
    assert found.files == ["s-2.safetensors", "s-1.safetensors"] and found.safetensors
    assert found.read == ["model.safetensors.index.json", "s-2.safetensors", "s-1.safetensors"]
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")  # the safetensors layout is looked for first
    assert weight_files(tmp_path, "checkpoints[0]").index == "model.safetensors.index.json"
    os.remove(tmp_path / "model.safetensors.index.json")
    found = weight_files(tmp_path, "checkpoints[0]")
    assert (found.files, found.index, found.safetensors) == (["pytorch_model.bin"], None, False)


def test_an_index_listing_the_folder_itself_or_its_parent_as_a_shard_is_refused_as_not_a_file_name(tmp_path):
    """'.' and '..' name folders, not shards: the same ValueError as '../x' (r291 M40: '.' passed the name check
    and was a FileNotFoundError, 'no shard listed by its index at <folder>/.', as if a shard were missing)."""
    for bad in (".", ".."):
        index = {"weight_map": {"a": "s-1.safetensors", "b": bad}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        (tmp_path / "s-1.safetensors").write_bytes(b"x")
        with pytest.raises(ValueError, match=rf"lists the shard '{re.escape(bad)}', which is not a file name"):
            weight_files(tmp_path, "checkpoints[0]")


def test_a_dcp_folder_is_told_apart_by_its_metadata_and_its_distcp_files_together(tmp_path, monkeypatch):
    """torch.distributed.checkpoint.save writes .metadata and *.distcp: the DCP hint needs both, and a folder
    that cannot be listed is not named DCP (its own error goes on without the hint)."""
    from tracin._export.pretrained_folder import DCP_HINT, is_dcp_folder

    assert not is_dcp_folder(tmp_path / "missing")
    (tmp_path / ".metadata").write_bytes(b"x")
    assert not is_dcp_folder(tmp_path)  # .metadata alone: some other tool's
    assert DCP_HINT not in str(without_weights(tmp_path, "checkpoints[0]"))
    (tmp_path / "__0_0.distcp").write_bytes(b"x")
    assert is_dcp_folder(tmp_path)
    assert f". {DCP_HINT}" in str(without_weights(tmp_path, "checkpoints[0]"))
    os.remove(tmp_path / ".metadata")
    assert not is_dcp_folder(tmp_path)  # shards without their .metadata
    (tmp_path / ".metadata").write_bytes(b"x")

    def unlistable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "listdir", unlistable)
    assert not is_dcp_folder(tmp_path)
