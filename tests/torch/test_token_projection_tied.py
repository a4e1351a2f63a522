"""Projection(..., kronecker=True) of a weight tied between an nn.Embedding and an nn.Linear head (GPT-2's wte
and lm_head): one Kronecker segment whose per-token products of both uses add up, never its full per-example
gradient (review201 F2), against P_rows G P_cols^T of float64 autograd's per-example gradient G of the tied
weight (both uses)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from test_token_projection import projected_reference
from test_token_projection import sequences as padded_sequences
from test_token_projection import token_loss as lm_loss
from torch import nn

import tracin
import tracin.torch.token_projection as token_projection
from tracin.projection import LayerMatrix
from tracin.torch import export_gradients

VOCAB, HIDDEN = 17, 6


class TiedLM(nn.Module):
    """Embedding (padding id 0) -> Linear -> tanh -> head Linear whose weight is the embedding's (tied), or
    its own (tied=False); the head may have a bias of its own."""

    def __init__(self, tied: bool = True, head_bias: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.fc = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=head_bias)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def sequences(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ids (padding 0), next-token labels (-100 on padding) and the true lengths."""
    return padded_sequences(n, length, seed, vocab=VOCAB, labels=(1, VOCAB))


def checkpoints_of(model: nn.Module) -> list[tuple[dict, float]]:
    """The model's state and one with its parameters moved (a tied weight stays one tensor)."""
    later = copy.deepcopy(model)
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return [(copy.deepcopy(model.state_dict()), 0.5), (later.state_dict(), 0.1)]


def float64_grads(model: nn.Module, state: dict, call, lengths: list[int] | None, n: int) -> list[dict]:
    """Per example {parameter: float64 gradient} (a tied weight's: both uses), one autograd call each;
    call(model, i, length) -> the example's summed loss."""
    ref = copy.deepcopy(model).double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    params = dict(ref.named_parameters())  # a tied weight once
    out = []
    for i in range(n):
        grads = torch.autograd.grad(call(ref, i, None if lengths is None else lengths[i]), list(params.values()))
        out.append({name: g.numpy() for name, g in zip(params, grads, strict=True)})
    return out


@pytest.mark.parametrize("head_bias", [False, True])
def test_a_tied_embedding_and_head_are_one_kronecker_segment_equal_to_the_float64_projection(monkeypatch, head_bias):
    torch.manual_seed(0)
    model = TiedLM(head_bias=head_bias)
    checkpoints = checkpoints_of(model)
    ids, labels, lengths = sequences(9, 7, seed=1)
    proj = tracin.Projection(4 * 12, 3, per_layer=True, kronecker=True)

    def no_full_gradients(self, *args):
        raise AssertionError("a full per-example gradient was formed")

    if not head_bias:  # every segment per token: the full per-example path is never taken
        monkeypatch.setattr(token_projection.PerExampleGradients, "__call__", no_full_gradients)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sum-check warning: the rows of both uses sum to autograd's
        g = export_gradients(model, checkpoints, (ids, labels), lm_loss, projection=proj, batch_size=4, progress=False)
    layout = g.metadata["projection"]["segments"]
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "emb.weight" and "head.weight" not in names
    # the tied weight (vocab x hidden), fc (weight + bias), the head's own bias as a plain segment
    assert layout == [LayerMatrix(VOCAB, HIDDEN).to_dict(), LayerMatrix(HIDDEN, HIDDEN, bias=True).to_dict()] + (
        [VOCAB] if head_bias else []
    )

    def loss(ref, i, n):
        return lm_loss(ref(ids[i : i + 1, :n]), labels[i : i + 1, :n]).sum()

    for c, (state, _) in enumerate(checkpoints):
        want = projected_reference(proj, layout, float64_grads(model, state, loss, lengths, len(lengths)), names)
        np.testing.assert_allclose(g.matrices[c], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_with_adam_a_tied_weight_is_scaled_by_the_rank_one_factorisation_of_its_moments():
    """preconditioner='adam': the tied segment's factors scaled by the rank-one factorisation r c^T / sum(r) of
    the tied weight's v_hat (every row used by the head: no zero row), as an untied layer's by its own."""
    torch.manual_seed(1)
    model = TiedLM()
    ids, labels, lengths = sequences(8, 6, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model(ids), labels).mean().backward()
        opt.step()
    state = copy.deepcopy(model.state_dict())
    proj = tracin.Projection(2 * 12, 3, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = export_gradients(
            model,
            [(state, 1e-2, copy.deepcopy(opt.state_dict()))],
            (ids, labels),
            lm_loss,
            layers=["emb"],
            projection=proj,
            preconditioner="adam",
            batch_size=4,
            progress=False,
        )
    layout = g.metadata["projection"]["segments"]
    assert layout == [LayerMatrix(VOCAB, HIDDEN).to_dict()]
    v = opt.state[model.emb.weight]["exp_avg_sq"].double().numpy() / (1 - 0.999**3)
    r, c = v.sum(1), v.sum(0)
    scale = np.sqrt(r.sum() / r)[:, None] / np.sqrt(c)[None, :]

    def loss(ref, i, n):
        return lm_loss(ref(ids[i : i + 1, :n]), labels[i : i + 1, :n]).sum()

    grads = [{"emb.weight": gr["emb.weight"] * scale} for gr in float64_grads(model, state, loss, lengths, 8)]
    want = projected_reference(proj, layout, grads, ["emb.weight"])
    np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_an_untied_embedding_and_head_stay_two_segments():
    torch.manual_seed(2)
    model = TiedLM(tied=False)
    checkpoints = checkpoints_of(model)
    ids, labels, lengths = sequences(6, 5, seed=3)
    proj = tracin.Projection(3 * 12, 3, per_layer=True, kronecker=True)
    g = export_gradients(model, checkpoints, (ids, labels), lm_loss, projection=proj, batch_size=3, progress=False)
    layout = g.metadata["projection"]["segments"]
    assert layout == [
        LayerMatrix(VOCAB, HIDDEN).to_dict(),
        LayerMatrix(HIDDEN, HIDDEN, bias=True).to_dict(),
        LayerMatrix(VOCAB, HIDDEN).to_dict(),
    ]
    names = [n for n, _ in model.named_parameters()]

    def loss(ref, i, n):
        return lm_loss(ref(ids[i : i + 1, :n]), labels[i : i + 1, :n]).sum()

    for c, (state, _) in enumerate(checkpoints):
        want = projected_reference(proj, layout, float64_grads(model, state, loss, lengths, len(lengths)), names)
        np.testing.assert_allclose(g.matrices[c], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gpt2_with_tied_word_embeddings_projects_wte_per_token_through_both_uses():
    """The whole model of a tiny GPT-2 (tie_word_embeddings=True, padding kept and masked): the tied wte is one
    Kronecker segment, the rows equal the float64 projection of float64 autograd's per-example gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, _, lengths = sequences(6, 8, seed=4)
    ids = ids % 40
    mask = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_fn(outputs, y):
        return lm_loss(outputs.logits[:, :-1], y[:, 1:])

    checkpoints = checkpoints_of(model)
    proj = tracin.Projection(4 * 64, 5, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = export_gradients(
            model,
            checkpoints,
            ({"input_ids": ids, "attention_mask": mask}, labels),
            loss_fn,
            projection=proj,
            batch_size=3,
            progress=False,
        )
    layout = g.metadata["projection"]["segments"]
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "transformer.wte.weight" and layout[0] == LayerMatrix(40, 8).to_dict()

    def loss(ref, i, n):
        return loss_fn(ref(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]), labels[i : i + 1]).sum()

    for c, (state, _) in enumerate(checkpoints):
        want = projected_reference(proj, layout, float64_grads(model, state, loss, None, len(lengths)), names)
        np.testing.assert_allclose(g.matrices[c], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


class FunctionalHead(nn.Module):
    """A head holding its weight and applying it itself (no nn.Linear): not per-token projectable."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, h):
        return h @ self.weight.T


def test_a_weight_tied_to_another_layer_type_is_a_plain_segment_named_in_one_warning():
    torch.manual_seed(4)
    model = TiedLM(tied=False)
    model.head = FunctionalHead(model.emb.weight)
    checkpoints = checkpoints_of(model)
    ids, labels, lengths = sequences(6, 5, seed=5)
    proj = tracin.Projection(2 * 12, 3, per_layer=True, kronecker=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = export_gradients(model, checkpoints, (ids, labels), lm_loss, projection=proj, batch_size=3, progress=False)
    tied = [str(w.message) for w in caught if "tied between modules" in str(w.message)]
    assert len(tied) == 1 and "emb.weight (held by ['emb', 'head'], 102 numbers per example)" in tied[0], tied
    layout = g.metadata["projection"]["segments"]
    assert layout == [VOCAB * HIDDEN, LayerMatrix(HIDDEN, HIDDEN, bias=True).to_dict()]
    names = [n for n, _ in model.named_parameters()]

    def loss(ref, i, n):
        return lm_loss(ref(ids[i : i + 1, :n]), labels[i : i + 1, :n]).sum()

    for c, (state, _) in enumerate(checkpoints):
        want = projected_reference(proj, layout, float64_grads(model, state, loss, lengths, len(lengths)), names)
        np.testing.assert_allclose(g.matrices[c], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
