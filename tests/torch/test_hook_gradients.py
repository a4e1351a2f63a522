"""The batched hook path (capture + layer_rules) against a per-example autograd loop in float64:
Hugging Face GPT-2 and BERT built from configs (random weights, padded sequences, dict inputs),
a CNN whose Conv2d goes to vmap, and models whose layers mix the examples of a batch."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from _models import SequenceFirstTokens, tiny_gpt2
from torch import nn

import tracin
from reference import assert_close_to_exact
from tracin.torch import export_gradients
from tracin.torch.capture import Call, capture, stream
from tracin.torch.checkpoints import tied_aliases
from tracin.torch.hook_gradients import HookGradients
from tracin.torch.layer_rules import per_example_grad, token_form, write_per_example_grad
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
    return tiny_gpt2(seed=seed).double()


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
        # outputs mixing too: each batch is recomputed one example at a time (the hooks stay for the next batch,
        # so that a batch's rows depend on its own rows only: review72 F1)
        (BatchMean, "depends on the rest of its batch"),
    ],
)
def test_layers_mixing_examples_leave_the_hook_path_and_stay_per_example(mixer, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), mixer(), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    compute, got, caught = hook_rows(model, names, CE, {"input": x}, y)
    assert any(message in str(w.message) for w in caught)
    assert compute.hooks is None or compute.batch_dependent == 2  # both batches of 5
    want = autograd_rows(model, names, CE, {"input": x}, y)  # each example alone, as TracIn defines it
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("tokens", [7, 6])  # 6 tokens = batch of 6: shapes look batch-first, values do not
def test_layers_run_sequence_first_leave_the_hook_path_exactly(tokens):
    model = SequenceFirstTokens().double()
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


class TwiceAndUnused(nn.Module):
    """`shared` runs twice; `unused` runs on a tensor the loss never sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.head, self.unused = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        first = self.shared(x)
        second = self.shared(torch.tanh(first))
        self.unused(second)
        return self.head(second)


def test_capture_and_stream_hand_over_each_call_once_with_its_output_gradient():
    model = TwiceAndUnused().double()
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # independent reference: the same forward written out, autograd w.r.t. each output
    with torch.no_grad():
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    first = nn.functional.linear(x, params["shared.weight"], params["shared.bias"])
    second = nn.functional.linear(torch.tanh(first), params["shared.weight"], params["shared.bias"])
    logits = nn.functional.linear(second, params["head.weight"], params["head.bias"])
    d_first, d_second, d_logits = torch.autograd.grad(CE(logits, y).sum(), [first, second, logits])
    names = ["shared", "head", "unused"]

    calls = capture(model, names, state, CE, x, y)
    expected = {
        "shared": [(x, d_first), (torch.tanh(first), d_second)],
        "head": [(second, d_logits)],
        "unused": [(second, torch.zeros(5, 2, dtype=torch.float64))],
    }
    for name, pairs in expected.items():
        assert len(calls[name]) == len(pairs)
        for call, (want_input, want_grad) in zip(calls[name], pairs, strict=True):
            torch.testing.assert_close(call.input, want_input.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(call.grad, want_grad, rtol=1e-12, atol=1e-12)

    order = []
    counts = stream(model, names, state, CE, x, y, lambda name, index, call: order.append((name, index)))
    assert counts == {"shared": 2, "head": 1, "unused": 1}
    # backward order for the calls the loss reaches, then the unreached one (zero gradient)
    assert order == [("head", 0), ("shared", 1), ("shared", 0), ("unused", 0)]


class TiedEmbedding(nn.Module):
    """A padded token model whose output layer shares the input embedding, and a Linear run twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix = nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, 3)
        self.out = nn.Linear(3, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.mix(torch.tanh(self.mix(self.embed(ids))))
        return self.out(h).sum(1)


def test_hook_gradients_write_tied_and_repeated_layers_into_their_columns_only():
    model = TiedEmbedding().double()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    ids[:, 3:] = 0  # padding: no gradient for the embedding's row 0, but the output layer's use counts
    y = torch.randint(0, 7, (6,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    hooks = HookGradients(model, names, CE)
    assert set(hooks.plan) == set(names) and hooks.plan["embed.weight"] == [("embed", "weight"), ("out", "weight")]
    widths = [p.numel() for p in model.parameters()]
    columns, offset = {}, 2
    for n, w in zip(names, widths, strict=True):
        columns[n], offset = (offset, w), offset + w
    out = torch.full((6, offset + 3), 7.0, dtype=torch.float64)  # columns of no parameter keep their 7s
    state = {k: v for k, v in model.state_dict().items() if k not in tied_aliases(model)}
    silent, unusable = hooks(state, {"ids": ids}, y, out, columns)
    assert silent == [] and unusable == {}
    want = autograd_rows(model, names, CE, {"ids": ids}, y)
    np.testing.assert_allclose(out[:, 2:-3].numpy(), want, rtol=1e-12, atol=1e-14 * np.abs(want).max())
    assert (out[:, :2] == 7).all() and (out[:, -3:] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # the layer's own, another
@pytest.mark.parametrize(
    "make, leaf",
    [
        (lambda: nn.Linear(3, 4), "weight"),
        (lambda: nn.Linear(3, 4), "bias"),
        (lambda: nn.Embedding(6, 4, padding_idx=2), "weight"),
        (lambda: nn.LayerNorm(4), "weight"),
        (lambda: nn.LayerNorm(4), "bias"),
    ],
)
def test_written_gradients_add_to_a_strided_view(make, leaf, dtype):
    torch.manual_seed(0)
    layer = make().double()
    g = torch.Generator().manual_seed(12)
    if isinstance(layer, nn.Embedding):
        x = torch.randint(0, 6, (3, 5), generator=g)
    else:
        x = torch.randn(3, 5, 3 if isinstance(layer, nn.Linear) else 4, generator=g, dtype=torch.float64)
    y = layer(x)
    b = torch.randn(y.shape, generator=g, dtype=torch.float64)
    # independent reference: per example, autograd of <b_i, layer(x_i)> w.r.t. the parameter
    want = torch.stack(
        [torch.autograd.grad((layer(x[i : i + 1]) * b[i : i + 1]).sum(), getattr(layer, leaf))[0] for i in range(3)]
    )
    a, b_tokens = token_form(layer, Call(x, b), 3)
    shape = tuple(getattr(layer, leaf).shape)
    width = want[0].numel()
    rows = torch.randn(3, width + 4, generator=g).to(dtype)
    before = rows.clone()
    dest = rows[:, 1 : 1 + width].view(3, *shape)  # strided: the export's columns
    write_per_example_grad(layer, leaf, a, b_tokens, dest, accumulate=True)
    torch.testing.assert_close(
        dest.double(), before[:, 1 : 1 + width].view(3, *shape).double() + want, rtol=1e-6, atol=1e-6
    )
    assert torch.equal(rows[:, 0], before[:, 0]) and torch.equal(rows[:, 1 + width :], before[:, 1 + width :])
    torch.testing.assert_close(per_example_grad(layer, leaf, a, b_tokens), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dense_weight_gradients_in_strided_columns_have_the_same_bits_for_one_and_two_threads(kind):
    # two threads form them in a contiguous temporary (batched gemm) and copy; one thread writes in place
    hugging_face()
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = nn.Linear(48, 40) if kind == "linear" else Conv1D(40, 48)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 33, 48, generator=g)
    b = torch.randn(6, 33, 40, generator=g)
    want = torch.stack(  # independent reference: float64 autograd of <b_i, layer(x_i)>, one example at a time
        [torch.autograd.grad((layer.double()(x[i].double()) * b[i].double()).sum(), layer.weight)[0] for i in range(6)]
    )
    layer.float()
    a, b_tokens = token_form(layer, Call(x, b), 6)
    shape, width = tuple(layer.weight.shape), layer.weight.numel()
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            rows = torch.full((6, width + 5), 7.0)
            write_per_example_grad(layer, "weight", a, b_tokens, rows[:, 2 : 2 + width].view(6, *shape), False)
            results.append(rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0][:, :2], torch.full((6, 2), 7.0)) and torch.equal(
        results[0][:, 2 + width :], torch.full((6, 3), 7.0)
    )
    torch.testing.assert_close(results[0][:, 2 : 2 + width].view(6, *shape).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(
    ("cap_examples", "small_gemm", "batches"), [(3, True, [3, 3, 1]), (0, True, [2, 2, 2, 1]), (3, False, [])]
)
def test_dense_weight_temporaries_hold_at_most_the_capped_examples_and_keep_the_bits(
    kind, cap_examples, small_gemm, batches, monkeypatch
):
    # with two threads the gradients of a weight of at most _SMALL_GEMM entries go through contiguous
    # temporaries of at most _TEMPORARY_BYTES, but never fewer examples than threads (a cap below one
    # example gives two per temporary); a larger weight's are written in place, with no temporary
    hugging_face()
    from transformers.pytorch_utils import Conv1D

    import tracin.torch.layer_rules as layer_rules

    torch.manual_seed(0)
    layer = nn.Linear(48, 40) if kind == "linear" else Conv1D(40, 48)
    g = torch.Generator().manual_seed(4)
    x, b = torch.randn(7, 19, 48, generator=g), torch.randn(7, 19, 40, generator=g)
    want = torch.stack(  # independent reference: float64 autograd of <b_i, layer(x_i)>, one example at a time
        [torch.autograd.grad((layer.double()(x[i].double()) * b[i].double()).sum(), layer.weight)[0] for i in range(7)]
    )
    layer.float()
    a, b_tokens = token_form(layer, Call(x, b), 7)
    shape, width = tuple(layer.weight.shape), layer.weight.numel()

    def write(threads: int) -> torch.Tensor:
        rows = torch.full((7, width + 5), 7.0)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            write_per_example_grad(layer, "weight", a, b_tokens, rows[:, 2 : 2 + width].view(7, *shape), False)
        finally:
            torch.set_num_threads(saved)
        return rows

    in_place, uncapped = write(1), write(2)  # uncapped: one temporary (the default cap and size limit)
    temporaries = []
    bmm = torch.bmm

    def recording_bmm(left, right, **kwargs):
        result = bmm(left, right, **kwargs)
        if "out" not in kwargs:
            temporaries.append(result.shape[0])
        return result

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    monkeypatch.setattr(layer_rules, "_TEMPORARY_BYTES", cap_examples * width * 4 + 100)
    monkeypatch.setattr(layer_rules, "_SMALL_GEMM", width if small_gemm else width - 1)
    capped = write(2)
    assert temporaries == batches
    assert torch.equal(capped, in_place) and torch.equal(capped, uncapped)
    assert torch.equal(capped[:, :2], torch.full((7, 2), 7.0)) and torch.equal(
        capped[:, 2 + width :], torch.full((7, 3), 7.0)
    )
    torch.testing.assert_close(capped[:, 2 : 2 + width].view(7, *shape).double(), want, rtol=1e-5, atol=1e-5)


def inplace_relu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)
    )


def test_inplace_ops_after_captured_layers_keep_the_hook_path_exactly():
    """ReLU(inplace=True) after a captured Linear: was a RuntimeError in the pass (an in-place op on the
    leaf started at the first layer), so the hooks were given up with a warning (5.6x slower)."""
    model = inplace_relu_mlp()
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    names = [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), CE, batch_size=4, progress=False)
    want = autograd_rows(copy.deepcopy(model).double(), names, CE, {"input": x.double()}, y)
    np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-6)
    proj = tracin.Projection(3 * 16, 2, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), CE, projection=proj, progress=False)
    layout = k.metadata["projection"]["segments"]
    projected = proj.apply(want.astype(np.float32), segments=layout)
    np.testing.assert_allclose(k.matrices[0], projected, rtol=1e-5, atol=1e-5 * np.abs(projected).max())


def test_only_layers_holding_no_parameters_but_weight_and_bias_are_covered():
    from tracin.torch.capture import NotCaptured
    from tracin.torch.layer_rules import covers, not_covered

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        weight_norm, spectral = nn.utils.weight_norm(nn.Linear(3, 2)), nn.utils.spectral_norm(nn.Linear(3, 2))
    plain = [nn.Linear(3, 2), nn.Linear(3, 2, bias=False), nn.Embedding(4, 3), nn.LayerNorm(3)]
    parametrized = nn.utils.parametrizations.orthogonal(nn.Linear(3, 3))  # holds only its bias itself
    assert all(covers(m) and not_covered(m) is None for m in [*plain, parametrized])
    for module, held in [(weight_norm, "weight_g, weight_v"), (spectral, "weight_orig")]:
        assert not covers(module) and not_covered(module).startswith(f"holds parameters {held} besides")
        call = Call(torch.randn(5, 3), torch.randn(5, 2))
        with pytest.raises(NotCaptured, match=f"Linear holds parameters {held}"):
            token_form(module, call, 5)
    assert not_covered(nn.Conv1d(1, 1, 1)) is None  # another type: not "not covered" for its parameters
    model = nn.Sequential(nn.Linear(3, 3), weight_norm)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(HookGradients(model, names, CE).plan) == ["0.bias", "0.weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_gpt2_keeps_the_hooks_though_its_layer_norms_sum_their_tokens_in_sixteen_bits(dtype):
    """Was the sum check's warning and every batch recomputed one example at a time (review fr147): torch's CPU
    LayerNorm backward sums its weight's gradient over the batch's 2048 tokens in 16 bits, 4-6 eps off the float64
    sum on 4 threads and 34 eps (bfloat16) on one, over the check's tolerance without tokens; a 16-bit sum of T
    positions is checked within eps x T."""
    model = tiny_gpt2().to(dtype)
    ids = torch.randint(0, 50, (128, 16), generator=torch.Generator().manual_seed(3))

    def loss(out, target):
        logits = out.logits[:, :-1]
        return CE(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1)).view(len(target), -1).sum(1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread sums the 2048 tokens in the coarsest order (34 eps off in bfloat16)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_gradients(model, [(model.state_dict(), 1.0)], (ids, ids), loss, batch_size=128, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not [w for w in caught if "do not sum" in str(w.message)]


def _one_row_reuse(row: int):
    """A forward hook on a Linear adding, for batch row `row` only, its own weight's product less the same with the
    weight detached: the output unchanged, but a use of the weight the hooks do not see, whose gradient is that
    row's hooked one over again."""

    def hook(module, args, output):
        (x,) = args
        mask = torch.zeros(len(x), 1, dtype=x.dtype)
        mask[row] = 1
        return (
            output + (nn.functional.linear(x, module.weight) - nn.functional.linear(x, module.weight.detach())) * mask
        )

    return hook


def _sum_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, directional: bool) -> HookGradients:
    """HookGradients of model's first weight on one batch (its batch-sum check along the directions or not)."""
    hooks = HookGradients(model, ["0.weight"], CE)
    assert hooks.directional == {"0.weight"}  # a 64 x 64 weight: the directions cost a quarter of the full sum
    if not directional:
        hooks.directional = set()
    out = torch.empty(len(y), model[0].weight.numel())
    silent, unusable = hooks(dict(model.state_dict()), x, y, out, {"0.weight": (0, out.shape[1])})
    assert silent == [] and unusable == {}
    return hooks


@pytest.mark.parametrize("directional", [True, False])
@pytest.mark.parametrize("same_rows", [False, True])
def test_the_batch_sum_check_along_directions_sees_a_use_missed_in_one_row_of_thousands(same_rows, directional):
    """The batch-sum check of a (64, 64) weight along SUM_DIRECTIONS Gaussian directions, as the full sum does, sees
    a forward hook reusing the weight in one row of a float32 batch of 8000: random rows (the miss ~1 / sqrt(B) of
    the scale) and copies of one row (the worst case: 1 / (B + 1) of it, parallel to the batch's gradient, 1.14x
    the float32 tolerance 1.1e-4); without the hook neither flags the rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    rows = 8000
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1 if same_rows else rows, 64, generator=g).expand(rows, 64).contiguous()
    y = torch.randint(0, 4, (1 if same_rows else rows,), generator=g).expand(rows).contiguous()
    assert not _sum_check(model, x, y, directional).unsummed
    model[0].register_forward_hook(_one_row_reuse(rows // 2))
    found = _sum_check(model, x, y, directional).unsummed
    assert set(found) == {"0"}, found
    gap, tolerance = found["0"]
    assert tolerance == pytest.approx(1.1e-4)
    if same_rows:  # the miss is parallel to the gradient: its ratio to it, exact along the directions too
        assert gap == pytest.approx(1 / (rows + 1), rel=1e-2)  # up to float32 rounding of 8000 rows
    else:
        assert 0.2 / np.sqrt(rows) < gap < 5 / np.sqrt(rows)


class PaddedBag(nn.Module):
    """Summed embeddings of padded ids (padding_idx 0) and a Linear classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(512, 64, padding_idx=0), nn.Linear(64, 4)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids).sum(1))


@pytest.mark.parametrize("kind", ["gpt2", "padded_bag"])
def test_sketched_batch_sums_are_the_directions_times_autograd_gradients_for_every_kind(kind):
    """_sketch of a call's tokens (Linear, HF Conv1D, a weight tied between an Embedding and the output Linear: GPT-2
    of width 64 and vocabulary 512, whose weights all take the directions; an Embedding with padding) is u times
    autograd's float64 gradient of the summed loss, and _unsummed_along passes it."""
    from tracin.torch import hook_gradients

    inputs, labels = padded_sequences(6, 12, 512, seed=5)
    if kind == "gpt2":
        hugging_face()
        model, loss_fn = tiny_gpt2(n_embd=64, vocab_size=512, n_positions=64).double(), token_loss
    else:
        model, loss_fn = PaddedBag().double(), CE
        labels = torch.arange(len(labels)) % 4
        assert (inputs["input_ids"] == 0).any()  # padding: no gradient for the embedding's row 0
    names = [n for n, _ in model.named_parameters()]
    hooks = HookGradients(model, names, loss_fn)
    weights = {n for n in names if n.endswith("weight") and ".ln_" not in n and n != "head.weight"}
    assert hooks.directional == weights and ("transformer.wte.weight" in weights or kind != "gpt2")
    columns, offset = {}, 0
    for n, p in model.named_parameters():
        columns[n], offset = (offset, p.numel()), offset + p.numel()
    out = torch.empty(len(labels), offset, dtype=torch.float64)
    sketched = {}
    real = hook_gradients._sketch

    def spy(module, a, b, u):
        part = real(module, a, b, u)
        sketched.setdefault(id(module), []).append((u, part))
        return part

    hook_gradients._sketch = spy
    try:
        state = {k: v for k, v in model.state_dict().items() if k not in tied_aliases(model)}
        hooks(state, inputs, labels, out, columns)
    finally:
        hook_gradients._sketch = real
    assert hooks.unsummed == {}
    loss = loss_fn(model(**inputs), labels).sum()
    params = dict(model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))
    modules = dict(model.named_modules())
    for name in weights:
        holders = hooks.plan[name]
        parts = [part for m, _ in holders for part in sketched[id(modules[m])]]
        u = parts[0][0]
        assert u.dtype == torch.float64 and u.shape == (16, params[name].shape[0])
        got = sum(part for _, part in parts)
        want = u @ grads[name]
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-11 * want.abs().max().item())


class TokenTagger(nn.Module):
    """Per-token classes of (batch, T, 6) inputs through Linear, Tanh, LayerNorm, Linear, Tanh and a Linear head;
    with `reuse`, its head's weight is also used outside its forward (`reuse` x F.linear), unseen by the hooks."""

    def __init__(self, reuse: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 32, bias=False), nn.Tanh()
        )
        self.head, self.reuse = nn.Linear(32, 5), reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.body(x)
        out = self.head(t)
        return out + self.reuse * nn.functional.linear(t, self.head.weight) if self.reuse else out


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float().transpose(1, 2), y, reduction="none").sum(1)


def _autocast_rows(
    reuse: float, tokens: int, seed: int, rows: int = 8
) -> tuple[PerExampleGradients, np.ndarray, np.ndarray, list]:
    """(PerExampleGradients, its rows of `rows` examples under CPU bfloat16 autocast, the float64 autograd rows of
    each example alone, warnings) for a TokenTagger."""
    torch.manual_seed(seed)
    model = TokenTagger(reuse)
    x, y = torch.randn(rows, tokens, 6), torch.randint(0, 5, (rows, tokens))
    names = [n for n, _ in model.named_parameters()]
    compute = PerExampleGradients(model, names, _token_ce)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        got = compute(model.state_dict(), x, y).double().numpy()
    exact = copy.deepcopy(model).double()
    params = dict(exact.named_parameters())
    want = []
    for i in range(len(y)):
        grads = torch.autograd.grad(_token_ce(exact(x[i : i + 1].double()), y[i : i + 1]).sum(), list(params.values()))
        want.append(torch.cat([g.reshape(-1) for g in grads]))
    return compute, got, torch.stack(want).numpy(), caught


@pytest.mark.parametrize(("tokens", "rows"), [(64, 32), (256, 8)])
def test_a_float32_layer_norm_under_bfloat16_autocast_keeps_the_hooks_without_a_sum_warning(tokens, rows):
    """Was the sum check's warning naming the LayerNorm and every batch recomputed one example at a time (fr242): CPU
    autocast runs a float32 LayerNorm on its bfloat16 input, and its backward sums the weight's and bias's gradients
    over the batch's 2048 positions in bfloat16 (its bias 3-15% off); the check's hooked side now takes those same
    16-bit sums (torch's LayerNorm backward rerun on the call's tensors, fr247)."""
    compute, got, want, caught = _autocast_rows(0.0, tokens, seed=tokens, rows=rows)
    assert compute.hooks is not None and compute.unsummed_batches == 0
    assert not [str(w.message) for w in caught]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # bfloat16: ~0.004 measured


def _hooked_under_bfloat16_autocast(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> HookGradients:
    """The HookGradients of every parameter of `model` after one hooked pass over (x, y) under CPU bfloat16
    autocast: its `unsummed` holds what the sum check flagged."""
    params = dict(model.named_parameters())
    columns, width = {}, 0
    for name, p in params.items():
        columns[name], width = (width, p.numel()), width + p.numel()
    hooks = HookGradients(model, list(params), _token_ce)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hooks(dict(model.state_dict()), x, y, torch.empty(len(x), width), columns)
    return hooks


def test_a_head_weight_reused_outside_its_forward_under_bfloat16_autocast_is_still_flagged():
    """A head weight also used by 30% outside its forward (fr242's miss), 256 positions under CPU bfloat16 autocast:
    the first rows' check or the sum check (the head's tolerance unchanged) sees it; the rows are then exact up to
    bfloat16, where the hooks alone miss 0.3 / 1.3 of the head's gradient."""
    compute, got, want, caught = _autocast_rows(0.3, 256, seed=256)
    assert compute.hooks is None or compute.unsummed_batches > 0
    assert [w for w in caught if "given up" in str(w.message) or "do not sum" in str(w.message)]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    # the sum check alone (first rows' check or not): the hooked sum misses 0.3 / 1.3 of autograd's, 10x the tolerance
    torch.manual_seed(256)
    model = TokenTagger(0.3)
    hooks = _hooked_under_bfloat16_autocast(model, torch.randn(8, 256, 6), torch.randint(0, 5, (8, 256)))
    assert set(hooks.unsummed) == {"head"}
    gap, tolerance = hooks.unsummed["head"]
    assert gap == pytest.approx(0.3 / 1.3, rel=0.01) and tolerance == pytest.approx(3 * 2**-7)


def test_sum_directions_are_drawn_on_the_cpu_whatever_the_default_device():
    """The fixed directions come from a CPU generator: drawn on the CPU under another default device (fr242: a
    torch.set_default_device elsewhere made them there, here meta tensors without values), the same as without it."""
    hooks = HookGradients(nn.Linear(64, 64), ["weight"], CE)
    want = hooks._along(64, torch.float32, torch.device("cpu"))
    hooks._directions.clear()
    with torch.device("meta"):
        got = hooks._along(64, torch.float32, torch.device("cpu"))
    assert got.device.type == "cpu" and torch.equal(got, want)


class LayerNormReused(TokenTagger):
    """A TokenTagger whose LayerNorm's weight and bias are also used outside its forward (`reuse` x F.layer_norm of
    the same input), unseen by the hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body[1](self.body[0](x))
        norm = self.body[2]
        t = norm(h) + self.reuse * nn.functional.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias)
        return self.head(self.body[4](self.body[3](t)))


@pytest.mark.parametrize("tokens", [16, 64, 256])
def test_a_layer_norm_weight_reused_outside_its_forward_under_bfloat16_autocast_is_flagged(tokens):
    """fr247: judged as 16-bit sums (eps x positions: 128 positions are 1.0 of its size in bfloat16), a LayerNorm's
    weight and bias used by 10% outside its forward passed the sum check unseen, its rows 9% off. Its hooked sums are
    now those of torch's own 16-bit LayerNorm backward, which the sum check compares at one position's tolerance."""
    torch.manual_seed(tokens)
    model = LayerNormReused(0.1)
    hooks = _hooked_under_bfloat16_autocast(model, torch.randn(8, tokens, 6), torch.randint(0, 5, (8, tokens)))
    assert set(hooks.unsummed) == {"body.2"}
    gap, tolerance = hooks.unsummed["body.2"]
    assert gap == pytest.approx(0.1 / 1.1, rel=0.15) and tolerance < gap / 2


def test_rows_that_cancel_are_judged_at_the_scale_of_the_rows_not_of_their_small_sum():
    """A well-fit batch: rows of norm ~1 summing to ~1e-6. Rounding of the rows' scale (1e-9) is no missed use, a
    gap of a whole row is one (_unsummed: the scale is the larger of |total| and the rows' Frobenius norm)."""
    from tracin.torch.hook_gradients import _unsummed

    rng = np.random.default_rng(0)
    row = torch.from_numpy(rng.normal(size=8))
    total = torch.from_numpy(rng.normal(size=8)) * 1e-6
    rows = torch.stack([row, total - row]).float()
    assert _unsummed(total + 1e-9, total, rows) is None
    gap, tolerance = _unsummed(total + row, total, rows)
    assert gap == pytest.approx(torch.linalg.vector_norm(row).item() / torch.linalg.vector_norm(rows).item(), rel=1e-3)


class _SkippedBranch(nn.Module):
    """A covered layer the forward does not call (an expert no example of the batch was routed to)."""

    def __init__(self):
        super().__init__()
        self.used, self.skipped = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def test_the_columns_of_a_layer_that_did_not_run_are_written_as_zeros():
    """Its parameters' rows are zero (no use, no gradient), whatever `out` held before (a buffer reused from the
    previous batch: that batch's rows, say)."""
    model = _SkippedBranch().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    names = [n for n, _ in model.named_parameters()]
    hooks = HookGradients(model, names, CE)
    columns, offset = {}, 0
    for n, p in model.named_parameters():
        columns[n], offset = (offset, p.numel()), offset + p.numel()
    out = torch.full((5, offset), 7.0, dtype=torch.float64)
    silent, unusable = hooks(model.state_dict(), {"x": x}, y, out, columns)
    assert silent == ["skipped"] and unusable == {}
    used = columns["skipped.weight"][0]
    assert (out[:, used:] == 0).all()
    want = autograd_rows(model, ["used.weight", "used.bias"], CE, {"x": x}, y)
    np.testing.assert_allclose(out[:, :used].numpy(), want, rtol=1e-12, atol=1e-14 * np.abs(want).max())


@pytest.mark.parametrize("times", [0.5, 3.0])
def test_the_sketched_sum_check_measures_a_miss_at_its_own_size(times):
    """_unsummed_along's ||u X||_F / sqrt(K) estimates ||X||_F (K = 16 Gaussian directions): a miss X of `times` the
    tolerance times the rows' norm (nothing summed: total None) passes at 0.5 and is measured at ~3x (not 12x, an
    estimate without the 1 / sqrt(K), which would flag a well-fit batch's rounding as a missed use)."""
    from tracin.torch.first_rows_check import tolerances
    from tracin.torch.hook_gradients import SUM_DIRECTIONS, _unsummed_along

    g = torch.Generator().manual_seed(0)
    p, q = 32, 48
    u = torch.randn(SUM_DIRECTIONS, p, generator=g)
    rows = torch.randn(10, p * q, generator=g)
    tol = max(sum(tolerances(torch.float32)), sum(tolerances(torch.float32, 1, widened=False)))
    miss = torch.randn(p, q, generator=g, dtype=torch.float64)
    miss *= times * tol * torch.linalg.vector_norm(rows.double()) / torch.linalg.vector_norm(miss)
    found = _unsummed_along((u.double() @ miss).float(), None, u, rows, 1, torch.float32)
    if times < 1:
        assert found is None
    else:
        assert found is not None and found[1] == pytest.approx(tol) and found[0] == pytest.approx(times * tol, rel=0.2)


def test_only_the_layer_types_own_forward_is_covered():
    """A Linear subclass overriding forward, and a user's own class named Conv1D (not transformers'), compute
    something else from their weight: neither is covered, so neither gets the Linear / Conv1D rule's rows."""
    from tracin.torch.layer_rules import covers

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Conv1D(nn.Module):  # a 1-D convolution by that name, weight (out, in, kernel)
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(2, 3, 1)), nn.Parameter(torch.randn(2))

        def forward(self, x):
            return nn.functional.conv1d(x, self.weight, self.bias)

    class Kept(nn.Linear):  # a subclass keeping Linear's forward is covered
        pass

    assert covers(Kept(3, 2)) and not covers(Doubled(3, 2)) and not covers(Conv1D())


def test_a_sync_batch_norm_without_running_stats_leaves_the_hook_path_and_stays_per_example():
    """nn.SyncBatchNorm (convert_sync_batchnorm's) normalises with batch statistics as BatchNorm1d does."""
    torch.manual_seed(0)
    mixer = nn.Sequential(nn.Unflatten(1, (2, 4)), nn.SyncBatchNorm(2, track_running_stats=False), nn.Flatten())
    model = nn.Sequential(nn.Linear(6, 8), mixer, nn.Tanh(), nn.Linear(8, 4)).double().eval()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    _, got, caught = hook_rows(model, names, CE, {"input": x}, y)
    assert any("mix the examples of a batch even in eval mode" in str(w.message) for w in caught)
    want = autograd_rows(model, names, CE, {"input": x}, y)  # each example alone, as TracIn defines it
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_an_unreached_calls_gradient_is_zeros_and_a_keyword_input_is_captured():
    """The loss never sees `unused`'s output: its call gets zeros, not uninitialised memory (deterministic mode
    fills torch.empty with NaN, so an empty tensor handed over shows); a layer called by keyword (fc(input=x))
    is captured with that input, not refused."""

    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(input=x)

    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    model = TwiceAndUnused().double()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        calls = capture(model, ["unused", "head"], state, CE, x, y)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(calls["unused"][0].grad, torch.zeros(5, 2, dtype=torch.float64))
    keyword = ByKeyword().double()
    calls = capture(keyword, ["fc"], {k: v.detach() for k, v in keyword.state_dict().items()}, CE, x, y)
    assert torch.equal(calls["fc"][0].input, x) and calls["fc"][0].grad.shape == (5, 3)
