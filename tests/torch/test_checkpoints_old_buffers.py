"""Checkpoints saved before a model's buffers became non-persistent (review201 F3): BERT's
embeddings.position_ids and GPT-2's attn.bias, which older transformers saved and from_pretrained ignores."""

from __future__ import annotations

import os

import pytest
import torch
from _models import old_pretrained_folder, tiny_bert, tiny_gpt2
from torch import nn

from tracin.torch.checkpoints import IgnoredKeys, ignored_keys, load_checkpoint, state_digest

transformers = pytest.importorskip("transformers")


class WithCache(nn.Module):
    """A plain module with a non-persistent buffer (a table it makes itself) and a persistent one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return self.lin(x + self.table) * self.scale


def _old_bert(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {**state, "bert.embeddings.position_ids": torch.arange(12).expand((1, -1))}


def test_the_ignored_keys_are_the_non_persistent_buffers_and_the_classes_patterns():
    ignored = ignored_keys(tiny_bert())
    assert ignored.buffers == {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"}
    assert ignored.covers("bert.embeddings.position_ids", folder=False)
    assert not ignored.covers("bert.embeddings.word_embeddings.weight", folder=True)
    gpt = ignored_keys(tiny_gpt2())
    assert gpt.covers("transformer.h.0.attn.bias", folder=True)  # GPT2's _keys_to_ignore_on_load_unexpected
    assert not gpt.covers("transformer.h.0.attn.bias", folder=False)  # not a buffer of the model now
    assert not gpt.covers("transformer.h.0.attn.c_attn.weight", folder=False)
    assert ignored_keys(nn.Sequential(WithCache())).buffers == {"0.table"}
    shared = nn.Module()
    shared.a = shared.b = WithCache()
    assert ignored_keys(shared).buffers == {"a.table", "b.table"}


@pytest.mark.parametrize("as_folder", [False, True])
def test_an_old_bert_checkpoint_loads_without_its_position_ids(tmp_path, as_folder):
    """Was refused: 'does not match the model: missing keys [], unexpected keys ['bert.embeddings.position_ids']'."""
    model = tiny_bert()
    reference = model.state_dict()
    state, old = _old_bert(model)
    source = old_pretrained_folder(tmp_path, model, old) if as_folder else old
    with pytest.raises(ValueError, match=r"unexpected keys \['bert.embeddings.position_ids'\]"):
        load_checkpoint(source, 0, reference)  # without the model's ignored keys: as before
    loaded = load_checkpoint(source, 0, reference, ignored=ignored_keys(model))
    assert sorted(loaded) == sorted(reference)  # the buffer is not loaded: the model makes its own
    assert all(torch.equal(loaded[k], state[k]) for k in reference)
    if not as_folder:
        ignored = ignored_keys(model)
        assert state_digest(old, 0, reference, ignored=ignored) == state_digest(state, 0, reference, ignored=ignored)


def test_a_plain_modules_non_persistent_buffer_in_a_checkpoint_is_left_out(tmp_path):
    model = WithCache()
    old = {**model.state_dict(), "table": torch.full((4,), 7.0)}  # saved when it was persistent
    path = os.path.join(tmp_path, "old.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in old.items()}}, path)  # DataParallel's prefix too
    for source in (old, path):
        with pytest.warns(UserWarning, match=r"\(.*\): its table differ from the model's non-persistent buffers"):
            loaded = load_checkpoint(source, 0, model.state_dict(), ignored=ignored_keys(model))
        assert sorted(loaded) == ["lin.bias", "lin.weight", "scale"]
        assert torch.equal(loaded["lin.weight"], model.lin.weight)
    assert torch.equal(model.table, torch.arange(4.0))


def test_an_old_gpt2_folder_loads_without_its_attention_masks(tmp_path):
    """GPT-2's attn.bias (and the older attn.masked_bias) are no buffers of the model now; from_pretrained
    ignores attn.bias by the class's patterns and loads past masked_bias."""
    model = tiny_gpt2(n_positions=8)
    reference = model.state_dict()
    state = {k: v.clone() for k, v in reference.items()}
    mask = torch.tril(torch.ones(8, 8, dtype=torch.bool)).view(1, 1, 8, 8)
    old = {**state, **{f"transformer.h.{i}.attn.bias": mask for i in range(2)}}
    old.update({f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)})  # older still
    path = old_pretrained_folder(tmp_path, model, old)
    assert type(transformers.GPT2LMHeadModel.from_pretrained(path)) is transformers.GPT2LMHeadModel
    loaded = load_checkpoint(path, 0, reference, ignored=ignored_keys(model))
    assert sorted(loaded) == sorted(reference) and all(torch.equal(loaded[k], state[k]) for k in reference)
    # a state dict is matched as load_state_dict does: the class's patterns are from_pretrained's, for folders
    bare = os.path.join(path, "pytorch_model.bin")  # the folder's file alone is no folder either
    for source in (old, bare):
        with pytest.raises(
            ValueError,
            match=r"unexpected keys \['transformer.h.0.attn.bias', 'transformer.h.1.*"
            r"pass the save_pretrained folder holding the file, or drop these keys",
        ):
            load_checkpoint(source, 0, reference, ignored=ignored_keys(model))


@pytest.mark.parametrize("as_folder", [False, True])
def test_another_models_keys_are_still_refused(tmp_path, as_folder):
    model = tiny_bert()
    _, old = _old_bert(model)
    stray = {**old, "bert.encoder.layer.2.output.dense.weight": torch.zeros(32, 64)}
    source = old_pretrained_folder(tmp_path, model, stray) if as_folder else stray
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['bert.encoder.layer.2.output.dense"):
        load_checkpoint(source, 0, model.state_dict(), ignored=ignored_keys(model))
    gpt = tiny_gpt2()
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \['transformer.wte.weight'"):
        load_checkpoint(source, 0, gpt.state_dict(), ignored=ignored_keys(gpt))


def test_ignored_keys_without_patterns_cover_only_their_buffers():
    ignored = IgnoredKeys({"a.b"})
    assert ignored.covers("a.b", folder=True) and not ignored.covers("a.c", folder=True)
    assert not IgnoredKeys().covers("a.b", folder=True)


def test_an_ignored_buffer_whose_values_differ_from_the_models_is_named(recwarn):
    """A checkpoint's rotary inv_freq of another rope_theta (the model built with another config) was left out
    silently; the same values, or the same rounded to the checkpoint's dtype, pass without a warning."""
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    state = model.state_dict()
    mine = model.model.rotary_emb.inv_freq
    for same in (mine.clone(), mine.half()):
        load_checkpoint({**state, "model.rotary_emb.inv_freq": same}, 0, state, ignored=ignored_keys(model))
    assert not [w for w in recwarn if "non-persistent" in str(w.message)]
    other = 1.0 / (500000.0 ** (torch.arange(0, 8, 2).float() / 8))
    with pytest.warns(UserWarning, match=r"its model.rotary_emb.inv_freq differ .*another config \(rope_theta"):
        loaded = load_checkpoint({**state, "model.rotary_emb.inv_freq": other}, 0, state, ignored=ignored_keys(model))
    assert sorted(loaded) == sorted(state)
