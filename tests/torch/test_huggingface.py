"""A Hugging Face GPT-2 (built from a config: random weights, no download) on padded token data with
attention masks: checkpoints as save_pretrained folders and state dicts, layers by glob (Conv1D),
full and per-token Kronecker-projected gradients against float64 per-example autograd on the
sequences without their padding."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import tiny_gpt2
from torch import nn

import tracin
from tracin.projection import LayerMatrix
from tracin.torch import export_gradients

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, LAYERS = 40, 12, "transformer.h.*.mlp.c_fc"


def token_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: summed next-token cross-entropy over the tokens that are not padding (label -100)."""
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    return nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)


def gpt2() -> nn.Module:
    return tiny_gpt2(VOCAB, LENGTH)


def padded(n: int, seed: int) -> tuple[dict, torch.Tensor, list[int]]:
    """Right-padded ids (0) with attention masks, labels (-100 on padding), true lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100), lengths.tolist()


def reference_grads(model: nn.Module, state: dict, inputs: dict, lengths: list[int], names: list[str]):
    """Per example [float64 gradient of each of `names`], by autograd on the example without padding."""
    ref = copy.deepcopy(model).double()
    ref.load_state_dict({k: v.double() for k, v in state.items()})
    params = dict(ref.named_parameters())
    out = []
    for i, n in enumerate(lengths):
        ids = inputs["input_ids"][i : i + 1, :n]
        loss = token_loss(ref(input_ids=ids), ids).sum()
        out.append([g.numpy() for g in torch.autograd.grad(loss, [params[k] for k in names])])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = gpt2()
    folder = tmp_path_factory.mktemp("gpt2") / "step-0"
    model.save_pretrained(folder, max_shard_size="20KB")  # sharded safetensors with their index
    first = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    later = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in first.items()}
    later["lm_head.weight"] = later["transformer.wte.weight"]  # tied, as in the model
    checkpoints = [(str(folder), 0.5), (later, 0.1)]
    return model, checkpoints, [first, later]


def test_save_pretrained_folder_is_sharded_and_lacks_the_tied_head(setup):
    model, checkpoints, _ = setup
    files = {p.name for p in Path(checkpoints[0][0]).iterdir()}
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files


def test_full_and_kronecker_projected_gradients_match_float64_autograd(setup):
    model, checkpoints, states = setup
    inputs, labels, lengths = padded(7, seed=2)
    names = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.") and ".mlp.c_fc." in n]
    proj = tracin.Projection(2 * 64, 5, per_layer=True, kronecker=True)
    kwargs = {"layers": LAYERS, "batch_size": 4, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hook path throughout: nothing falls back to vmap
        full = export_gradients(model, checkpoints, (inputs, labels), token_loss, **kwargs)
        kron = export_gradients(model, checkpoints, (inputs, labels), token_loss, projection=proj, **kwargs)
    assert [p["name"] for p in full.metadata["params"]] == names
    layer = LayerMatrix(64, 16, bias=True, transposed=True)  # Conv1D weight (in=16, out=64), bias appended
    assert kron.metadata["projection"]["segments"] == [layer.to_dict(), layer.to_dict()]
    assert proj.kronecker_dims(64, layer) == (8, 8)
    factors = [tuple(f.astype(np.float64) for f in proj.layer_factors(j, layer, 64)) for j in range(2)]
    for c, state in enumerate(states):
        grads = reference_grads(model, state, inputs, lengths, names)
        want_full = np.stack([np.concatenate([g.reshape(-1) for g in row]) for row in grads])
        np.testing.assert_allclose(full.matrices[c], want_full, rtol=1e-5, atol=1e-5 * np.abs(want_full).max())
        want = []
        for row in grads:  # per block: (P_rows kron P_cols) vec([W^T | c]), W^T the (out, in) gradient
            blocks = zip(row[0::2], row[1::2], factors, strict=True)
            want.append(
                np.concatenate(
                    [np.kron(pr, pc) @ np.hstack([w.T, b[:, None]]).reshape(-1) for w, b, (pr, pc) in blocks]
                )
            )
        want = np.stack(want)
        np.testing.assert_allclose(kron.matrices[c], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(
            proj.apply(full.matrices[c], segments=kron.metadata["projection"]["segments"]),
            want,
            rtol=1e-5,
            atol=1e-5 * np.abs(want).max(),
        )
