"""What a resume compares of the model (model_digest): module attributes, non-persistent buffer values
and forward code, besides the structure; how a change is named; stores recording the structure alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from drifted_states import drifted_states
from interrupts import FailingBatches, Killed
from tracin._export.resume import model_changes
from tracin.torch import export_gradients
from tracin.torch.model_fingerprint import model_digest


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x * self.factor


class Net(nn.Module):
    def __init__(self, temperature=1.0):
        super().__init__()
        self.l1, self.l2, self.scale = nn.Linear(6, 8), nn.Linear(8, 3), Scale()
        self.temperature = temperature
        self.register_buffer("mask", torch.ones(8), persistent=False)
        self.model_path = "/somewhere"  # where it was read from: not compared
        self._calls = 0  # private: not compared

    def forward(self, x):
        self._calls += 1
        return self.l2(self.scale(torch.tanh(self.l1(x))) * self.mask) / self.temperature


class Edited(Net):
    """Net with another forward, named as Net (the same script edited)."""

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)) * self.mask) / self.temperature


Edited.__qualname__ = Edited.__name__ = "Net"

LOSS = nn.CrossEntropyLoss(reduction="none")


def _problem():
    torch.manual_seed(0)
    model = Net()
    states = drifted_states(model, 2)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    return [(states[0], 0.5), (states[1], 0.25)], [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]


def _export(model, checkpoints, batches, store):
    return export_gradients(model, checkpoints, batches, LOSS, store=store, progress=False)


def _interrupted(checkpoints, batches, store: Path) -> None:
    # pass 1 counts the rows, pass 2 fingerprints the data, pass 3 (checkpoint 0) dies after one batch
    with pytest.raises(Killed):
        _export(Net(), checkpoints, FailingBatches(batches, on=3, after=1), store)


def _rows(store: Path) -> list[np.ndarray]:
    return [np.load(f) for f in sorted(store.glob("checkpoint_*.npy"))]


def _changed(**what) -> Net:
    model = Net(what.get("temperature", 1.0))
    if "mask" in what:
        model.mask[:3] = 0
    if "factor" in what:
        model.scale.factor = what["factor"]
    return model


@pytest.mark.parametrize(
    "model, message",
    [
        (_changed(temperature=2.0), r"the model's attributes differ: temperature 1.0 there, 2.0 here"),
        (_changed(factor=0.5), r"the model.s attributes differ: scale.factor 1.0 there, 0.5 here"),
        (_changed(mask=True), r"the model.s non-persistent buffer values \(in no checkpoint\) differ: mask"),
        (Edited(), r"the model.s module classes. forward code differs: .*test_model_fingerprint.Net \(edited"),
    ],
    ids=["attribute", "submodule attribute", "buffer", "forward"],
)
def test_a_resume_with_a_changed_model_is_refused_naming_the_change(tmp_path, model, message):
    checkpoints, batches = _problem()
    _interrupted(checkpoints, batches, tmp_path / "s")
    with pytest.raises(ValueError, match=r"holds gradients exported from other inputs: " + message):
        _export(model, checkpoints, batches, tmp_path / "s")
    # the unchanged model resumes, bit-identical to an export never interrupted
    model = Net()
    model.model_path, model._calls = "/elsewhere", 7
    assert _export(model, checkpoints, batches, tmp_path / "s").complete
    _export(Net(), checkpoints, batches, tmp_path / "whole")
    for a, b in zip(_rows(tmp_path / "s"), _rows(tmp_path / "whole"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_store_recording_the_structure_alone_resumes_with_the_same_structure(tmp_path):
    checkpoints, batches = _problem()
    _interrupted(checkpoints, batches, tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    doc = json.loads(manifest.read_text())
    recorded = doc["metadata"]["fingerprints"]["model"]
    assert recorded == json.loads(json.dumps(model_digest(Net())))
    doc["metadata"]["fingerprints"]["model"] = recorded["structure"]  # as versions before settings wrote it
    manifest.write_text(json.dumps(doc))
    # its settings were not recorded: a changed temperature cannot be told (as those versions did)
    resumed = _export(_changed(temperature=2.0), checkpoints, batches, tmp_path / "s")
    assert resumed.complete and resumed.metadata["fingerprints"]["model"] == recorded["structure"]
    _interrupted(checkpoints, batches, tmp_path / "t")
    doc = json.loads((tmp_path / "t" / "manifest.json").read_text())
    doc["metadata"]["fingerprints"]["model"] = recorded["structure"]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(doc))
    edited = Net()
    edited.scale = nn.Identity()  # the same parameters, another structure
    with pytest.raises(ValueError, match=r"other inputs: the model differs \(module types"):
        _export(edited, checkpoints, batches, tmp_path / "t")


def test_model_digest_covers_settings_buffers_and_code_not_paths_private_or_training():
    base = model_digest(Net())
    assert base["settings"]["temperature"] == "1.0" and base["settings"]["scale.factor"] == "1.0"
    assert "model_path" not in base["settings"] and "_calls" not in base["settings"]
    assert not any(k.endswith("training") for k in base["settings"])
    assert set(base["buffers"]) == {"mask"}  # persistent buffers are in the checkpoints
    assert {k.rpartition(".")[2] for k in base["code"]} == {"Net", "Scale"}  # torch's own classes left out
    model = Net()
    model.eval()
    model._calls = 3
    model.gradient_checkpointing = True  # as transformers' gradient_checkpointing_enable() sets it: same gradients
    model(torch.zeros(1, 6))
    assert model_digest(model) == base
    for changed in (_changed(temperature=0.5), _changed(mask=True), Edited()):
        assert model_digest(changed)["structure"] == base["structure"] and model_digest(changed) != base
    assert model_changes(base["structure"], base) == [] and model_changes(base, base) == []
    other = {**base, "settings": {**base["settings"], "extra": "3"}}
    assert model_changes(base, other)[0].startswith("the model's attributes differ: extra (none) there, 3 here")
    rewritten = {**base, "buffers": {"mask": "0" * 32}}
    assert "resume in a fresh process, with the model as loaded" in model_changes(base, rewritten)[0]
    bumped = {**base, "code": {k: "3.99:" + v.partition(":")[2] for k, v in base["code"].items()}}
    assert "this is Python 3.99" in model_changes(base, bumped)[0]


def test_model_digest_leaves_out_folders_and_records_parameter_dtypes():
    """A cache_dir (where files were read or kept) is not a setting, as model_path is not; a parameter's
    dtype is part of the structure (a float64 copy of the model computes other gradients)."""
    torch.manual_seed(0)
    here, there = Net(), Net()
    here.cache_dir, there.cache_dir = "/scratch/a", "/scratch/b"
    assert "cache_dir" not in model_digest(here)["settings"] and model_digest(here) == model_digest(there)
    wide = Net()
    wide.l1.double()  # l1's parameters only: no buffer changes dtype
    assert model_digest(wide)["structure"] != model_digest(Net())["structure"]


class WithTensorAndActivation(nn.Module):
    """A plain tensor attribute (not a buffer) and an activation function held as an attribute."""

    def __init__(self, scale: float = 2.0, act=torch.tanh):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.scale, self.act = torch.tensor(scale), act

    def forward(self, x):
        return self.l2(self.act(self.l1(x)) * self.scale)


@pytest.mark.parametrize(
    "changed, message",
    [
        (dict(scale=3.0), r"attributes differ: scale tensor float32 \(\) \w+ there, tensor float32 \(\) \w+ here"),
        (dict(act=torch.sigmoid), r"attributes differ: act function torch\.\S*tanh there, function torch\.\S*sigmoid"),
    ],
    ids=["tensor attribute", "function attribute"],
)
def test_a_changed_tensor_or_function_attribute_refuses_the_resume(tmp_path, changed, message):
    """review147 F4: a plain tensor attribute (self.scale = torch.tensor(2.0)) or a function attribute (self.act =
    torch.tanh) changed between an interrupted export and its resume silently returned the old store's rows (max
    |diff| 1.8 and 1.4 against a fresh export); now the resume is refused naming the attribute."""
    torch.manual_seed(0)
    model = WithTensorAndActivation()
    states = drifted_states(model, 2)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    checkpoints, batches = [(states[0], 0.5), (states[1], 0.25)], [(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
    with pytest.raises(Killed):
        _export(WithTensorAndActivation(), checkpoints, FailingBatches(batches, on=3, after=1), tmp_path / "s")
    with pytest.raises(ValueError, match=message):
        _export(WithTensorAndActivation(**changed), checkpoints, batches, tmp_path / "s")
    assert _export(WithTensorAndActivation(), checkpoints, batches, tmp_path / "s").complete


class KeepsAttention(WithTensorAndActivation):
    """Stores a tensor for inspection in its forward (self.attn), absent until the model first runs."""

    def forward(self, x):
        hidden = self.act(self.l1(x))
        self.attn = hidden.detach()
        return self.l2(hidden * self.scale)


def test_a_tensor_the_forward_stores_does_not_refuse_a_resume_in_the_same_process(tmp_path):
    """fr147: a public tensor attribute set by forward (none before the first run, one after) refused the resume of
    an export interrupted in the same process; a tensor attribute on one side only is not a change of the model."""
    torch.manual_seed(0)
    model = KeepsAttention()
    states = drifted_states(model, 2)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    checkpoints, batches = [(states[0], 0.5), (states[1], 0.25)], [(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
    with pytest.raises(Killed):
        _export(model, checkpoints, FailingBatches(batches, on=3, after=1), tmp_path / "s")
    assert hasattr(model, "attn")
    resumed = _export(model, checkpoints, batches, tmp_path / "s")
    fresh = _export(KeepsAttention(), checkpoints, batches, tmp_path / "fresh")
    assert resumed.complete and fresh.complete
    got, want = _rows(tmp_path / "s"), _rows(tmp_path / "fresh")
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
