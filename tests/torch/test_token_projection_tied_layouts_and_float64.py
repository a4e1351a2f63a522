"""Projection(..., kronecker=True) layouts a language model's user depends on, against float64 NumPy on
autograd's per-example gradients: a head declared before the embedding it shares its weight with (its bias a
plain segment of its own), a Conv1D sharing a square weight with a Linear (one plain segment), a float64 model
(projected in float64), and the default batch size's count of captured tokens of every use of a tied weight."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_token_projection import projected_reference
from test_token_projection import token_loss as lm_loss
from test_token_projection_tied import HIDDEN, VOCAB, TiedLM, checkpoints_of, float64_grads, sequences
from torch import nn

import tracin
from tracin.projection import LayerMatrix
from tracin.torch import export_gradients
from tracin.torch.token_projection import KroneckerRows


class HeadFirstLM(nn.Module):
    """A head Linear with a bias, declared BEFORE the embedding that shares its weight (the weight's first holder
    is the head), then Linear -> tanh."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.emb = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.emb.weight = self.head.weight
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


class ConvTiedToLinear(nn.Module):
    """Embedding -> a square HF Conv1D whose (in, out) weight is also a Linear's (out, in) weight -> head."""

    def __init__(self):
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        self.emb = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.conv = conv1d(HIDDEN, HIDDEN)
        self.lin = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.lin.weight = self.conv.weight
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.lin(torch.tanh(self.conv(self.emb(ids))))))


def _export(model, checkpoints, ids, labels, proj, layers=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = export_gradients(
            model, checkpoints, (ids, labels), lm_loss, layers=layers, projection=proj, batch_size=3, progress=False
        )
    return g, [str(w.message) for w in caught]


def _assert_float64_rows(model, g, proj, checkpoints, ids, labels, lengths, rtol=1e-5):
    layout = g.metadata["projection"]["segments"]
    names = [n for n, _ in model.named_parameters()]

    def loss(ref, i, n):
        return lm_loss(ref(ids[i : i + 1, :n]), labels[i : i + 1, :n]).sum()

    for c, (state, _) in enumerate(checkpoints):
        want = projected_reference(proj, layout, float64_grads(model, state, loss, lengths, len(lengths)), names)
        np.testing.assert_allclose(np.asarray(g.matrices[c]), want, rtol=rtol, atol=rtol * np.abs(want).max())
    return layout


def test_a_head_declared_before_its_tied_embedding_keeps_its_bias_a_plain_segment():
    torch.manual_seed(2)
    model = HeadFirstLM()
    checkpoints = checkpoints_of(model)
    ids, labels, lengths = sequences(6, 5, seed=3)
    proj = tracin.Projection(3 * 12, 5, per_layer=True, kronecker=True)
    g, _ = _export(model, checkpoints, ids, labels, proj)
    layout = _assert_float64_rows(model, g, proj, checkpoints, ids, labels, lengths)
    assert layout == [
        LayerMatrix(VOCAB, HIDDEN).to_dict(),
        VOCAB,
        LayerMatrix(HIDDEN, HIDDEN, bias=True).to_dict(),
    ]


def test_a_conv1d_weight_tied_to_a_linear_is_one_plain_segment_named_in_one_warning():
    torch.manual_seed(5)
    model = ConvTiedToLinear()
    checkpoints = checkpoints_of(model)
    ids, labels, lengths = sequences(6, 5, seed=6)
    proj = tracin.Projection(4 * 9, 7, per_layer=True, kronecker=True)
    g, messages = _export(model, checkpoints, ids, labels, proj)
    tied = [m for m in messages if "tied between modules" in m]
    assert len(tied) == 1 and "conv.weight (held by ['conv', 'lin'], 36 numbers per example)" in tied[0], messages
    layout = _assert_float64_rows(model, g, proj, checkpoints, ids, labels, lengths)
    assert layout[1:3] == [HIDDEN * HIDDEN, HIDDEN]  # conv.weight and conv.bias: plain


def _signed_sum(outputs, signs):
    """Per example: sum_t s_t sum_h y_th, the signs alternating over tokens (output gradients that cancel)."""
    return (outputs.sum(-1) * signs).sum(1)


def test_a_float64_model_is_projected_in_float64():
    """Inputs 1000 + noise under output gradients of alternating sign: the per-token terms cancel to the noise's
    size, which float32 products (or inputs cast to float32) would miss by ~1e-4 of the rows; float64 keeps the
    rows within the stored float32's own rounding of the float64 projection."""
    torch.manual_seed(7)
    model = nn.Linear(4, 3).double()
    g64 = torch.Generator().manual_seed(1)
    x = 1000 + torch.randn((5, 8, 4), generator=g64, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64).expand(5, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proj = tracin.Projection(2 * 6, 3, per_layer=True, kronecker=True)
    g = export_gradients(model, [(state, 1.0)], (x, signs), _signed_sum, projection=proj, batch_size=5, progress=False)
    layout = g.metadata["projection"]["segments"]
    assert layout == [LayerMatrix(3, 4, bias=True).to_dict()]
    # float64 by hand: G_i = sum_t s_t 1 [x_it, 1]^T
    xs = np.concatenate([x.numpy(), np.ones((5, 8, 1))], axis=2)
    grads = np.einsum("it,itc->ic", signs.numpy(), xs)[:, None, :].repeat(3, axis=1)
    want = np.stack(
        [projected_reference(proj, layout, [{"w": gi[:, :4], "b": gi[:, 4]}], ["w", "b"])[0] for gi in grads]
    )
    np.testing.assert_allclose(np.asarray(g.matrices[0]), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_the_default_batch_size_counts_each_use_of_a_tied_weights_captured_tokens():
    """batch_elements, which sizes the default batch: the projected row, the plain segments' full gradients and
    the captured inputs and output gradients of 256 tokens per example, of EACH module holding a Kronecker
    weight (a tied embedding and head capture theirs twice)."""
    torch.manual_seed(0)
    model = TiedLM(head_bias=True)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["emb.weight", "fc.weight", "fc.bias", "head.bias"]
    proj = tracin.Projection(3 * 4, 3, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = KroneckerRows(model, names, lm_loss, proj, [], None)
    tied = (VOCAB + HIDDEN) * 2  # emb and head: a vocab-sized side and a hidden-sized side per token, twice
    fc = HIDDEN + HIDDEN  # its input and output gradient per token
    assert rows.batch_elements == proj.dim + VOCAB + 256 * (tied + fc)


def test_a_linear_weight_chosen_without_its_bias_is_a_segment_without_a_bias_column():
    """layers=["fc.weight", "ln"]: fc's segment has no bias column, and LayerNorm's weight after it stays its own
    plain segment (not taken for fc's bias)."""
    from test_token_projection import TokenModel, autograd_grads, model_and_checkpoints, sequences, token_loss

    model, checkpoints = model_and_checkpoints(seed=1)
    assert isinstance(model, TokenModel)
    ids, labels, lengths = sequences(6, 5, seed=2)
    proj = tracin.Projection(3 * 12, 5, per_layer=True, kronecker=True)
    g = export_gradients(
        model,
        checkpoints,
        (ids, labels),
        token_loss,
        layers=["fc.weight", "ln"],
        projection=proj,
        batch_size=3,
        progress=False,
    )
    layout = g.metadata["projection"]["segments"]
    hidden, width = model.fc.weight.shape
    assert layout == [LayerMatrix(hidden, width).to_dict(), hidden, hidden]
    chosen = ["fc.weight", "ln.weight", "ln.bias"]
    for c, (state, _) in enumerate(checkpoints):
        want = projected_reference(proj, layout, autograd_grads(model, state, ids, labels, lengths), chosen)
        np.testing.assert_allclose(np.asarray(g.matrices[c]), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_nan_loss_is_warned_about_when_every_chosen_parameter_is_a_plain_segment():
    """kronecker=True with layers=["ln"] only (no Kronecker segment): the plain segments' per-example losses
    still reach the export's warning about an example whose loss is NaN."""
    from test_token_projection import model_and_checkpoints, sequences, token_loss

    def loss_fn(logits, labels):
        bad = labels[:, 0] == -7
        loss = token_loss(logits, labels.masked_fill(labels == -7, -100))
        return torch.where(bad, torch.full_like(loss, float("nan")), loss)

    model, checkpoints = model_and_checkpoints(seed=1)
    ids, labels, _ = sequences(4, 5, seed=2)
    labels[2, 0] = -7
    proj = tracin.Projection(6, 5, per_layer=True, kronecker=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(
            model, checkpoints[:1], (ids, labels), loss_fn, layers=["ln"], projection=proj, batch_size=4, progress=False
        )
    nan = [str(w.message) for w in caught if str(w.message).startswith("loss_fn gives a NaN or infinite loss for ")]
    assert len(nan) == 1, [str(w.message) for w in caught]
