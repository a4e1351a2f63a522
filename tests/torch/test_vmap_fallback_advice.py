"""The warning that gives up torch.func.vmap for a per-example loop says how to skip the loop: layers= leaving
the named modules out, and, for a Hugging Face model whose 'sdpa' attention reads a padded attention_mask's
values (data-dependent control flow vmap cannot run: every LLaMA / Mistral RMSNorm weight then takes the loop,
~10x the export time of a tiny LLaMA), eager attention. Following that advice gives the float64 autograd rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch import export_gradients

VOCAB, LENGTH = 32, 8


class Branching(nn.Module):
    """A parameter outside the hooked layers (vmap's) and a forward branching on a tensor's value."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        h = torch.tanh(self.a(x)) * self.scale
        if bool((x > -1e9).all()):  # data-dependent control flow
            h = h + 0.0
        return self.b(h)


def ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def test_the_fallback_warning_names_layers_as_the_way_to_skip_the_loop():
    model = Branching()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with pytest.warns(RuntimeWarning, match="per-example loop for the model itself.*layers= leaving them out") as seen:
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), ce, progress=False)
    loop = [str(w.message) for w in seen if "per-example loop" in str(w.message)]
    assert "set_attn_implementation" not in loop[0]  # not a Hugging Face model: no attention advice


def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=LENGTH,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_loss(outputs, labels):
    logits = outputs.logits[:, :-1].transpose(1, 2)
    return nn.functional.cross_entropy(logits, labels[:, 1:], reduction="none").sum(1)


def padded(n: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    mask = (torch.arange(LENGTH) < torch.tensor([[LENGTH], [3], [5], [6]])[:n]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


NORMS = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]


def float64_rows(model, inputs, labels):
    """Per-example float64 autograd of the summed token loss, each sequence alone without its padding."""
    wide = llama().double()
    wide.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    params = [p for n, p in wide.named_parameters() if n.rpartition(".")[0] in NORMS]
    rows = []
    for i in range(labels.shape[0]):
        n = int(inputs["attention_mask"][i].sum())
        loss = token_loss(wide(input_ids=inputs["input_ids"][i : i + 1, :n]), labels[i : i + 1, :n]).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).numpy()


def test_a_hugging_face_sdpa_model_with_a_padded_mask_is_told_eager_attention_lets_vmap_run_it():
    model = llama()
    inputs, labels = padded(4)
    with pytest.warns(RuntimeWarning, match=r"per-example loop.*set_attn_implementation\('eager'\)"):
        export_gradients(model, [(model.state_dict(), 1.0)], (inputs, labels), token_loss, layers=NORMS, progress=False)
    model.set_attn_implementation("eager")  # the advice, followed
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        g = export_gradients(
            model, [(model.state_dict(), 1.0)], (inputs, labels), token_loss, layers=NORMS, progress=False
        )
    assert not [w for w in seen if "per-example loop" in str(w.message)]
    np.testing.assert_allclose(g.matrices[0], float64_rows(model, inputs, labels), rtol=1e-4, atol=1e-5)
