"""Test models shared by several tests/torch files."""

from __future__ import annotations

import torch
from torch import nn


class RunningMean(nn.Module):
    """A forward that updates buffers in place after using them (a running mean, a call counter), as an
    EMA or a fake-quantization observer does.

    running_mean: also update the mean (else only the counter: torch.func.vmap runs it); through_data:
    update it through .data (a write autograd and vmap do not see)."""

    def __init__(self, running_mean: bool = True, through_data: bool = False):
        super().__init__()
        self.running_mean, self.through_data = running_mean, through_data
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("mean", torch.randn(4))

    def forward(self, x):
        out = self.lin(x - self.mean) * (1 + self.calls)
        self.calls += 1
        if self.running_mean:
            mean = self.mean.data if self.through_data else self.mean
            mean.mul_(0.5).add_(x.detach().mean(0))
        return out


def tiny_gpt2(vocab_size: int = 50, n_positions: int = 16, seed: int = 0, **config) -> nn.Module:
    """A GPT-2 language model of 2 layers, 2 heads and width 16 (float32, eval mode), initialised from
    torch seed `seed`; `config`: further GPT2Config fields (dropouts, ...). Needs transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    settings = {"n_embd": 16, "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0, **config}
    gpt2_config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, **settings)
    return transformers.GPT2LMHeadModel(gpt2_config).eval()


def tiny_bert() -> nn.Module:
    """A BERT sequence classifier (hidden 32, 2 layers, 2 heads, 3 classes, 12 positions; float32, eval
    mode) from torch seed 0. Needs transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=12,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def old_pretrained_folder(tmp_path, model: nn.Module, state: dict) -> str:
    """A save_pretrained folder of `model` as older transformers wrote it: `state` in pytorch_model.bin."""
    import os

    path = os.path.join(tmp_path, "old")
    os.makedirs(path)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    model.config.save_pretrained(path)
    return path


class LateReuse(nn.Module):
    """a.weight also used by F.linear outside a's forward, for examples whose first feature is over 1.5 only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        extra = nn.functional.linear(x, self.a.weight) * (x[:, :1] > 1.5).to(x.dtype)
        return self.b(torch.tanh(self.a(x)) + extra)


class SequenceFirstTokens(nn.Module):
    """Runs its `token` layer on (tokens, batch, features): not batch-first, so unusable by the hooks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.token, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.token(x.transpose(0, 1))).mean(0))
