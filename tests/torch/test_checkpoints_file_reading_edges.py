"""Edges of reading checkpoint files and matching their weights to the model (tracin.torch.checkpoints):
a safetensors file cut one byte short or inside its header, the exact bounds of what is taken for a
safetensors file, and the shapes a checkpoint's weights must have (hand mutation testing, m407)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import tracin.torch.checkpoints as checkpoints_module
from tracin.torch.checkpoints import check_whole, load_checkpoint


def _safetensors_bytes(tensors: dict[str, tuple[str, list[int], int]]) -> bytes:
    """A safetensors file written by hand: name -> (dtype, shape, bytes of data), data zeros."""
    header, offset = {}, 0
    for key, (dtype, shape, size) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(offset)


def test_a_safetensors_file_one_byte_short_of_its_last_tensor_is_refused_and_a_whole_one_is_not(tmp_path):
    data = _safetensors_bytes({"w": ("F32", [3], 12), "b": ("F32", [1], 4)})
    whole = tmp_path / "whole.safetensors"
    whole.write_bytes(data)
    check_whole(str(whole), "checkpoints[0]")  # exactly as long as its header says: whole
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-1])
    n = len(data) - 8 - 16
    expected = (
        f"a safetensors file of {len(data) - 1} bytes whose header lists tensors up to byte {8 + n + 16}: cut short"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_whole(str(cut), "checkpoints[0]")


def test_a_safetensors_file_cut_inside_its_header_is_named_as_shorter_than_its_header(tmp_path):
    data = _safetensors_bytes({"w": ("F32", [3], 12)})
    n = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + n - 4])  # longer than the header's length alone, shorter than 8 bytes more
    size = 8 + n - 4
    with pytest.raises(
        ValueError, match=re.escape(f"a safetensors file of {size} bytes, shorter than its header: cut short")
    ):
        check_whole(str(cut), "checkpoints[0]")


@pytest.mark.parametrize("length", [0, 1])
def test_a_file_whose_header_length_is_under_two_is_no_safetensors_file(tmp_path, length):
    """No JSON header of a safetensors file is shorter than '{}': 8 bytes of a length 0 or 1 then '{' are not one."""
    path = tmp_path / "weights.pt"
    path.write_bytes(length.to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"is not a torch\.save file \(it starts with b'\\x0[01]\\x00"):
        load_checkpoint(str(path), 0, {"w": torch.zeros(1)})


def test_a_safetensors_file_with_a_long_header_is_read_by_its_first_bytes(tmp_path):
    """A header of 40 kB (metadata) is well under safetensors' bound of 100 MB: still read as safetensors."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {"w": torch.tensor([1.5, -2.0, 3.25])}
    path = tmp_path / "weights.pt"
    safetensors_torch.save_file(state, str(path), metadata={"note": "x" * 40_000})
    assert int.from_bytes(path.read_bytes()[:8], "little") > 40_000
    loaded = load_checkpoint(str(path), 0, {"w": torch.zeros(3)})
    assert loaded["w"].tolist() == [1.5, -2.0, 3.25]


def test_a_weight_of_the_same_size_but_another_shape_is_refused_naming_both_shapes():
    model = torch.nn.Linear(3, 2)  # weight (2, 3)
    state = {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=re.escape("weight has shape (3, 2), the model's has (2, 3)")):
        load_checkpoint(state, 0, model.state_dict())


def test_a_complex_weight_for_a_real_one_is_named_as_complex():
    state = {"w": torch.zeros(2, dtype=torch.complex64)}
    with pytest.raises(ValueError, match="w has dtype complex64, the model's float32: a complex tensor for a real one"):
        load_checkpoint(state, 0, {"w": torch.zeros(2)})


def test_prefixes_of_dataparallel_and_torch_compile_are_dropped_in_any_number():
    model = torch.nn.Linear(2, 1)
    weight, bias = torch.tensor([[0.5, -1.0]]), torch.tensor([0.25])
    for prefix in ("module._orig_mod.", "_orig_mod.module.module."):
        loaded = load_checkpoint({prefix + "weight": weight, prefix + "bias": bias}, 0, model.state_dict())
        assert sorted(loaded) == ["bias", "weight"]
        assert loaded["weight"].tolist() == [[0.5, -1.0]] and loaded["bias"].tolist() == [0.25]


@pytest.mark.parametrize("count", [8, 9])
def test_missing_keys_are_listed_up_to_eight_then_marked_as_more(count):
    reference = {f"k{i}": torch.zeros(1) for i in range(count)}
    with pytest.raises(ValueError) as refused:
        load_checkpoint({"other": torch.zeros(1)}, 0, reference)
    listed = str([f"k{i}" for i in range(8)])
    assert f"missing keys {listed}{' ...' if count > 8 else ''}, unexpected keys ['other']" in str(refused.value)


def test_an_empty_dict_is_no_state_dict():
    with pytest.raises(ValueError, match=r"checkpoints\[0\] .*is not a state_dict \(a mapping of names to tensors\)"):
        load_checkpoint({}, 0, {"w": torch.zeros(1)})


def test_weights_made_under_inference_mode_are_copied_so_autograd_can_use_them():
    model = torch.nn.Linear(2, 1)
    with torch.inference_mode():  # a snapshot taken in an evaluation loop
        state = {"weight": torch.tensor([[2.0, -1.0]]), "bias": torch.tensor([0.5])}
    loaded = load_checkpoint(state, 0, model.state_dict())
    assert not any(t.is_inference() for t in loaded.values())
    weight = loaded["weight"].requires_grad_()
    out = torch.func.functional_call(model, {"weight": weight, "bias": loaded["bias"]}, torch.tensor([[3.0, 4.0]]))
    out.sum().backward()
    assert out.item() == 2.0 * 3.0 - 1.0 * 4.0 + 0.5
    assert weight.grad.tolist() == [[3.0, 4.0]]


def test_a_safetensors_file_is_read_from_the_file_opened_not_from_its_path_again(tmp_path, monkeypatch):
    """A file replaced at its path once opened (a training run saving its next checkpoint over it) is read
    as it was when opened: safetensors is given the open descriptor (/dev/fd/N), not the path."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    if not os.path.isdir("/dev/fd"):
        pytest.skip("no /dev/fd")
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({"w": torch.tensor([1.0, 2.0])}, str(path))
    newer = tmp_path / "newer.safetensors"
    safetensors_torch.save_file({"w": torch.tensor([7.0, 8.0])}, str(newer))
    opened = checkpoints_module._open_regular

    def open_then_replace(*args):
        f = opened(*args)
        os.replace(newer, path)  # the path now names another file; `f` is still the first one
        return f

    monkeypatch.setattr(checkpoints_module, "_open_regular", open_then_replace)
    loaded = load_checkpoint(str(path), 0, {"w": torch.zeros(2)})
    assert loaded["w"].tolist() == [1.0, 2.0]


def test_a_missing_num_batches_tracked_is_a_copy_of_the_models_not_the_models_own_buffer():
    """A forward in train mode adds 1 to num_batches_tracked in place: on the loaded copy, never on the model."""
    model = torch.nn.BatchNorm1d(2)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load_checkpoint(state, 0, model.state_dict())
    assert loaded["num_batches_tracked"].item() == 0
    loaded["num_batches_tracked"].add_(1)
    assert model.num_batches_tracked.item() == 0


def test_a_models_own_submodule_named_module_keeps_its_prefix():
    """Every key starts with 'module.' because the model's one submodule is named so: no DataParallel prefix."""
    model = torch.nn.Module()
    model.module = torch.nn.Linear(2, 1)
    state = {"module.weight": torch.tensor([[1.0, 2.0]]), "module.bias": torch.tensor([3.0])}
    loaded = load_checkpoint(state, 0, model.state_dict())
    assert sorted(loaded) == ["module.bias", "module.weight"]
    assert loaded["module.weight"].tolist() == [[1.0, 2.0]] and loaded["module.bias"].tolist() == [3.0]


def test_a_folders_model_safetensors_is_checked_as_safetensors_by_its_name(tmp_path):
    """A save_pretrained folder's model.safetensors whose header length is beyond any real one (a damaged first
    8 bytes) is still checked as a safetensors file, the format its name gives: cut short, not passed as whole."""
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b'{"w": {}}')
    with pytest.raises(
        ValueError, match=re.escape("a safetensors file of 17 bytes, shorter than its header: cut short")
    ):
        check_whole(str(folder), "checkpoints[0]")
