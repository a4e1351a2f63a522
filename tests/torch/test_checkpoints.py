"""Checkpoint loading: paths and state dicts, DataParallel prefixes, nesting, mismatches, load once;
the digests of in-memory checkpoints."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from _models import RunningMean
from torch import nn
from torch_oracle import classification_data, mlp, train_checkpoints

from interrupts import ctrl_c_on_call
from tracin import self_influence
from tracin._export.driver import _Loop
from tracin._export.fingerprint import callable_identity, digest_arrays
from tracin.torch import export_gradients
from tracin.torch.checkpoints import (
    frozen_parameters,
    legacy_state_digest,
    load_checkpoint,
    parse_checkpoints,
    state_digest,
    tied_aliases,
    written_in_forward,
)

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture
def setup(tmp_path):
    model = mlp()
    data = classification_data(12, seed=5)
    return model, train_checkpoints(model, *data, tmp_path, steps=1), data


def test_paths_and_in_memory_state_dicts_give_the_same_gradients(setup):
    model, checkpoints, data = setup
    from_paths = export_gradients(model, checkpoints, data, LOSS, progress=False)
    in_memory = [(torch.load(p, weights_only=True), lr) for p, lr in checkpoints]
    from_dicts = export_gradients(model, in_memory, data, LOSS, progress=False)
    for a, b in zip(from_paths.matrices, from_dicts.matrices, strict=True):
        np.testing.assert_array_equal(a, b)
    digests = from_dicts.metadata["fingerprints"]["checkpoints"]
    assert len(set(digests)) == 3  # one per checkpoint, all different


def test_gradients_are_those_of_each_checkpoint_not_of_the_current_weights(setup):
    model, checkpoints, (x, y) = setup
    g = export_gradients(model, checkpoints, (x[:1], y[:1]), LOSS, progress=False)
    for c, (path, _) in enumerate(checkpoints):
        twin = mlp()
        twin.load_state_dict(torch.load(path, weights_only=True))
        nn.functional.cross_entropy(twin(x[:1]), y[:1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in twin.parameters()]).numpy()
        np.testing.assert_allclose(g.matrices[c][0], expected, rtol=1e-5, atol=1e-7)


def test_dataparallel_prefix_and_nested_dicts_are_understood(setup, tmp_path):
    model, checkpoints, data = setup
    plain = export_gradients(model, checkpoints[:1], data, LOSS, progress=False)
    state = torch.load(checkpoints[0][0], weights_only=True)
    prefixed = {f"module.{k}": v for k, v in state.items()}
    torch.save({"state_dict": prefixed, "epoch": 3}, tmp_path / "wrapped.pt")
    for source in (prefixed, {"model_state_dict": state}, str(tmp_path / "wrapped.pt")):
        got = export_gradients(model, [(source, 0.5)], data, LOSS, progress=False)
        np.testing.assert_array_equal(got.matrices[0], plain.matrices[0])


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_torch_compile_prefix_is_dropped_alone_or_with_dataparallels(setup, prefix):
    """A torch.compile'd model's state_dict ('_orig_mod.' keys) was refused as not matching the model."""
    model, checkpoints, data = setup
    plain = export_gradients(model, checkpoints[:1], data, LOSS, progress=False)
    state = torch.load(checkpoints[0][0], weights_only=True)
    got = export_gradients(model, [({prefix + k: v for k, v in state.items()}, 0.5)], data, LOSS, progress=False)
    np.testing.assert_array_equal(got.matrices[0], plain.matrices[0])


def test_each_checkpoint_is_loaded_once(setup, monkeypatch):
    model, checkpoints, data = setup
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    export_gradients(model, checkpoints, data, LOSS, batch_size=2, progress=False)  # 6 batches
    assert len(calls) == 3
    assert all(k.get("weights_only") is True for k in calls)


def test_mismatched_checkpoints_are_clear_errors(setup, tmp_path):
    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    missing = {k: v for k, v in state.items() if k != "4.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['4.weight'\]"):
        export_gradients(model, [(missing, 1.0)], data, LOSS, progress=False)
    extra = {**state, "head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
        export_gradients(model, [(extra, 1.0)], data, LOSS, progress=False)
    resized = {**state, "4.weight": torch.zeros(4, 9)}
    with pytest.raises(ValueError, match=r"4.weight has shape \(4, 9\), the model's has \(4, 8\)"):
        export_gradients(model, [(resized, 1.0)], data, LOSS, progress=False)
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[0\]: no checkpoint at .*nope.pt"):
        export_gradients(model, [(str(tmp_path / "nope.pt"), 1.0)], data, LOSS, progress=False)


def _cut_in_half(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _without_pickle(path) -> None:
    """A torch.save archive rewritten without its data.pkl: whole, but not loadable."""
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i)) for i in z.infolist() if not i.filename.endswith("/data.pkl")]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            z.writestr(info, data)


def test_a_checkpoint_file_cut_short_is_named_before_any_checkpoint_is_exported(setup, tmp_path, monkeypatch):
    """A truncated third .pt file was a bare 'OSError: [Errno 22] Invalid argument', after two exports."""
    model, checkpoints, data = setup
    bad = tmp_path / "bad.pt"
    shutil.copy(checkpoints[2][0], bad)
    _cut_in_half(bad)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(ValueError, match=r"checkpoints\[2\] \(.*bad.pt\) cannot be read: .*cut short"):
        export_gradients(model, [*checkpoints[:2], (str(bad), 1.0)], data, LOSS, progress=False)
    assert loads == []  # refused before any checkpoint was read
    shutil.copy(checkpoints[2][0], bad)
    _without_pickle(bad)  # damage found only by reading it
    with pytest.raises(ValueError, match=r"checkpoints\[1\] \(.*bad.pt\) cannot be read: .*data.pkl"):
        export_gradients(model, [checkpoints[0], (str(bad), 1.0)], data, LOSS, progress=False)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors_sharded", "bin"])
def test_a_weight_file_of_a_folder_cut_short_is_named_with_its_checkpoint(setup, tmp_path, layout):
    """A truncated model.safetensors was a raw SafetensorError, a truncated pytorch_model.bin an OSError."""
    if layout.startswith("safetensors"):
        pytest.importorskip("safetensors")
    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        cut = folder / "pytorch_model.bin"
    else:
        from safetensors.torch import save_file

        shards = _shards(state, 2) if layout.endswith("sharded") else [state]
        weight_map = {}
        for i, shard in enumerate(shards):
            save_file(shard, str(folder / f"model-{i}.safetensors"))
            weight_map.update(dict.fromkeys(shard, f"model-{i}.safetensors"))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        cut = folder / f"model-{len(shards) - 1}.safetensors"
    _cut_in_half(cut)
    message = rf"checkpoints\[1\] \(.*checkpoint-5\) cannot be read \({re.escape(str(cut))}\): .*"
    with pytest.raises(ValueError, match=message + "cut short"):
        export_gradients(model, [checkpoints[1], (str(folder), 1.0)], data, LOSS, progress=False)
    if layout == "bin":
        torch.save(state, cut)
        _without_pickle(cut)
    else:  # a whole file its header describes, of a dtype safetensors does not know
        header = json.dumps({"w": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}).encode()
        cut.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(ValueError, match=message):
        export_gradients(model, [checkpoints[1], (str(folder), 1.0)], data, LOSS, progress=False)


def test_a_safetensors_header_nested_too_deep_is_named_with_its_checkpoint(setup, tmp_path):
    """Review114 F3: a hostile header of 100000 nested lists was a bare RecursionError."""
    pytest.importorskip("safetensors")
    model, checkpoints, data = setup
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    header = ('{"x": ' + deep + "}").encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    message = r"checkpoints\[1\] \(.*checkpoint-5\) cannot be read \(.*model.safetensors\): .*nested"
    with pytest.raises(ValueError, match=message):
        export_gradients(model, [checkpoints[1], (str(folder), 1.0)], data, LOSS, progress=False)


class NotATensor:
    pass


def test_unsafe_pickles_are_refused_by_weights_only(setup, tmp_path):
    model, _, data = setup
    torch.save({"state_dict": model.state_dict(), "extra": NotATensor()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match=r"weights_only=True.*NotATensor") as info:
        export_gradients(model, [(str(tmp_path / "unsafe.pt"), 1.0)], data, LOSS, progress=False)
    assert "not a torch.save file" not in str(info.value)


@pytest.mark.parametrize(
    "content, hint",
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 12345\n", "git lfs pull"),
        (b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", "NumPy .npy"),
        (b"not a checkpoint", "starts with b'not a checkpoint'"),
        (b"junk", "starts with b'junk'"),  # torch's unpickler raised struct.error on 'j' (a 4-byte opcode)
    ],
    ids=["lfs-pointer", "npy", "text", "short-text"],
)
def test_a_file_that_is_no_torch_save_file_is_named_so(setup, tmp_path, content, hint):
    model, _, data = setup
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        export_gradients(model, [(str(path), 1.0)], data, LOSS, progress=False)
    message = str(info.value)
    assert f"checkpoints[0] ({path}) is not a torch.save file" in message
    assert hint in message
    assert "weights_only" not in message  # no advice to load it unsafely


SAVE_FORMATS = {
    "zip": {},
    "legacy-protocol-2": {"pickle_protocol": 2, "_use_new_zipfile_serialization": False},
}


@pytest.mark.parametrize("how", list(SAVE_FORMATS))
def test_checkpoints_saved_in_each_loadable_format_give_the_in_memory_gradients(setup, tmp_path, how):
    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    path = tmp_path / "saved.pt"
    torch.save(state, path, **SAVE_FORMATS[how])
    from_path = export_gradients(model, [(str(path), 1.0)], data, LOSS, progress=False)
    from_dict = export_gradients(model, [(state, 1.0)], data, LOSS, progress=False)
    np.testing.assert_array_equal(from_path.matrices[0], from_dict.matrices[0])
    # an object weights_only=True refuses, in the same format: named as such, not as a foreign file
    torch.save({"state_dict": state, "extra": NotATensor()}, path, **SAVE_FORMATS[how])
    with pytest.raises(ValueError, match=r"weights_only=True.*NotATensor") as info:
        export_gradients(model, [(str(path), 1.0)], data, LOSS, progress=False)
    assert "not a torch.save file" not in str(info.value)
    assert "pickle_protocol" not in str(info.value)


@pytest.mark.parametrize("protocol", [0, 1, 4, 5])
@pytest.mark.parametrize("unsafe", [False, True], ids=["state_dict", "unsafe-object"])
def test_a_legacy_file_of_protocol_0_1_4_or_5_is_named_a_torch_save_file_weights_only_cannot_read(
    setup, tmp_path, protocol, unsafe
):
    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    path = tmp_path / "old.pt"
    obj = {"state_dict": state, "extra": NotATensor()} if unsafe else state
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
    # torch's magic number pickled as text (protocols 0, 1) or in a FRAME (4, 5): both refused by weights_only=True
    head = b"L119547037146038801333356L\n." if protocol < 2 else bytes([0x80, protocol, 0x95])
    assert path.read_bytes().startswith(head)
    with pytest.raises(ValueError) as info:
        export_gradients(model, [(str(path), 1.0)], data, LOSS, progress=False)
    message = str(info.value)
    assert "not a torch.save file" not in message
    assert message.startswith(f"checkpoints[0] ({path}) cannot be read with torch.load(weights_only=True)")
    assert f"legacy torch.save file of pickle_protocol {'0 or 1' if protocol < 2 else protocol}," in message
    assert "save it again with the default protocol" in message


@pytest.mark.parametrize(
    "checkpoints, message",
    [
        ("ckpt.pt", "sequence of"),
        ([], "empty"),
        ([("a.pt",)], "pair"),
        ([("a.pt", float("nan"))], "learning rate"),
        ([("a.pt", "0.1")], "learning rate"),
        ([(3, 0.1)], "state_dict or a path"),
    ],
)
def test_malformed_checkpoint_lists_are_refused(checkpoints, message):
    with pytest.raises((TypeError, ValueError), match=message):
        parse_checkpoints(checkpoints)


def test_zero_dimensional_tensor_and_array_rates_are_taken_as_floats(setup):
    model, checkpoints, data = setup
    (path, _), rates = (
        checkpoints[0],
        [torch.tensor(0.25), np.array(0.5, np.float32), torch.tensor(2, dtype=torch.int64)],
    )
    parsed = parse_checkpoints([(path, lr) for lr in rates])
    assert [entry.lr for entry in parsed] == [0.25, 0.5, 2.0] and all(type(e.lr) is float for e in parsed)
    plain = export_gradients(model, [(path, 0.25)], data, LOSS, progress=False)
    tensor = export_gradients(model, [(path, torch.tensor(0.25))], data, LOSS, progress=False)
    np.testing.assert_array_equal(tensor.matrices[0], plain.matrices[0])
    assert tensor.metadata == plain.metadata
    for bad, error in [
        (torch.tensor(True), TypeError),
        (torch.tensor([0.1]), TypeError),
        (torch.tensor(float("nan")), ValueError),
    ]:
        with pytest.raises(error, match=r"checkpoints\[0\]\[1\] \(learning rate\)"):
            parse_checkpoints([(path, bad)])


def test_non_state_dicts_are_refused(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="not a state_dict"):
        load_checkpoint({"weights": [1, 2]}, 0, model.state_dict())


def _shards(state: dict, n: int) -> list[dict]:
    keys = list(state)
    return [{k: state[k] for k in keys[i::n]} for i in range(n)]


@pytest.mark.parametrize("layout", ["safetensors", "safetensors_sharded", "bin", "bin_sharded"])
def test_save_pretrained_folders_give_the_state_dicts_gradients(setup, tmp_path, layout):
    from safetensors.torch import save_file

    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    folder = tmp_path / layout
    folder.mkdir()

    def save(tensors: dict, name: str) -> None:
        if name.endswith(".safetensors"):
            save_file(tensors, str(folder / name))
        else:
            torch.save(tensors, folder / name)

    stem, ext = ("model", "safetensors") if layout.startswith("safetensors") else ("pytorch_model", "bin")
    if layout.endswith("sharded"):
        weight_map = {}
        for i, shard in enumerate(_shards(state, 2)):
            name = f"{stem}-0000{i + 1}-of-00002.{ext}"
            save(shard, name)
            weight_map.update(dict.fromkeys(shard, name))
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save(state, f"{stem}.{ext}")
    (folder / "config.json").write_text("{}")
    want = export_gradients(model, [(state, 0.5)], data, LOSS, progress=False)
    got = export_gradients(model, [(str(folder), 0.5)], data, LOSS, progress=False)
    np.testing.assert_array_equal(got.matrices[0], want.matrices[0])


def test_a_trainer_checkpoint_folder_is_fingerprinted_by_its_weights_alone(setup, tmp_path):
    from safetensors.torch import save_file

    model, checkpoints, data = setup
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    save_file(torch.load(checkpoints[0][0], weights_only=True), str(folder / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text('{"global_step": 10}')

    def fingerprint() -> str:
        g = export_gradients(model, [(str(folder), 0.5)], data, LOSS, progress=False)
        return g.metadata["fingerprints"]["checkpoints"][0]

    before = fingerprint()
    (folder / "trainer_state.json").write_text('{"global_step": 10, "note": "edited"}')
    torch.save({"state": {}, "param_groups": [{"params": []}]}, folder / "optimizer.pt")
    assert fingerprint() == before


def test_folder_without_weights_and_missing_shard_are_clear_errors(setup, tmp_path):
    model, _, data = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="directory without model.safetensors, pytorch_model.bin"):
        export_gradients(model, [(str(tmp_path / "empty"), 1.0)], data, LOSS, progress=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"0.weight": "gone.safetensors"}}'
    )
    with pytest.raises(FileNotFoundError, match="no shard listed by its index at .*gone.safetensors"):
        export_gradients(model, [(str(tmp_path / "broken"), 1.0)], data, LOSS, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a sharded checkpoint index"):
        export_gradients(model, [(str(tmp_path / "bad"), 1.0)], data, LOSS, progress=False)


def test_tied_weights_left_out_of_a_checkpoint_are_taken_from_their_first_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    state = {k: v for k, v in model.state_dict().items() if k != "1.weight"}
    loaded = load_checkpoint(state, 0, model.state_dict(), skip={"1.weight"})
    assert list(loaded) == ["0.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['1.weight'\]"):
        load_checkpoint(state, 0, model.state_dict())


class _Tied(nn.Module):
    """An embedding whose weight the head shares, and a BatchNorm (an int64 buffer)."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(self.emb(x).mean(1)))


def _raw_digest(state: dict) -> str:
    """Independent reference of a state_dict's digest: names and NumPy contents, in name order."""
    return digest_arrays([a for k in sorted(state) for a in (np.frombuffer(k.encode(), np.uint8), state[k].numpy())])


def test_the_state_digest_is_of_the_weights_load_checkpoint_uses():
    torch.manual_seed(0)
    model = _Tied()
    reference, skip = model.state_dict(), tied_aliases(model)
    assert skip == {"head.weight"}
    full = {k: v.clone() for k, v in reference.items()}  # model.state_dict(): both tied names
    lean = {k: v for k, v in full.items() if k != "head.weight"}  # what save_pretrained keeps
    wide = {k: v.double() if v.is_floating_point() else v for k, v in lean.items()}  # cast by the load
    prefixed = {f"module.{k}": v for k, v in wide.items()}
    expected = _raw_digest(lean)  # a plain float32 dict keeps the digest older versions made
    assert expected == legacy_state_digest(lean, 0)
    for state in (full, lean, wide, prefixed, {"state_dict": full}):
        assert state_digest(state, 0, reference, skip) == expected
    # the reference's tensors give names, dtypes and shapes only: the state is not moved to their device
    assert state_digest(full, 0, _Tied().to("meta").state_dict(), skip) == expected
    differs = {**full, "head.weight": full["head.weight"] + 1}  # the model can hold one of the two
    with pytest.raises(ValueError, match=r"head.weight is tied to emb.weight in the model .* differs from it"):
        state_digest(differs, 0, reference, skip)
    for key in ("emb.weight", "norm.running_var"):
        assert state_digest({**lean, key: lean[key] + 1e-3}, 0, reference, skip) != expected
    assert state_digest({**lean, "norm.num_batches_tracked": torch.tensor(3)}, 0, reference, skip) != expected
    with pytest.raises(ValueError, match=r"checkpoints\[2\] \(state_dict\[2\]\) does not match .* \['emb.weight'\]"):
        state_digest({k: v for k, v in lean.items() if k != "emb.weight"}, 2, reference, skip)


def test_the_legacy_digest_is_of_the_state_dict_as_given():
    torch.manual_seed(0)
    full = {k: v.clone() for k, v in _Tied().state_dict().items()}
    prefixed = {f"module.{k}": v for k, v in full.items()}
    digests = {legacy_state_digest(s, 0) for s in (full, prefixed, {k: v.double() for k, v in full.items()})}
    assert len(digests) == 3 and legacy_state_digest(prefixed, 0) == _raw_digest(prefixed)
    assert legacy_state_digest({"model": prefixed}, 0) == _raw_digest(prefixed)


class _MaxNorm(nn.Module):
    """An embedding that renormalises its rows in place in every forward (max_norm)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot run this model")  # embedding_renorm_ is in place
def test_a_forward_writing_weights_in_place_leaves_the_callers_checkpoint_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = _MaxNorm()
    ids, targets = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    given = {k: 3 * v for k, v in model.state_dict().items()}  # rows past max_norm
    kept = {k: v.clone() for k, v in given.items()}
    torch.save(kept, tmp_path / "c.pt")
    from_dict = export_gradients(model, [(given, 1.0)], (ids, targets), LOSS, progress=False)
    for k in kept:
        torch.testing.assert_close(given[k], kept[k], rtol=0, atol=0)
    from_file = export_gradients(model, [(str(tmp_path / "c.pt"), 1.0)], (ids, targets), LOSS, progress=False)
    np.testing.assert_array_equal(from_dict.matrices[0], from_file.matrices[0])
    written = written_in_forward(model)
    assert written == {"emb.weight"}
    loaded = load_checkpoint(given, 0, model.state_dict(), written=written)
    copied = {k for k in given if loaded[k].data_ptr() != given[k].data_ptr()}
    assert copied == {"emb.weight"}  # only the weight the forward writes: no copy of the whole model


def _weighted(*weights: float) -> nn.Module:
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32), reduction="none")


def test_a_loss_with_other_class_weights_does_not_resume_a_store(setup, tmp_path):
    model, checkpoints, data = setup
    assert callable_identity(LOSS) == (  # a loss without tensors: the identity older versions recorded
        "torch.nn.modules.loss.CrossEntropyLoss: CrossEntropyLoss() "
        "{'ignore_index': -100, 'label_smoothing': 0.0, 'reduction': 'none'}"
    )
    assert callable_identity(_weighted(1, 1, 1, 1)) == callable_identity(_weighted(1, 1, 1, 1))
    assert callable_identity(_weighted(1, 1, 1, 1)) != callable_identity(_weighted(1, 5, 0.1, 2))
    pos = [nn.BCEWithLogitsLoss(pos_weight=torch.tensor(w, dtype=torch.bfloat16)) for w in ([2.0], [3.0])]
    assert callable_identity(pos[0]) != callable_identity(pos[1])  # buffers NumPy lacks the dtype of
    store = tmp_path / "store"
    for loss, store_path in ((_weighted(1, 5, 0.1, 2), store), (_weighted(1, 1, 1, 1), tmp_path / "same")):
        with ctrl_c_on_call(_Loop, "_rows", 2):
            export_gradients(
                model, checkpoints, data, _weighted(1, 1, 1, 1), store=store_path, batch_size=4, progress=False
            )
        if store_path == store:
            with pytest.raises(ValueError, match=r"other inputs: the loss function differs .*arrays\[weight\]="):
                export_gradients(model, checkpoints, data, loss, store=store_path, batch_size=4, progress=False)
        else:  # the same loss resumes, to the rows of an export in one go
            resumed = export_gradients(model, checkpoints, data, loss, store=store_path, batch_size=4, progress=False)
            whole = export_gradients(model, checkpoints, data, loss, progress=False)
            np.testing.assert_allclose(self_influence(resumed), self_influence(whole), rtol=1e-6)


class _TiedMaxNorm(nn.Module):
    """A head registered before the embedding whose weight it shares: loaded under 'head.weight'."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.emb = nn.Embedding(10, 4, max_norm=0.5)
        self.emb.weight = self.head.weight

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot run this model")  # embedding_renorm_ is in place
def test_a_tied_weight_written_in_place_is_copied_under_the_name_it_is_loaded_by():
    torch.manual_seed(0)
    model = _TiedMaxNorm()
    assert written_in_forward(model) == {"head.weight", "emb.weight"}
    ids, targets = torch.randint(0, 10, (6, 3)), torch.randint(0, 10, (6,))
    given = {k: 3 * v for k, v in model.state_dict().items()}  # rows past max_norm
    kept = {k: v.clone() for k, v in given.items()}
    first = export_gradients(model, [(given, 1.0)], (ids, targets), LOSS, progress=False)
    for k in kept:
        torch.testing.assert_close(given[k], kept[k], rtol=0, atol=0)
    again = export_gradients(model, [(given, 1.0)], (ids, targets), LOSS, progress=False)
    np.testing.assert_array_equal(again.matrices[0], first.matrices[0])


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot run this model")  # the buffer update is in place
@pytest.mark.parametrize("running_mean", [True, False])
@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_every_forward_starts_from_the_checkpoints_buffers(tmp_path, mode, running_mean):
    """A forward updating buffers changed the caller's checkpoint (calls 0 -> 12) and each export's
    gradients (relative difference 5e-2 between two identical exports)."""
    torch.manual_seed(0)
    model = RunningMean(running_mean)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    given = {k: v.clone() for k, v in model.state_dict().items()}
    kept = copy.deepcopy(given)
    own = copy.deepcopy(model.state_dict())
    torch.save(given, tmp_path / "c.pt")
    twin = copy.deepcopy(model).double()  # float64, the checkpoint's buffers for every example
    want = []
    for i in range(6):
        twin.load_state_dict(kept)
        loss = nn.functional.cross_entropy(twin(x[i : i + 1].double()), y[i : i + 1])
        want.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(twin.parameters()))]).numpy())
    want = np.stack(want)
    for source in (given, given, str(tmp_path / "c.pt")):
        g = export_gradients(model, [(source, 1.0), (source, 1.0)], (x, y), LOSS, mode=mode, progress=False)
        for c in range(2):
            if mode == "full":
                got = np.asarray(g.matrices[c])
            else:  # left (n, 3) x right (n, 4 + 1): the weight's gradient, the bias's in the last column
                outer = np.einsum("ni,nj->nij", g.left[c], g.right[c])
                got = np.concatenate([outer[:, :, :4].reshape(6, 12), outer[:, :, 4]], axis=1)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for k in kept:
        torch.testing.assert_close(given[k], kept[k], rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()[k], own[k], rtol=0, atol=0)


class _HasModule(nn.Module):
    """A submodule literally named 'module', as DataParallel's prefix."""

    def __init__(self):
        super().__init__()
        self.module = nn.Linear(3, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.module(x))


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod.module."])
def test_prefixes_are_dropped_from_a_model_with_a_submodule_named_module(prefix):
    """A wrapper's prefix was refused ('does not match the model') when some model key had it."""
    model = _HasModule()
    reference = model.state_dict()
    given = {prefix + k: torch.randn_like(v) for k, v in reference.items()}
    loaded = load_checkpoint(given, 0, reference)
    assert sorted(loaded) == sorted(reference)
    for k in reference:
        torch.testing.assert_close(loaded[k], given[prefix + k], rtol=0, atol=0)


@pytest.mark.parametrize("size", [0, 3])
def test_an_empty_checkpoint_file_is_refused_before_anything_is_exported(setup, tmp_path, size):
    """A 0-byte file (a failed copy, a full disk) was found only after the checkpoints before it were
    exported, as 'cannot be read: EOFError'."""
    model, checkpoints, data = setup
    cut = tmp_path / "cut.pt"
    cut.write_bytes(b"PK\x03"[:size])
    calls = []

    def loss(outputs, targets):
        calls.append(1)
        return LOSS(outputs, targets)

    with pytest.raises(
        ValueError, match=rf"checkpoints\[1\] \({re.escape(str(cut))}\) cannot be read: a file of {size} "
    ):
        export_gradients(model, [checkpoints[0], (str(cut), 1.0)], data, loss, progress=False)
    assert calls == []


def test_an_eof_error_without_a_message_is_worded(setup, monkeypatch):
    model, checkpoints, _ = setup

    def cut_short(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr(torch, "load", cut_short)
    with pytest.raises(ValueError, match=r"cannot be read: the file ends early: cut short"):
        load_checkpoint(checkpoints[0][0], 0, model.state_dict())


@pytest.mark.parametrize("kind", ["RuntimeError", "AcceleratorError"])
def test_a_device_failure_while_loading_is_not_blamed_on_the_file(setup, monkeypatch, kind):
    """A 'CUDA error: ...' from torch.load was reported as 'checkpoints[k] cannot be read (file)'."""
    model, checkpoints, _ = setup
    error = RuntimeError if kind == "RuntimeError" else getattr(torch, kind, None)
    if error is None:
        pytest.skip(f"torch {torch.__version__} has no {kind}")
    failure = RuntimeError("CUDA error: an illegal memory access was encountered")

    def fails(*args, **kwargs):
        raise failure if kind == "RuntimeError" else error("illegal memory access")

    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(error) as caught:
        load_checkpoint(checkpoints[0][0], 0, model.state_dict())
    assert not isinstance(caught.value, ValueError)


def _rows_of(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Reference: float64 per-example gradients of `model` after load_state_dict(state), one backward per row."""
    ref = copy.deepcopy(model).double()
    ref.load_state_dict(state)
    ref.eval()
    rows = []
    for i in range(len(x)):
        ref.zero_grad()
        row = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        nn.functional.cross_entropy(ref(row), y[i : i + 1].long(), reduction="sum").backward()
        rows.append(np.concatenate([p.grad.reshape(-1).numpy() for p in ref.parameters()]))
    return np.stack(rows)


def test_a_tied_copy_that_differs_from_its_first_name_in_a_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    model = _Tied()
    x, y = torch.randint(0, 5, (6, 4)), torch.randint(0, 5, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.randn(5, 3)  # an untied model's head
    torch.save(state, tmp_path / "untied.pt")
    for source, where in ((state, r"state_dict\[0\]"), (str(tmp_path / "untied.pt"), "untied.pt")):
        with pytest.raises(ValueError, match=rf"checkpoints\[0\] \(.*{where}\): head.weight is tied to emb.weight"):
            export_gradients(model, [(source, 1.0)], (x, y), LOSS, progress=False)
    # an equal copy (model.state_dict() holds both names), also in another dtype, is taken
    for equal in (state | {"head.weight": state["emb.weight"]}, state | {"head.weight": state["emb.weight"].double()}):
        g = export_gradients(model, [(equal, 1.0)], (x, y), LOSS, progress=False)
        np.testing.assert_allclose(g.matrices[0], _rows_of(model, equal, x, y), rtol=1e-5, atol=1e-6)


def test_a_batchnorm_checkpoint_without_num_batches_tracked_is_loaded_as_load_state_dict_does(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model[1].running_mean.uniform_(-1, 1)
    model.eval()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    old = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert not copy.deepcopy(model).load_state_dict(old).missing_keys  # torch's strict load takes it
    torch.save(old, tmp_path / "old.pt")
    for source in (old, str(tmp_path / "old.pt")):
        g = export_gradients(model, [(source, 1.0)], (x, y), LOSS, progress=False)
        np.testing.assert_allclose(g.matrices[0], _rows_of(model, old, x, y), rtol=1e-5, atol=1e-6)
    # other missing keys are still refused
    with pytest.raises(ValueError, match=r"missing keys \['1.running_var'\]"):
        export_gradients(model, [({k: v for k, v in old.items() if k != "1.running_var"}, 1.0)], (x, y), LOSS)


def test_an_integer_or_meta_tensor_for_a_float_parameter_is_a_clear_error(setup, tmp_path):
    model, _, data = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(iter(state))
    wrong = {**state, key: state[key].long()}
    torch.save(wrong, tmp_path / "ints.pt")
    for source, where in ((wrong, r"state_dict\[0\]"), (str(tmp_path / "ints.pt"), "ints.pt")):
        with pytest.raises(
            ValueError, match=rf"checkpoints\[0\] \(.*{where}\): {key} has dtype int64, the model's float32"
        ):
            export_gradients(model, [(source, 1.0)], data, LOSS, progress=False)
    with pytest.raises(ValueError, match=rf"checkpoints\[1\] \(state_dict\[1\]\): {key} has dtype bool"):
        other = {k: v.clone() for k, v in state.items()} | {key: state[key] > 0}
        export_gradients(model, [(state, 1.0), (other, 1.0)], data, LOSS, progress=False)
    meta = {k: v.to("meta") for k, v in state.items()}
    with pytest.raises(ValueError, match=rf"checkpoints\[0\] \(state_dict\[0\]\): {key} is a meta tensor \(no data"):
        export_gradients(model, [(meta, 1.0)], data, LOSS, progress=False)


def test_checkpoint_warnings_point_at_the_users_call():
    """The zero learning rate's warning names this file's line (review32 F3: it pointed into
    tracin/torch/export.py)."""
    model = nn.Linear(3, 2)
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.warns(UserWarning, match=r"\(learning rate\) is 0") as caught:
        export_gradients(
            model, [(model.state_dict(), 0.0)], data, nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    assert [w.filename for w in caught] == [__file__]


def _trained_live(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
    """Three checkpoints of SGD training saved as model.state_dict() (live views) and as clones."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    live, cloned = [], []
    for step in range(1, 7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 2 == 0:
            live.append((model.state_dict(), 0.5))
            cloned.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, 0.5))
    return live, cloned


def test_in_memory_checkpoints_that_are_views_of_the_live_model_are_refused():
    """review115 F1: model.state_dict() appended during training without a copy: every checkpoint was the
    final weights, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    live, cloned = _trained_live(model, x, y)
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\] and checkpoints\[1\] \(in-memory state_dicts\) hold the very same tensor for "
        r"0\.weight.*views of the model's live parameters.*v\.detach\(\)\.clone\(\).*copy\.deepcopy",
    ):
        export_gradients(model, live, (x, y), LOSS, progress=False)
    with pytest.raises(ValueError, match=r"checkpoints\[1\] and checkpoints\[2\] \(in-memory"):
        export_gradients(model, [cloned[0], *live[1:]], (x, y), LOSS, progress=False)
    # clones, the last one live (the model's current weights), and one object listed twice: each its own weights
    given = [cloned[0], cloned[1], live[2], (cloned[1][0], 0.1)]
    g = export_gradients(model, given, (x, y), LOSS, progress=False)
    for c, (state, _) in enumerate(given):
        np.testing.assert_allclose(g.matrices[c], _rows_of(model, state, x, y), rtol=1e-5, atol=1e-6)
    assert not np.allclose(g.matrices[0], g.matrices[2])


def test_checkpoints_sharing_only_frozen_tensors_are_taken():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    live, _ = _trained_live(model, x, y)
    base = {k: v for k, v in live[0][0].items() if k.startswith("0.")}  # the frozen base, shared (no copy)
    given = [(base | {k: v.clone() for k, v in live[0][0].items() if k.startswith("2.")}, 1.0) for _ in range(2)]
    g = export_gradients(model, given, (x, y), LOSS, progress=False)
    expected = _rows_of(copy.deepcopy(model).requires_grad_(True), given[0][0], x, y)[:, -18:]  # the trained layer's
    np.testing.assert_allclose(g.matrices[0], expected, rtol=1e-5, atol=1e-6)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 3)
        self.register_buffer("drop", torch.tensor([True, False, False, True, False, False]))

    def forward(self, x):
        return self.l(x * ~self.drop)


def test_a_checkpoint_tensor_of_another_dtype_is_converted_as_load_state_dict_does(tmp_path):
    """review115 F2: a uint8 mask for the model's bool buffer kept uint8 (~ became bitwise)."""
    torch.manual_seed(0)
    model = _Masked()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    state = {k: v.clone() for k, v in model.state_dict().items()} | {"drop": model.drop.to(torch.uint8)}
    torch.save(state, tmp_path / "uint8.pt")
    for source in (state, str(tmp_path / "uint8.pt")):
        g = export_gradients(model, [(source, 1.0)], (x, y), LOSS, progress=False)
        np.testing.assert_allclose(g.matrices[0], _rows_of(model, state, x, y), rtol=1e-5, atol=1e-6)
    complex_ = state | {"l.weight": state["l.weight"].to(torch.complex64)}
    with pytest.raises(ValueError, match=r"checkpoints\[0\] \(state_dict\[0\]\): l\.weight has dtype complex64, the"):
        export_gradients(model, [(complex_, 1.0)], (x, y), LOSS, progress=False)


class _Extra(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 3)

    def forward(self, x):
        return self.l(x)

    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        pass


@pytest.mark.parametrize("first", [True, False])
def test_a_model_whose_extra_state_is_no_tensor_takes_its_own_state_dict(first):
    """review115 F3: a raw AttributeError (extra state first) or 'is not a state_dict' (later)."""
    torch.manual_seed(0)
    model = _Extra() if first else nn.Sequential(nn.Linear(6, 6), _Extra())
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    g = export_gradients(model, [(state, 1.0), (model.state_dict(), 0.5)], (x, y), LOSS, progress=False)
    for c in range(2):
        np.testing.assert_allclose(g.matrices[c], _rows_of(model, state, x, y), rtol=1e-5, atol=1e-6)


def test_keys_under_one_other_prefix_are_named_with_how_to_drop_it():
    """review115 F4: a LightningModule's "model.", an AveragedModel's "module." with n_averaged, a base
    model's keys lacking the head model's prefix: one line naming the prefix (not stripped on its own)."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    lightning = {"model." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"under the prefix 'model\.'.*k\.removeprefix\('model\.'\)"):
        export_gradients(model, [(lightning, 1.0)], data, LOSS, progress=False)
    swa = AveragedModel(model)
    with pytest.raises(ValueError, match=r"prefix 'module\.'.*leaves out its other keys 'n_averaged'"):
        export_gradients(model, [(swa.state_dict(), 1.0)], data, LOSS, progress=False)
    head = nn.Sequential()
    head.add_module("body", model)
    with pytest.raises(ValueError, match=r"under 'body\.' without that prefix.*\{'body\.' \+ k: v"):
        export_gradients(head, [(model.state_dict(), 1.0)], data, LOSS, progress=False)
    mixed = lightning | {"other.0.weight": lightning.pop("model.0.weight")}  # no single prefix: no advice
    with pytest.raises(ValueError, match=r"unexpected keys \[[^]]*\]$"):
        export_gradients(model, [(mixed, 1.0)], data, LOSS, progress=False)


def test_a_refused_global_says_to_load_the_file_with_weights_only_false(tmp_path):
    """review115 F5: torch's own advice (allow-list argparse.Namespace) does not help tracin."""
    import argparse

    model = nn.Linear(3, 2)
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=1)}, tmp_path / "l.ckpt")
    with pytest.raises(ValueError, match=r"torch\.load\(path, weights_only=False\) and pass the state_dict"):
        export_gradients(model, [(str(tmp_path / "l.ckpt"), 1.0)], data, LOSS, progress=False)


def test_a_refused_global_in_the_optimizer_slot_says_to_pass_the_optimizer_state_it_holds(tmp_path):
    """review322 F2: a Lightning .ckpt given as the optimizer state, refused for its argparse.Namespace, was
    told to pass ckpt['state_dict'] (the model's weights) instead of its optimizer state."""
    import argparse

    model = nn.Linear(3, 2)
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    opt.step()
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    torch.save(ckpt | {"hyper_parameters": argparse.Namespace(lr=1)}, tmp_path / "l.ckpt")  # save_hyperparameters()
    with pytest.raises(
        ValueError, match=r"\(optimizer state\).*weights_only=False\) and pass the optimizer state it holds \(ckpt\["
    ) as refused:
        export_gradients(
            model, [(model.state_dict(), 0.1, str(tmp_path / "l.ckpt"))], data, LOSS, preconditioner="adam"
        )
    assert "ckpt['state_dict']" not in str(refused.value)


def test_a_tied_weight_held_under_its_second_name_only_is_named_with_its_twin(tmp_path):
    """review115 F6: safetensors.torch.save_model keeps one name per shared tensor (head.weight); the
    refusal said only "missing keys ['emb.weight']"."""
    model = _Tied()
    x, y = torch.randint(0, 5, (6, 4)), torch.randint(0, 5, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "emb.weight"}
    with pytest.raises(
        ValueError,
        match=r"missing keys \['emb\.weight'\], unexpected keys \[\]: emb\.weight \(as head\.weight\) tied in the "
        r"model .* under the second name only; .*\{\*\*state, 'emb\.weight': state\['head\.weight'\]\}",
    ):
        export_gradients(model, [(state, 1.0)], (x, y), LOSS, progress=False)
    given = state | {"emb.weight": state["head.weight"]}  # the advice: the export then takes it
    g = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False)
    np.testing.assert_allclose(g.matrices[0], _rows_of(model, given, x, y), rtol=1e-5, atol=1e-6)


class _LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update, as LoRA adds one: base(x) + x A^T B^T."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Parameter(0.3 * torch.randn(rank, d_in))
        self.lora_B = nn.Parameter(0.3 * torch.randn(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def _lora_model() -> tuple[nn.Module, dict]:
    """The model and a checkpoint of its trainable parameters alone (moved as by training), as LoRA / PEFT
    fine-tuning scripts save one."""
    torch.manual_seed(0)
    model = nn.Sequential(_LoRALinear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items() if k in trainable}
    return model, state


@pytest.mark.parametrize("given", ["state_dict", "file"])
def test_a_checkpoint_of_the_trainable_parameters_alone_is_refused_saying_how_to_complete_it(tmp_path, given):
    model, trainable = _lora_model()
    frozen = frozen_parameters(model)
    assert frozen == {"0.base.weight", "0.base.bias"}
    source = trainable
    if given == "file":
        source = str(tmp_path / "adapter.pt")
        torch.save(trainable, source)
    reference = model.state_dict()
    said = (
        r"missing keys \['0\.base\.weight', '0\.base\.bias'\], unexpected keys \[\]: the 2 missing keys are all "
        r"parameters the model has frozen \(requires_grad=False\) or buffers of modules whose parameters are all "
        r"frozen, so this checkpoint holds only the trainable ones .* if the frozen weights did not change during "
        r"training .*\{\*\*model\.state_dict\(\), \*\*trainable\}"
    )
    with pytest.raises(ValueError, match=said):
        load_checkpoint(source, 0, reference, frozen=frozen)
    if given == "state_dict":  # where an export refuses an in-memory checkpoint first
        with pytest.raises(ValueError, match=said):
            state_digest(trainable, 0, reference, frozen=frozen)
    with pytest.raises(ValueError, match=r"unexpected keys \[\]$"):  # the frozen names not known: no advice
        load_checkpoint(source, 0, reference)


def test_a_partial_checkpoint_lacking_a_trainable_weight_or_with_unexpected_keys_gets_no_frozen_advice():
    model, trainable = _lora_model()
    frozen, reference = frozen_parameters(model), model.state_dict()
    lacking = {k: v for k, v in trainable.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['0\.base\.weight', '0\.base\.bias', '2\.bias'\], [^:]*$"):
        load_checkpoint(lacking, 0, reference, frozen=frozen)
    extra = {**trainable, "2.scale": torch.ones(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \['2\.scale'\]$"):
        load_checkpoint(extra, 0, reference, frozen=frozen)


def test_the_advised_merge_with_the_models_frozen_weights_gives_the_checkpoints_gradients():
    model, trainable = _lora_model()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    merged = {**model.state_dict(), **trainable}
    g = export_gradients(model, [(merged, 1.0)], (x, y), LOSS, progress=False)
    ref = copy.deepcopy(model).double()  # float64 reference: one backward per row, trainable parameters only
    ref.load_state_dict({k: v.double() for k, v in merged.items()})
    params = [p for p in ref.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1], reduction="sum")
        rows.append(np.concatenate([t.reshape(-1).numpy() for t in torch.autograd.grad(loss, params)]))
    np.testing.assert_allclose(g.matrices[0], np.stack(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("given", ["state_dict", "file"])
def test_an_export_from_a_trainable_only_checkpoint_names_the_frozen_parameters(tmp_path, given):
    """The export passes frozen_parameters(model) to state_digest (in-memory) and load_checkpoint (files)."""
    model, trainable = _lora_model()
    source = trainable
    if given == "file":
        source = str(tmp_path / "adapter.pt")
        torch.save(trainable, source)
    data = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"unexpected keys \[\]: the 2 missing keys are all parameters the model has"):
        export_gradients(model, [(source, 1.0)], data, LOSS, progress=False)


def test_a_trainable_only_checkpoint_of_a_model_with_a_frozen_batchnorm_gets_the_advice_naming_its_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3), nn.BatchNorm1d(3))
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    model[1].register_buffer("scratch", torch.zeros(5), persistent=False)  # not in a state_dict: not named
    stats = {f"1.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert frozen_parameters(model) == {"0.weight", "0.bias", "1.weight", "1.bias", *stats}
    reference = model.state_dict()
    trainable = {k: v.clone() for k, v in reference.items() if k.startswith("2.") or k in ("3.weight", "3.bias")}
    with_stats = {**trainable, **{k: reference[k].clone() for k in reference if k.startswith("3.running")}}
    said = r"missing keys \['0\.weight', '0\.bias', '1\.weight', '1\.bias', '1\.running_mean', '1\.running_var'\]"
    with pytest.raises(ValueError, match=said + r", unexpected keys \[\]: the 6 missing keys are all .* BatchNorm"):
        load_checkpoint(with_stats, 0, reference, frozen=frozen_parameters(model))
    # the trained BatchNorm's statistics are not the frozen modules': lacking them, no advice
    with pytest.raises(ValueError, match=r"'3\.running_mean', '3\.running_var'\], unexpected keys \[\]$"):
        load_checkpoint(trainable, 0, reference, frozen=frozen_parameters(model))


class _PeftLinear(nn.Module):
    """A frozen Linear plus a low-rank update under an adapter's name, laid out as PEFT's LoRA layers are
    (base_layer, lora_A[name], lora_B[name]): state_dict names '<i>.lora_A.<name>.weight'."""

    def __init__(self, d_in: int, d_out: int, adapter: str = "default", rank: int = 2):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(d_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(rank, d_out, bias=False)})
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B[self.adapter](self.lora_A[self.adapter](x))


@pytest.mark.parametrize("adapter", ["default", "task1"])
def test_a_peft_adapter_state_whose_keys_lack_the_adapter_name_is_named_as_such(adapter):
    torch.manual_seed(0)
    model = nn.Sequential(_PeftLinear(6, 5, adapter), nn.Tanh(), _PeftLinear(5, 3, adapter))
    reference, frozen = model.state_dict(), frozen_parameters(model)
    # what PEFT's get_peft_model_state_dict saves: the adapter weights, the adapter's name dropped from the keys
    saved = {k.replace(f".{adapter}.", "."): v + 1 for k, v in reference.items() if ".lora_" in k}
    said = (
        r"unexpected keys \['0\.lora_A\.weight', '0\.lora_B\.weight', '2\.lora_A\.weight', '2\.lora_B\.weight'\]: "
        rf"its keys .* are the model's without the segment '{adapter}', and the other 4 missing keys are frozen in "
        r"the model\. This looks like a PEFT adapter file .* peft\.set_peft_model_state_dict\(model, adapter_state"
        + ("" if adapter == "default" else rf", adapter_name='{adapter}'")
        + r"\) .*\{k: v\.clone\(\) for k, v in model\.state_dict\(\)\.items\(\)\}"
    )
    with pytest.raises(ValueError, match=said):
        load_checkpoint(saved, 0, reference, frozen=frozen)
    with pytest.raises(ValueError, match=r"unexpected keys \[[^]]*\]$"):  # the frozen names not known: no advice
        load_checkpoint(saved, 0, reference)
    # a trainable key missing besides the adapter's: not a PEFT adapter file as such, no advice
    lacking = {k: v for k, v in saved.items() if k != "2.lora_B.weight"}
    lacking["2.lora_B.extra.weight"] = saved["2.lora_B.weight"]
    with pytest.raises(ValueError, match=r"unexpected keys \[[^]]*\]$"):
        load_checkpoint({k: v for k, v in saved.items() if k != "2.lora_B.weight"}, 0, reference, frozen=frozen)
    with pytest.raises(ValueError, match=r"unexpected keys \[[^]]*\]$"):
        load_checkpoint(lacking, 0, reference, frozen=frozen)
    # the advice followed (the adapter's weights put in the model's, as set_peft_model_state_dict does): accepted
    named = {
        k.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}."): v
        for k, v in saved.items()
    }
    model.load_state_dict(named, strict=False)
    loaded = load_checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0, reference, frozen=frozen)
    assert loaded.keys() == reference.keys()
    for key, t in named.items():
        torch.testing.assert_close(loaded[key], t, rtol=0, atol=0)


class _PeftEmbedding(nn.Module):
    """A frozen Embedding plus a low-rank update, laid out as PEFT's LoRA Embedding (ParameterDicts: the
    adapter's name is the last segment of the keys)."""

    def __init__(self, n: int, d: int, rank: int = 2):
        super().__init__()
        self.base_layer = nn.Embedding(n, d).requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(rank, n))})
        self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(d, rank))})


class _ModulesToSave(nn.Module):
    """A frozen module and its trained copy, laid out as PEFT's ModulesToSaveWrapper (a classifier head)."""

    def __init__(self, module: nn.Linear):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": nn.Linear(module.in_features, module.out_features)})


def test_peft_adapters_of_embeddings_and_modules_to_save_are_named_as_such():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"emb": _PeftEmbedding(10, 6), "q": _PeftLinear(6, 6), "classifier": _ModulesToSave(nn.Linear(6, 3))}
    )
    reference, frozen = model.state_dict(), frozen_parameters(model)
    # what PEFT saves: 'emb.lora_embedding_A', 'q.lora_A.weight', 'classifier.weight'
    saved = {
        k.replace(".modules_to_save.default.", ".").replace(".default.", ".").removesuffix(".default"): v + 1
        for k, v in reference.items()
        if ".lora_" in k or ".modules_to_save." in k
    }
    assert {"emb.lora_embedding_A", "q.lora_A.weight", "classifier.weight"} <= saved.keys()
    with pytest.raises(ValueError, match=r"without the segment 'default', and the other 5 missing keys are frozen"):
        load_checkpoint(saved, 0, reference, frozen=frozen)


def test_a_model_whose_keys_differ_from_the_checkpoints_by_a_wrapper_module_gets_no_peft_advice():
    """A checkpoint of an earlier version of the model (before a refactor put each block's layers under
    'net'), with a frozen embedding: the keys differ by one segment, but no PEFT adapter is involved."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    model = nn.ModuleDict(
        {"emb": nn.Embedding(5, 4).requires_grad_(False), "blocks": nn.ModuleList([Block(), Block()])}
    )
    reference, frozen = model.state_dict(), frozen_parameters(model)
    old = {k.replace(".net.", "."): v for k, v in reference.items()}  # 'blocks.0.0.weight'
    for checkpoint in (old, {k: v for k, v in old.items() if not k.startswith("emb.")}):
        with pytest.raises(ValueError, match=r"unexpected keys \[[^]]*\]$"):
            load_checkpoint(checkpoint, 0, reference, frozen=frozen)


def test_a_safetensors_file_without_the_safetensors_package_is_refused_before_any_checkpoint_is_read(
    tmp_path, monkeypatch
):
    safetensors = pytest.importorskip("safetensors.torch")
    model = nn.Linear(3, 2)
    path = tmp_path / "weights.bin"  # a safetensors file under another name: told by its first bytes
    safetensors.save_file(model.state_dict(), str(path))
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)
    said = rf"checkpoints\[1\] \({re.escape(str(path))}\) cannot be read: .*pip install safetensors"
    with pytest.raises(ImportError, match=said):
        parse_checkpoints([(model.state_dict(), 0.1), (str(path), 0.1)], model)
    with pytest.raises(ImportError, match=said.replace("1", "0", 1)):
        load_checkpoint(str(path), 0, model.state_dict())


def test_a_save_pretrained_folder_of_a_peft_adapter_is_named_as_such(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    torch.save({"0.lora_A.weight": torch.zeros(2, 6)}, folder / "adapter_model.bin")
    with pytest.raises(
        ValueError, match=r"It holds adapter_model\.bin, a PEFT adapter's weights alone: .*from_pretrained"
    ):
        load_checkpoint(str(folder), 0, nn.Linear(6, 2).state_dict())


def test_a_safetensors_file_is_read_as_safetensors_reads_it(setup, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, checkpoints, data = setup
    state = torch.load(checkpoints[1][0], weights_only=True)
    path = tmp_path / "step-1.safetensors"
    safetensors_torch.save_file(state, str(path))
    expected = safetensors_torch.load_file(str(path))
    loaded = load_checkpoint(str(path), 0, model.state_dict())
    assert loaded.keys() == expected.keys()
    for key, t in expected.items():
        torch.testing.assert_close(loaded[key], t, rtol=0, atol=0)
    from_file = export_gradients(model, [(str(path), 0.5)], data, LOSS, progress=False)
    from_dict = export_gradients(model, [(state, 0.5)], data, LOSS, progress=False)
    np.testing.assert_array_equal(from_file.matrices[0], from_dict.matrices[0])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=rf"\({re.escape(str(cut))}\) cannot be read: a safetensors file .* cut short"):
        parse_checkpoints([(str(cut), 1.0)], model)


@pytest.mark.parametrize(
    "like_a_pickle", [False, True]
)  # a JSON header of 128 bytes starts with b"\x80", as pickles do
def test_a_file_is_read_as_its_first_bytes_say_whatever_its_name(tmp_path, like_a_pickle):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {"w": torch.arange(3.0)}
    padded = (m for n in range(100) if safetensors_torch.save(state, m := {"k": "x" * n})[:1] == b"\x80")
    path = tmp_path / "model.pt"
    safetensors_torch.save_file(state, str(path), metadata=next(padded) if like_a_pickle else None)
    assert (path.read_bytes()[:1] == b"\x80") == like_a_pickle
    expected = safetensors_torch.load_file(str(path))
    loaded = load_checkpoint(str(path), 0, {k: torch.zeros_like(v) for k, v in state.items()})
    assert loaded.keys() == expected.keys()
    for key, t in expected.items():
        torch.testing.assert_close(loaded[key], t, rtol=0, atol=0)
    named = tmp_path / "torch.safetensors"  # a torch.save file, named otherwise
    torch.save({k: v + 1 for k, v in state.items()}, named)
    loaded = load_checkpoint(str(named), 0, state)
    for key, t in state.items():
        torch.testing.assert_close(loaded[key], t + 1, rtol=0, atol=0)
    folder = tmp_path / "checkpoint-3"  # where a torch.save file is expected: named a safetensors file
    folder.mkdir()
    shutil.copy(path, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"is not a torch\.save file \(it starts with .*: a safetensors file\)$"):
        load_checkpoint(str(folder), 0, state)


def test_a_file_safetensors_refuses_says_it_was_read_as_safetensors_by_its_first_bytes(tmp_path):
    pytest.importorskip("safetensors.torch")
    header = json.dumps({"w": {"dtype": "NOT_A_DTYPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "weights.pt"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))  # whole, as check_whole sees it
    refused = r"\(.*weights\.pt\) cannot be read: as a safetensors file \(its first bytes, .* make it one\): \S"
    with pytest.raises(ValueError, match=refused):
        load_checkpoint(str(path), 0, {"w": torch.zeros(1)})


def _rot_one_byte(path, record: str) -> None:
    """Flips the bits of one byte in the middle of a torch.save archive's `record` (its name's end),
    leaving the archive's structure whole: bit rot that only the record's CRC-32 shows."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def _adam_state(model: nn.Module, data: tuple) -> dict:
    """copy.deepcopy(optimizer.state_dict()) of an Adam over model.parameters() after two steps."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        LOSS(model(data[0]), data[1]).mean().backward()
        opt.step()
    return copy.deepcopy(opt.state_dict())


def test_a_bit_rotted_torch_save_record_is_refused_naming_it_before_any_checkpoint_is_exported(setup, tmp_path):
    """review142 F2: torch.load checks no CRC, so a flipped byte of a weight loaded silently."""
    model, checkpoints, data = setup
    bad = tmp_path / "bad.pt"
    shutil.copy(checkpoints[2][0], bad)
    _rot_one_byte(bad, "data/0")
    with pytest.raises(
        ValueError, match=r"checkpoints\[2\] \(.*bad.pt\) cannot be read: .*record '.*data/0' is damaged"
    ):
        export_gradients(model, [*checkpoints[:2], (str(bad), 1.0)], data, LOSS, progress=False)
    folder = tmp_path / "checkpoint-5"  # a shard of a folder, and an optimizer.pt
    folder.mkdir()
    state = torch.load(checkpoints[0][0], weights_only=True)
    weight_map = {}
    for i, shard in enumerate(_shards(state, 2)):
        torch.save(shard, folder / f"pytorch_model-{i}.bin")
        weight_map.update(dict.fromkeys(shard, f"pytorch_model-{i}.bin"))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _rot_one_byte(folder / "pytorch_model-1.bin", "data/0")
    with pytest.raises(ValueError, match=r"checkpoints\[0\] .*cannot be read \(.*pytorch_model-1.bin\): .*damaged"):
        parse_checkpoints([(str(folder), 1.0)], model)
    torch.save(_adam_state(model, data), tmp_path / "optimizer.pt")
    _rot_one_byte(tmp_path / "optimizer.pt", "data/0")
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\] \(optimizer state\) cannot be read .*damaged"):
        parse_checkpoints([(checkpoints[0][0], 1.0, str(tmp_path / "optimizer.pt"))], model)


def test_a_torch_save_file_written_without_crcs_is_read(setup, tmp_path):
    """torch.serialization.set_crc32_options(False) writes 0 for every CRC: not damage."""
    model, checkpoints, data = setup
    state = torch.load(checkpoints[1][0], weights_only=True)
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "no_crc.pt")
    finally:
        torch.serialization.set_crc32_options(before)
    with zipfile.ZipFile(tmp_path / "no_crc.pt") as z:
        assert z.testzip() is not None  # what a zip reader makes of it
    got = export_gradients(model, [(str(tmp_path / "no_crc.pt"), 1.0)], data, LOSS, progress=False)
    want = export_gradients(model, [(state, 1.0)], data, LOSS, progress=False)
    np.testing.assert_array_equal(got.matrices[0], want.matrices[0])


def _set(path: tuple, value) -> callable:
    def change(state: dict) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


_GROUP = ("param_groups", 0)
_BAD_FIELDS = [  # review142 F3 (ranges) and F5 (types): each was rows of 0 or NaN, or a bare Python error
    (_set((*_GROUP, "betas"), (0.9, 1.0)), r"param_groups\[0\]\['betas'\]\[1\] must be in \[0, 1\), got 1.0"),
    (_set((*_GROUP, "betas"), (0.9, 1.5)), r"\['betas'\]\[1\] must be in \[0, 1\), got 1.5"),
    (_set((*_GROUP, "betas"), (float("nan"), 0.99)), r"\['betas'\]\[0\] must be in \[0, 1\), got nan"),
    (_set((*_GROUP, "betas"), (-0.1, 0.99)), r"\['betas'\]\[0\] must be in \[0, 1\), got -0.1"),
    (_set((*_GROUP, "eps"), float("nan")), r"param_groups\[0\]\['eps'\] must be a finite number >= 0, got nan"),
    (_set((*_GROUP, "eps"), -1e-8), r"\['eps'\] must be a finite number >= 0, got -1e-08"),
    (_set((*_GROUP, "eps"), float("inf")), r"\['eps'\] must be a finite number >= 0, got inf"),
    (_set((*_GROUP, "lr"), float("nan")), r"param_groups\[0\]\['lr'\] must be a finite number >= 0, got nan"),
    (_set((*_GROUP, "lr"), -0.1), r"\['lr'\] must be a finite number >= 0, got -0.1"),
    (_set((*_GROUP, "lr"), "fast"), r"\['lr'\] must be a number, got 'fast'"),
    (_set((*_GROUP, "betas"), ("a", "b")), r"\['betas'\]\[0\] must be a number, got 'a'"),
    (_set((*_GROUP, "betas"), (0.9,)), r"\['betas'\] must be 2 numbers \(beta1, beta2\), got \(0.9,\)"),
    (_set((*_GROUP, "betas"), 0.9), r"\['betas'\] must be 2 numbers"),
    (_set((*_GROUP, "eps"), None), r"\['eps'\] must be a number, got None"),
    (_set((*_GROUP, "eps"), True), r"\['eps'\] must be a number, got True"),
    (_set((*_GROUP, "params"), 5), r"param_groups\[0\]\['params'\] must be a list of parameter ids"),
    (_set((*_GROUP, "param_names"), ["0.weight"]), r"param_groups\[0\] has 6 params and 1 param_names"),
    (_set((*_GROUP, "param_names"), [1, 2, 3, 4, 5, 6]), r"\['param_names'\] must be a list of parameter names"),
    (_set(("state", 0, "step"), "two"), r"the step of the state's entry 0 must be a number .*got 'two'"),
    (_set(("state", 0, "step"), torch.tensor([2.0, 3.0])), r"step of the state's entry 0 .*tensor of shape \(2,\)"),
]


@pytest.mark.parametrize("change, message", _BAD_FIELDS, ids=range(len(_BAD_FIELDS)))
def test_bad_optimizer_settings_and_fields_are_named_with_the_group_and_key(setup, tmp_path, change, message):
    model, checkpoints, data = setup
    state = _adam_state(mlp(), data)
    change(state)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\] \(optimizer state\): .*" + message):
        parse_checkpoints([(checkpoints[0][0], 0.1, state)], model)
    torch.save(state, tmp_path / "opt.pt")
    where = re.escape(f"checkpoints[0][2] (optimizer state) ({tmp_path / 'opt.pt'}): ")
    with pytest.raises(ValueError, match=where + ".*" + message):
        export_gradients(
            model,
            [(checkpoints[0][0], 0.1, str(tmp_path / "opt.pt"))],
            data,
            LOSS,
            preconditioner="adam",
            progress=False,
        )


def test_damaged_moments_in_an_optimizer_state_file_are_named_with_its_path(setup, tmp_path):
    """A NaN first moment found once the export reads the file names the file, not only its position."""
    model, checkpoints, data = setup
    state = _adam_state(model, data)
    state["state"][0]["exp_avg"][0, 0] = float("nan")
    torch.save(state, tmp_path / "opt.pt")
    where = re.escape(f"checkpoints[0][2] (optimizer state) ({tmp_path / 'opt.pt'}): the first moment of 0.weight")
    with pytest.raises(ValueError, match=where + " has 1 NaN or infinite entries"):
        export_gradients(
            model,
            [(checkpoints[0][0], 0.1, str(tmp_path / "opt.pt"))],
            data,
            LOSS,
            preconditioner="adam",
            progress=False,
        )


def test_a_step_of_a_named_parameter_is_named_by_it_and_tensor_settings_are_taken(setup):
    model, checkpoints, data = setup
    state = _adam_state(mlp(), data)
    state["param_groups"][0]["param_names"] = [n for n, _ in model.named_parameters()]
    state["param_groups"][0]["lr"] = torch.tensor(0.01)  # capturable optimizers keep tensors
    state["param_groups"][0]["betas"] = (torch.tensor(0.9), torch.tensor(0.999))
    parse_checkpoints([(checkpoints[0][0], 0.1, state)], model)
    state["state"][2]["step"] = "two"
    with pytest.raises(ValueError, match=r"the step of parameter 2.weight must be a number"):
        parse_checkpoints([(checkpoints[0][0], 0.1, state)], model)


def test_a_safetensors_offset_beyond_any_integer_is_named_with_its_checkpoint(setup, tmp_path):
    """review142 F6: data_offsets [0, 1e400] was a bare OverflowError naming no file."""
    pytest.importorskip("safetensors")
    model, checkpoints, data = setup
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}'
    (tmp_path / "inf.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    message = r"checkpoints\[1\] \(.*inf.safetensors\) cannot be read: a safetensors file whose header cannot be read"
    with pytest.raises(ValueError, match=message):
        export_gradients(model, [checkpoints[0], (str(tmp_path / "inf.safetensors"), 1.0)], data, LOSS, progress=False)


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
def test_a_stale_copy_of_a_weight_in_another_shard_than_its_index_gives_is_left_out(setup, tmp_path, ext):
    """review142 F7: a shard also holding a weight the index assigns to another (left by a save with other
    sharding) overrode it: the rows were of the stale weight."""
    if ext == "safetensors":
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file
    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    stale = torch.load(checkpoints[2][0], weights_only=True)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    first, second = _shards(state, 2)
    key = next(iter(first))
    second = {**second, key: stale[key]}  # the index gives key to the first shard
    weight_map = {}
    for i, shard in enumerate((first, second)):
        name = f"model-{i}.{ext}"
        save_file(shard, str(folder / name)) if ext == "safetensors" else torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard if k in (first if i == 0 else state) and k not in weight_map})
    assert weight_map[key] == f"model-0.{ext}"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = export_gradients(model, [(str(folder), 0.5)], data, LOSS, progress=False)
    want = export_gradients(model, [(state, 0.5)], data, LOSS, progress=False)
    np.testing.assert_array_equal(got.matrices[0], want.matrices[0])


def test_a_refused_shard_of_a_pytorch_model_bin_folder_is_named(setup, tmp_path):
    """review142 F8: the refusal named the folder alone, not which of its shards holds the global."""
    model, checkpoints, data = setup
    state = torch.load(checkpoints[0][0], weights_only=True)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    weight_map = {}
    for i, shard in enumerate(_shards(state, 2)):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({**shard, "extra": NotATensor()} if i else shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shard = re.escape(str(folder / "pytorch_model-00002-of-00002.bin"))
    message = rf"checkpoints\[0\] \(.*checkpoint-5\) cannot be read \({shard}\) with torch.load\(weights_only=True\)"
    with pytest.raises(ValueError, match=message + ".*NotATensor"):
        export_gradients(model, [(str(folder), 1.0)], data, LOSS, progress=False)


def test_an_optimizer_state_file_saved_again_between_its_digest_and_its_read_is_refused(tmp_path):
    """fr142: the moments are read long after the state file's digest; a re-save in between gave rows of
    the new state under the old fingerprint. The file's stat from before the digest is compared once the
    file is read."""
    from tracin.torch.checkpoints import OptimizerState

    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    state = OptimizerState(path, 0, model)
    state.digest()
    optimizer.step()
    optimizer.step()
    torch.save({**optimizer.state_dict(), "extra": torch.zeros(100)}, path)  # a new file of another size
    with pytest.raises(ValueError, match=r"changed while it was exported .* export again"):
        state._load()
    fresh = OptimizerState(path, 0, model)
    fresh.digest()
    assert fresh._load()["state"]  # unchanged since its digest: read


def _adam_stepped(model: nn.Module, data: tuple) -> tuple[torch.optim.Optimizer, dict]:
    """An Adam (lr 1e-2) over `model` stepped twice on `data`, and a copy of the weights after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        LOSS(model(data[0]), data[1]).sum().backward()
        optimizer.step()
    return optimizer, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_an_optimizer_state_beside_the_model_in_one_general_checkpoint_file_is_found(setup, tmp_path):
    """torch.save({"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}) (PyTorch's general
    checkpoint recipe) given as both the weights and the optimizer state: the same rows as the two apart."""
    model, _, data = setup
    optimizer, weights = _adam_stepped(model, data)
    path = tmp_path / "general.pt"
    torch.save({"model_state_dict": weights, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3}, path)
    together = export_gradients(model, [(path, 1e-2, path)], data, LOSS, progress=False, preconditioner="adam")
    apart = export_gradients(
        model, [(weights, 1e-2, optimizer.state_dict())], data, LOSS, progress=False, preconditioner="adam"
    )
    np.testing.assert_array_equal(together.matrices[0], apart.matrices[0])
    loaded = torch.load(path, weights_only=True)  # the same general checkpoint, in memory
    in_memory = export_gradients(
        model, [(loaded["model_state_dict"], 1e-2, loaded)], data, LOSS, progress=False, preconditioner="adam"
    )
    np.testing.assert_array_equal(in_memory.matrices[0], apart.matrices[0])
    torch.save({"model": weights, "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"nor a dict holding one under 'optimizer'.*its keys: \['epoch', 'model'\]"):
        export_gradients(model, [(path, 1e-2, path)], data, LOSS, progress=False, preconditioner="adam")


def test_a_lightning_checkpoints_one_optimizer_state_is_taken_and_several_are_told_apart(setup, tmp_path):
    """A Lightning .ckpt ({"state_dict": ..., "optimizer_states": [state], ...}) given as the optimizer state
    was refused, listing its keys without advice: its one optimizer state is taken (file or dict), as a
    general checkpoint's "optimizer" is; of several, the message says to pass one."""
    model, _, data = setup
    optimizer, weights = _adam_stepped(model, data)
    state = copy.deepcopy(optimizer.state_dict())
    ckpt = {"epoch": 0, "global_step": 2, "state_dict": {"model." + k: v for k, v in weights.items()}}
    path = tmp_path / "epoch=0-step=2.ckpt"
    torch.save({**ckpt, "optimizer_states": [state], "lr_schedulers": []}, path)

    def rows(source) -> np.ndarray:
        got = export_gradients(model, [(weights, 1e-2, source)], data, LOSS, progress=False, preconditioner="adam")
        return np.asarray(got.matrices[0])

    apart = rows(state)
    np.testing.assert_array_equal(rows(path), apart)
    np.testing.assert_array_equal(rows(torch.load(path, weights_only=True)), apart)
    for listed, said in (
        (
            [state, copy.deepcopy(state)],
            r"lists 2 optimizer states: pass the Adam one, ckpt\['optimizer_states'\]\[i\]",
        ),
        ([], r"is empty: the checkpoint holds no optimizer state$"),
    ):
        with pytest.raises(
            ValueError,
            match=r"its keys: .*'optimizer_states'.*\. Its 'optimizer_states' \(a Lightning checkpoint's\) " + said,
        ):
            rows({**ckpt, "optimizer_states": listed})


class SharedScale(nn.Module):
    """One buffer registered under two names (a.scale, b.scale): a tied buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        scale = torch.linspace(0.5, 2.0, 4)
        self.a.register_buffer("scale", scale)
        self.b.register_buffer("scale", scale)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x * self.a.scale)) * self.b.scale)


def test_a_buffer_tied_under_two_names_is_loaded_under_its_first_and_exported_exactly():
    """state_dict() holds a tied buffer under both names; the load passes it under its first only (r297 M20: both
    went to functional_call, which refused them as 'multiple values for keys ... which are tied'), and a
    checkpoint whose two copies differ is refused naming them."""
    model = SharedScale()
    x, y = classification_data(6, seed=3, features=4, classes=3)
    state = model.state_dict()
    assert {"a.scale", "b.scale"} <= set(state) and tied_aliases(model) == {"b.scale"}
    got = export_gradients(model, [(state, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    wide = copy.deepcopy(model).double()
    want = []
    for i in range(len(y)):
        loss = LOSS(wide(x[i : i + 1].double()), y[i : i + 1]).sum()
        want.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(wide.parameters()))]).numpy())
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.stack(want), rtol=1e-5, atol=1e-7)
    state = {**state, "b.scale": state["b.scale"] * 3}
    with pytest.raises(ValueError, match=r"b\.scale is tied to a\.scale in the model .* differs from it"):
        export_gradients(model, [(state, 1.0)], (x, y), LOSS, progress=False)


# review328: optimizer states a DCP user ends up with


def _dcp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    data = (torch.randn(6, 4), torch.randint(0, 2, (6,)))
    return model, data, nn.CrossEntropyLoss(reduction="none")


def test_a_never_stepped_get_optimizer_state_dict_is_refused() -> None:
    """get_optimizer_state_dict initialises an optimizer that has not stepped by a zero-gradient step: step 1,
    every moment 0; "adam" divided every gradient by eps (x1e8) with only the unseen-token warnings."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, data, loss = _dcp_setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.distributed uninitialised: single process
        state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert float(state["state"]["0.weight"]["step"]) == 1 and not state["state"]["0.weight"]["exp_avg_sq"].any()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\].*every Adam moment.*is 0.*get_optimizer_state_dict"):
        export_gradients(model, [(weights, 1e-3, state)], data, loss, preconditioner="adam")


def test_a_dcp_folder_is_named_with_how_to_read_it(tmp_path) -> None:
    """A torch.distributed.checkpoint folder given as the weights or the optimizer state was told only that
    model.safetensors / optimizer.pt were missing: it is named, with the two ways to read it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, data, loss = _dcp_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp_path / "step1"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"checkpoints\[0\] .*torch\.distributed\.checkpoint \(DCP\) folder.*dcp_to_torch_save"
    ):
        export_gradients(model, [(tmp_path / "step1", 1e-3)], data, loss)
    with pytest.raises(
        ValueError, match=r"checkpoints\[0\]\[2\].*torch\.distributed\.checkpoint \(DCP\) folder.*dcp\.load"
    ):
        export_gradients(model, [(weights, 1e-3, tmp_path / "step1")], data, loss, preconditioner="adam")
