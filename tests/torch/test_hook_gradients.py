"""The batched hook path (capture + layer_rules) against a per-example autograd loop in float64:
Hugging Face GPT-2 and BERT built from configs (random weights, padded sequences, dict inputs),
a CNN whose Conv2d goes to vmap, and models whose layers mix the examples of a batch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from reference import assert_close_to_exact
from tracin.torch import export_gradients
from tracin.torch.checkpoints import tied_aliases
from tracin.torch.layers import select_parameters
from tracin.torch.per_example import PerExampleGradients

CE = nn.CrossEntropyLoss(reduction="none")


def autograd_rows(model: nn.Module, names: list[str], loss_fn, inputs: dict, targets: torch.Tensor) -> np.ndarray:
    """Independent reference: torch.autograd.grad of each example's loss alone, float64 (n, d)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(targets)):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = loss_fn(model(**one), targets[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                    for n, g in zip(names, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows).detach().double().numpy()


def hook_rows(model: nn.Module, names: list[str], loss_fn, inputs, targets, batch: int = 5) -> tuple:
    """(PerExampleGradients, (n, d) rows) computed in batches, warnings recorded."""
    state = {k: v for k, v in model.state_dict().items() if k not in tied_aliases(model)}  # as checkpoints load
    n = len(targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute = PerExampleGradients(model, names, loss_fn)
        rows = [
            compute(state, {k: v[i : i + batch] for k, v in inputs.items()}, targets[i : i + batch])
            for i in range(0, n, batch)
        ]
    return compute, torch.cat(rows).detach().double().numpy(), caught


def token_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: summed next-token cross-entropy over positions whose label is not -100."""
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return losses.sum(1)


def hugging_face():
    """The transformers package (a test dependency: the models are built from configs, no download)."""
    return pytest.importorskip("transformers")


def gpt2(seed: int = 0) -> nn.Module:
    transformers = hugging_face()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def padded_sequences(n: int, length: int, vocab: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Right-padded token ids with their attention masks, and labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("layers", [["transformer.h.1.mlp.*"], None])
def test_gpt2_padded_takes_the_hook_path_exactly(layers):
    model = gpt2()
    inputs, labels = padded_sequences(9, 10, 50, seed=1)
    names = select_parameters(model, layers)
    compute, got, caught = hook_rows(model, names, token_loss, inputs, labels)
    assert not caught, [str(w.message) for w in caught]  # no vmap failure, no fallback
    assert compute.hooks is not None and not compute.others
    if layers is None:  # the input embedding is tied to lm_head: both uses summed
        assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    want = autograd_rows(model, names, token_loss, inputs, labels)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_gpt2_export_scores_match_float64_influence():
    model = gpt2(seed=2)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    later = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in first.items()}
    later["lm_head.weight"] = later["transformer.wte.weight"]  # tied, as a saved checkpoint has them
    checkpoints = [(first, 0.5), (later, 0.1)]
    train, test = padded_sequences(8, 10, 50, seed=3), padded_sequences(3, 10, 50, seed=4)
    layers = ["transformer.h.1.mlp.*"]
    kwargs = {"layers": layers, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hook path: nothing falls back
        g_train = export_gradients(model, checkpoints, train, token_loss, batch_size=5, **kwargs)
        g_test = export_gradients(model, checkpoints, test, token_loss, **kwargs)
    names = select_parameters(model, layers)
    reference = {}
    for side, (inputs, labels) in (("train", train), ("test", test)):
        reference[side] = []
        for state, _ in checkpoints:
            model.load_state_dict(state)
            reference[side].append(autograd_rows(model, names, token_loss, inputs, labels))
    assert_close_to_exact(tracin.scores(g_test, g_train), reference["test"], reference["train"], [0.5, 0.1])


def test_bert_classifier_padded_takes_the_hook_path_exactly():
    transformers = hugging_face()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).double().eval()
    inputs, _ = padded_sequences(9, 8, 40, seed=5)
    inputs["token_type_ids"] = (torch.arange(8)[None, :] >= 4).long().expand(9, 8).clone()
    labels = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(6))
    loss = lambda outputs, y: CE(outputs.logits, y)  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    compute, got, caught = hook_rows(model, names, loss, inputs, labels, batch=4)
    assert not caught and compute.hooks is not None and not compute.others
    want = autograd_rows(model, names, loss, inputs, labels)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


class NormedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.LayerNorm([3, 5, 5])
        self.head = nn.Linear(75, 4)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def test_cnn_conv_goes_to_vmap_with_one_warning_and_the_rest_to_hooks_exactly():
    model = NormedCNN().double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(11, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (11,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    compute, got, caught = hook_rows(model, names, CE, {"x": x}, y)
    assert [str(w.message).count("conv (Conv2d)") for w in caught] == [1]
    assert compute.others == ["conv.weight", "conv.bias"] and sorted(compute.hooks.plan) == [
        "head.bias",
        "head.weight",
        "norm.bias",
        "norm.weight",
    ]
    want = autograd_rows(model, names, CE, {"x": x}, y)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


class BatchMean(nn.Module):
    """Adds half the batch mean to every example: examples mix, in eval mode too."""

    def forward(self, x):
        return x + 0.5 * x.mean(0, keepdim=True)


@pytest.mark.parametrize(
    "mixer, message",
    [
        (
            lambda: nn.Sequential(nn.Unflatten(1, (2, 4)), nn.BatchNorm1d(2, track_running_stats=False), nn.Flatten()),
            "mix the examples of a batch even in eval mode",
        ),
        (BatchMean, "disagree with per-example autograd"),
    ],
)
def test_layers_mixing_examples_leave_the_hook_path_and_stay_per_example(mixer, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), mixer(), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    compute, got, caught = hook_rows(model, names, CE, {"input": x}, y)
    assert any(message in str(w.message) for w in caught) and compute.hooks is None
    want = autograd_rows(model, names, CE, {"input": x}, y)  # each example alone, as TracIn defines it
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


class SequenceFirst(nn.Module):
    """Runs its token layer on (tokens, batch, features): not batch-first, so not for the hooks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.token, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.token(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("tokens", [7, 6])  # 6 tokens = batch of 6: shapes look batch-first, values do not
def test_layers_run_sequence_first_leave_the_hook_path_exactly(tokens):
    model = SequenceFirst().double()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(6, tokens, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    compute, got, caught = hook_rows(model, names, CE, {"x": x}, y, batch=6)
    if tokens == 7:  # seen by its shape: that layer alone goes to vmap
        assert [str(w.message).count("token (Linear: input of shape (7, 6, 3)") for w in caught] == [1]
        assert compute.others == ["token.weight", "token.bias"] and sorted(compute.hooks.plan) == [
            "head.bias",
            "head.weight",
        ]
    else:  # seen by the first-batch check: every parameter goes to vmap
        assert any("given up" in str(w.message) for w in caught) and compute.hooks is None
    want = autograd_rows(model, names, CE, {"x": x}, y)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
