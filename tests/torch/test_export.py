"""export_gradients end to end, against Captum TracInCP as the oracle."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch_oracle import (
    assert_scores_match,
    captum_scores,
    captum_tracin,
    classification_data,
    cnn_with_checkpoints,
    mlp,
    train_checkpoints,
)

import tracin
from tracin.torch import export_gradients

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture
def trained(tmp_path):
    model = mlp()
    train = classification_data(40, seed=1)
    test = classification_data(7, seed=2)
    checkpoints = train_checkpoints(model, *train, tmp_path)
    return model, checkpoints, train, test


def test_scores_top_k_and_self_influence_match_captum(trained):
    model, checkpoints, train, test = trained
    g_train = export_gradients(model, checkpoints, train, LOSS, batch_size=16, progress=False)
    g_test = export_gradients(model, checkpoints, test, LOSS, progress=False)
    oracle = captum_tracin(model, checkpoints, train)

    expected = captum_scores(oracle, test)
    assert_scores_match(tracin.scores(g_test, g_train), expected)

    both = tracin.top_k(g_test, g_train, k=5, side="both")
    for ours, proponents in ((both.proponents, True), (both.opponents, False)):
        theirs_idx, theirs_val = oracle.influence(test, k=5, proponents=proponents)
        np.testing.assert_array_equal(ours.indices, theirs_idx.numpy())
        assert_scores_match(ours.values, theirs_val.numpy(), rtol=1e-4)

    theirs_self = oracle.self_influence().detach().numpy()
    np.testing.assert_allclose(tracin.self_influence(g_train), theirs_self, rtol=1e-4)


def test_weights_are_the_learning_rates_and_metadata_describes_the_export(trained):
    model, checkpoints, train, _ = trained
    g = export_gradients(model, checkpoints, train, LOSS, progress=False)
    np.testing.assert_array_equal(g.weights, [lr for _, lr in checkpoints])
    meta = g.metadata
    assert meta["framework"] == "torch" and meta["mode"] == "full" and meta["dtype"] == "float32"
    assert meta["params"] == [{"name": n, "shape": list(p.shape)} for n, p in model.named_parameters()]
    assert sum(p.numel() for p in model.parameters()) == g.dims[0]
    assert meta["projection"] is None and meta["layers"] is None and "last_layer" not in meta
    assert len(meta["fingerprints"]["checkpoints"]) == len(checkpoints)
    assert not any("version" in key for key in meta)  # versions would break resuming after an upgrade


def test_layers_by_prefix_and_glob_match_captum_layers(trained):
    model, checkpoints, train, test = trained
    layers = ["2", "4.*"]
    g_train = export_gradients(model, checkpoints, train, LOSS, layers=layers, progress=False)
    g_test = export_gradients(model, checkpoints, test, LOSS, layers=layers, progress=False)
    oracle = captum_tracin(model, checkpoints, train, layers=["2", "4"])
    assert_scores_match(tracin.scores(g_test, g_train), captum_scores(oracle, test))
    assert [p["name"] for p in g_train.metadata["params"]] == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert g_train.metadata["layers"] == layers


def test_cnn_with_batchnorm_and_dropout_runs_in_eval_mode_like_captum_on_an_eval_model(tmp_path):
    model, checkpoints, (x, y) = cnn_with_checkpoints(tmp_path, 30)
    train, test = (x[:24], y[:24]), (x[24:], y[24:])
    assert model.training  # the user's model is in train mode; the export must not use batch stats
    g_train = export_gradients(model, checkpoints, train, LOSS, batch_size=8, progress=False)
    g_test = export_gradients(model, checkpoints, test, LOSS, progress=False)
    oracle = captum_tracin(model, checkpoints, train)
    assert_scores_match(tracin.scores(g_test, g_train), captum_scores(oracle, test))
    # dropout off: the same export twice is bitwise identical
    again = export_gradients(model, checkpoints, test, LOSS, progress=False)
    np.testing.assert_array_equal(again.matrices[0], g_test.matrices[0])


class TinyAttention(nn.Module):
    """Embedding + one self-attention block + mean pooling over unmasked tokens + classifier."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        a, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1))


def test_dict_inputs_with_embedding_and_attention_match_captum(tmp_path, recwarn):
    torch.manual_seed(0)
    model = TinyAttention()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 20, (30, 5), generator=g)
    mask = torch.ones(30, 5, dtype=torch.long)
    mask[::3, 3:] = 0  # some padded sequences
    y = torch.randint(0, 3, (30,), generator=g)
    checkpoints = train_checkpoints(model, (ids, mask), y, tmp_path)
    train = ({"input_ids": ids[:24], "attention_mask": mask[:24]}, y[:24])
    test = ({"input_ids": ids[24:], "attention_mask": mask[24:]}, y[24:])
    g_train = export_gradients(model, checkpoints, train, LOSS, batch_size=10, progress=False)
    g_test = export_gradients(model, checkpoints, test, LOSS, progress=False)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # vmap path, no fallback
    oracle = captum_tracin(model, checkpoints, (ids[:24], mask[:24], y[:24]))
    expected = captum_scores(oracle, (ids[24:], mask[24:], y[24:]))
    assert_scores_match(tracin.scores(g_test, g_train), expected)
    layers = export_gradients(model, checkpoints, test, LOSS, layers=["attn.*proj*"], progress=False)
    assert [p["name"] for p in layers.metadata["params"]] == [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
    ]


def test_model_is_left_exactly_as_it_was(trained):
    model, checkpoints, train, _ = trained
    model.train()
    model[1].eval()  # a mixed-mode model
    model[0].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    export_gradients(model, checkpoints, train, LOSS, progress=False)
    export_gradients(model, checkpoints, train, LOSS, mode="last_layer", progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(
        (g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (nn.CrossEntropyLoss(), "reduction='mean'"),
        (nn.CrossEntropyLoss(reduction="sum"), "reduction='sum'"),
        (lambda out, y: nn.functional.cross_entropy(out, y), "mean- or sum-reduced"),
        (lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum"), "mean- or sum-reduced"),
        (lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")[:, None], r"shape \(40,\)"),
        ("cross_entropy", "must be callable"),
    ],
)
def test_reduced_or_malformed_losses_are_refused(trained, loss_fn, message):
    model, checkpoints, train, _ = trained
    with pytest.raises((ValueError, TypeError), match=message):
        export_gradients(model, checkpoints, train, loss_fn, progress=False)


def test_a_reduced_loss_is_refused_even_with_batches_of_one(trained):
    model, checkpoints, train, _ = trained
    with pytest.raises(ValueError, match="mean- or sum-reduced"):
        export_gradients(
            model, checkpoints, train, lambda o, y: nn.functional.cross_entropy(o, y), batch_size=1, progress=False
        )


def test_a_loss_squeezing_away_the_batch_of_the_last_one_row_batch_is_named_as_such(trained):
    """review293 F1: a .squeeze() without a dim runs on batches of two rows or more and drops the batch
    dimension on the data's own last batch of one row; the error said only "mean- or sum-reduced"."""
    model, checkpoints, (x, y), _ = trained
    squeezing = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none").squeeze()  # noqa: E731
    export_gradients(model, checkpoints, (x[:16], y[:16]), squeezing, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"got shape \(\)\. On a batch of one row.*\.squeeze\(\) without a dim") as e:
        export_gradients(model, checkpoints, (x[:17], y[:17]), squeezing, batch_size=8, progress=False)
    assert "reduction='none'" in str(e.value)


def test_an_error_of_the_first_rows_check_names_the_rows_it_ran_and_the_batch_shapes(trained):
    """review293 F2: torch's "Expected target size [2, 11], got [2, 10]" counted the check's two rows, not
    the batch's; the error now says which rows ran and the batch's shapes."""
    model, checkpoints, (x, y), _ = trained

    def shifted(out, t):  # targets one column short: fails on every batch
        return nn.functional.cross_entropy(
            out[:, :, None].expand(-1, -1, 3), t[:, None].expand(-1, 2), reduction="none"
        )

    with pytest.raises(RuntimeError) as e:
        export_gradients(model, checkpoints, (x, y), shifted, batch_size=8, progress=False)
    said = str(e.value)
    assert said.startswith("Expected target size [2, 3], got [2, 2]")
    assert f"rows 0..1 of the first batch of 8; the batch's inputs {tuple(x[:8].shape)}, targets (8,)" in said


def test_cpu_out_of_memory_in_the_first_rows_check_is_raised_as_torch_words_it(trained):
    """fr301: CPU out of memory is a plain RuntimeError; the first-rows note would point at the shapes."""
    model, checkpoints, (x, y), _ = trained
    said = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 140737488355328 bytes."

    def greedy(out, t):
        raise RuntimeError(said)

    with pytest.raises(RuntimeError) as e:
        export_gradients(model, checkpoints, (x, y), greedy, batch_size=8, progress=False)
    assert str(e.value) == said


def test_every_data_form_gives_the_same_rows(trained):
    model, checkpoints, (x, y), _ = trained
    expected = export_gradients(model, checkpoints, (x, y), LOSS, batch_size=7, progress=False)
    forms = {
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=6),
        "list of batches": [(x[i : i + 9], y[i : i + 9]) for i in range(0, 40, 9)],
    }
    for name, data in forms.items():
        got = export_gradients(model, checkpoints, data, LOSS, batch_size=4, progress=False)
        for a, b in zip(got.matrices, expected.matrices, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    one = export_gradients(
        model, checkpoints[:1], ((x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)), LOSS, progress=False
    )  # a generator: row count unknown up front
    np.testing.assert_allclose(one.matrices[0], expected.matrices[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "factored", "last_layer"])
def test_a_dataset_is_read_in_batches_of_batch_size(trained, mode):
    """A map-style Dataset is batched like a tensor pair (batch_size rows per forward), not row by row."""
    model, checkpoints, (x, y), _ = trained
    sizes: list[int] = []
    hook = model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    try:
        export_gradients(model, checkpoints[:1], TensorDataset(x, y), LOSS, mode=mode, batch_size=16, progress=False)
    finally:
        hook.remove()
    # the first-row and first-rows checks run on a few rows; mode="full" also runs the last row of each of the 3
    # batches alone (the hooks' spot check of an output depending on its batch, review72 F1)
    assert sizes.count(16) >= 2 and sizes.count(1) <= 4 + (3 if mode == "full" else 0)


def test_data_errors_are_explained(trained):
    model, checkpoints, (x, y), _ = trained
    with pytest.raises(ValueError, match="shuffle=False"):
        export_gradients(model, checkpoints, DataLoader(TensorDataset(x, y), shuffle=True), LOSS, progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        export_gradients(model, checkpoints, iter([(x, y)]), LOSS, progress=False)
    with pytest.raises(ValueError, match="inputs have 40 rows but targets have 5"):
        export_gradients(model, checkpoints, (x, y[:5]), LOSS, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        export_gradients(model, checkpoints, 3, LOSS, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "diagonal"}, "mode must be"),
        ({"dtype": "float64"}, "dtype must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"projection": object()}, "tracin.Projection"),
    ],
)
def test_bad_options_are_refused(trained, kwargs, message):
    model, checkpoints, train, _ = trained
    with pytest.raises((ValueError, TypeError), match=message):
        export_gradients(model, checkpoints, train, LOSS, progress=False, **kwargs)


@pytest.mark.parametrize("progress", ["no", 1, 0.0])
def test_progress_must_be_a_bool_or_none(trained, progress):
    model, checkpoints, train, _ = trained
    with pytest.raises(TypeError, match=f"progress must be True, False or None .*got {progress!r}"):
        export_gradients(model, checkpoints, train, LOSS, progress=progress)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_is_the_rounded_float32_gradient(trained, dtype):
    model, checkpoints, train, test = trained
    full = export_gradients(model, checkpoints, train, LOSS, progress=False)
    half = export_gradients(model, checkpoints, train, LOSS, dtype=dtype, progress=False)
    assert half.dtypes == (dtype,) * 3 and half.metadata["dtype"] == dtype
    torch_dtype = getattr(torch, dtype)
    for h, f in zip(half.matrices, full.matrices, strict=True):
        expected = torch.from_numpy(f).to(torch_dtype)
        got = torch.from_numpy(h).view(torch_dtype) if dtype == "bfloat16" else torch.from_numpy(h)
        assert torch.equal(got, expected)


def test_progress_bar_counts_examples_per_checkpoint(trained, capsys):
    model, checkpoints, train, _ = trained
    export_gradients(model, checkpoints, train, LOSS, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "40/40" in err and "120/120" not in err and "ex/s" in err and "checkpoint 3/3" in err
    export_gradients(model, checkpoints, train, LOSS, progress=False)
    assert capsys.readouterr().err == ""
    export_gradients(model, checkpoints, train, LOSS)  # automatic: no bar for a fraction of a second
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("per_layer", [False, True])
def test_projection_is_applied_to_every_batch_before_storing(trained, per_layer):
    model, checkpoints, train, _ = trained
    projection = tracin.Projection(12, seed=3, per_layer=per_layer)
    full = export_gradients(model, checkpoints, train, LOSS, progress=False)
    projected = export_gradients(model, checkpoints, train, LOSS, projection=projection, batch_size=16, progress=False)
    widths = [int(np.prod(p["shape"])) for p in full.metadata["params"]]
    assert projected.dims == (12,) * 3 and projected.metadata["projection"] == projection.to_dict()
    for got, g in zip(projected.matrices, full.matrices, strict=True):
        expected = projection.apply(g, segments=widths if per_layer else None)  # segments: per_layer only
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_projection_of_last_layer_factors_is_the_kronecker_projection(trained):
    model, checkpoints, train, _ = trained
    projection = tracin.Projection(12, seed=4)
    factors = export_gradients(model, checkpoints, train, LOSS, mode="last_layer", progress=False)
    projected = export_gradients(
        model, checkpoints, train, LOSS, mode="last_layer", projection=projection, progress=False
    )
    for left, right, pl, pr in zip(factors.left, factors.right, projected.left, projected.right, strict=True):
        el, er = projection.apply_factored(left, right)
        np.testing.assert_allclose(pl, el, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pr, er, rtol=1e-5, atol=1e-6)


class _Reshuffling:
    """A re-iterable that yields the same batches in a new order on every pass (like an iterable
    dataset that shuffles)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        order = list(range(len(self.batches)))
        order = order[self.passes % len(order) :] + order[: self.passes % len(order)]
        return iter([self.batches[i] for i in order])


def test_data_that_changes_order_between_checkpoints_is_refused(trained):
    model, checkpoints, (x, y), _ = trained
    data = _Reshuffling([(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)])
    with pytest.raises(ValueError, match="checkpoint 1: batch 0 of the data holds other targets"):
        export_gradients(model, checkpoints, data, LOSS, progress=False)


def test_equal_width_gradients_of_different_layers_are_not_scored_together(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    x, y = classification_data(10, seed=3, features=4)
    first = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), LOSS, layers=["0"], progress=False)
    third = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), LOSS, layers=["2"], progress=False)
    assert first.dims == third.dims
    with pytest.raises(ValueError, match=r"different parameters: \['0.weight', '0.bias'\] vs \['2.weight', '2.bias'\]"):
        tracin.scores(first, third)


def test_gradients_beyond_the_float16_range_are_an_error_at_export(trained, tmp_path):
    model, checkpoints, data, _ = trained
    huge = lambda out, y: LOSS(out, y) * 1e6  # noqa: E731  (gradients far above 65504)
    for store in (None, tmp_path / "g"):
        with pytest.raises(ValueError, match="beyond the float16 range"):
            export_gradients(model, checkpoints, data, huge, dtype="float16", store=store, progress=False)


def test_numpy_batch_sizes_and_data_are_accepted(trained):
    model, checkpoints, (x, y), _ = trained
    ref = export_gradients(model, checkpoints, (x, y), LOSS, batch_size=5, progress=False)
    got = export_gradients(model, checkpoints, (x.numpy(), y.numpy()), LOSS, batch_size=np.int64(5), progress=False)
    for a, b in zip(ref.matrices, got.matrices, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="batch_size must be a positive integer"):
        export_gradients(model, checkpoints, (x, y), LOSS, batch_size=5.0, progress=False)


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_empty_data_is_refused_clearly(trained, mode):
    model, checkpoints, (x, y), _ = trained
    for data in ((x[:0], y[:0]), [], iter([])):
        with pytest.raises(ValueError, match="data has no rows"):
            export_gradients(model, checkpoints[:1], data, LOSS, mode=mode, progress=False)


def test_full_float32_rows_are_computed_straight_into_the_result(trained, monkeypatch):
    from tracin.torch import export as torch_export

    model, checkpoints, train, _ = trained

    def no_copy_path(self, state, batch):
        raise AssertionError("full float32 rows in memory must be computed in place, not copied")

    monkeypatch.setattr(torch_export._TorchExport, "compute", no_copy_path)
    g = export_gradients(model, checkpoints, train, LOSS, batch_size=16, progress=False)  # (values: the Captum tests)
    assert g.n_rows == 40 and g.dims == (sum(p.numel() for p in model.parameters()),) * 3
    with pytest.raises(AssertionError, match="computed in place"):  # a projection needs the rows first
        export_gradients(model, checkpoints, train, LOSS, projection=tracin.Projection(4), progress=False)


def test_a_store_export_failing_before_its_first_batch_releases_the_store(trained, tmp_path, monkeypatch):
    from tracin._export import driver

    model, checkpoints, train, _ = trained

    def no_bar(*args, **kwargs):
        raise ImportError("tqdm is not installed")

    monkeypatch.setattr(driver, "progress_bar", no_bar)
    with pytest.raises(ImportError, match="tqdm"):
        export_gradients(model, checkpoints, train, LOSS, store=tmp_path / "s", progress=True)
    monkeypatch.undo()
    store = export_gradients(model, checkpoints, train, LOSS, store=tmp_path / "s", progress=False)
    assert store.complete and store.n_rows == 40


def _arrays(g):
    return list(g.matrices) if isinstance(g, tracin.Gradients) else [*g.left, *g.right]


EVERY_MODE = [
    {},
    {"mode": "last_layer"},
    {"mode": "factored"},
    {"projection": tracin.Projection(16, per_layer=True, kronecker=True)},
]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("kwargs", EVERY_MODE, ids=["full", "last_layer", "factored", "kronecker"])
def test_every_mode_gives_the_same_rows_under_no_grad_or_inference_mode(context, kwargs):
    """Was (review56 F2): under torch.no_grad() only mode="full" worked (the others: torch's raw "element 0
    of tensors does not require grad"), under torch.inference_mode() every mode blamed the loss_fn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ck = [(copy.deepcopy(model.state_dict()), 1.0), (copy.deepcopy(model.state_dict()), 0.5)]
    with torch.no_grad():
        ck[1][0]["0.weight"].add_(0.1)
    want = _arrays(export_gradients(model, ck, (x, y), LOSS, progress=False, **kwargs))
    with context():
        got = _arrays(export_gradients(model, ck, (x, y), LOSS, progress=False, **kwargs))
        assert not torch.is_grad_enabled()  # the caller's context is left as it was
        assert torch.is_inference_mode_enabled() == (context is torch.inference_mode)
    assert len(got) == len(want) >= 2
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _compiled(model):
    return torch.compile(model, backend="eager")


@pytest.mark.parametrize(
    "wrap",
    [nn.DataParallel, _compiled, lambda m: _compiled(nn.DataParallel(m))],
    ids=["DataParallel", "compile", "compile_of_DataParallel"],
)
@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_a_data_parallel_or_compiled_model_exports_the_rows_of_the_model_inside(wrap, mode):
    """Was (review56 F8): nn.DataParallel died with torch's raw "The stateless API can't be used with
    nn.DataParallel module" or missing 'module.*' keys; a compiled model refused a state_dict saved before
    compiling (missing '_orig_mod.*' keys), and with its own one recorded '_orig_mod.'-prefixed names."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    plain = copy.deepcopy(model.state_dict())
    other = {k: v + 0.05 for k, v in plain.items()}
    want = export_gradients(model, [(plain, 1.0), (other, 0.5)], (x, y), LOSS, mode=mode, progress=False)
    wrapped = wrap(model)
    prefixed = copy.deepcopy(wrapped.state_dict())
    assert all(k.startswith(("module.", "_orig_mod.")) for k in prefixed)
    for first in (plain, prefixed):
        got = export_gradients(wrapped, [(first, 1.0), (other, 0.5)], (x, y), LOSS, mode=mode, progress=False)
        assert got.metadata["params"] == want.metadata["params"]
        for a, b in zip(_arrays(got), _arrays(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    for k, v in wrapped.state_dict().items():  # the model left as it was
        assert torch.equal(v, prefixed[k])
    wrapper_prefix = next(iter(prefixed))[: -len("0.weight")]
    want = export_gradients(model, [(plain, 1.0)], (x, y), LOSS, mode=mode, layers=["2"], progress=False)
    for layer in ("2", wrapper_prefix + "2"):  # layers= names as the plain model's, or with the wrappers' prefix
        got = export_gradients(wrapped, [(plain, 1.0)], (x, y), LOSS, mode=mode, layers=[layer], progress=False)
        assert got.metadata["params"] == want.metadata["params"]
        for a, b in zip(_arrays(got), _arrays(want), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", EVERY_MODE, ids=["full", "last_layer", "factored", "kronecker"])
def test_data_and_checkpoints_made_under_inference_mode_give_the_rows_of_ordinary_tensors(kwargs):
    """Was (review56 F6): torch's raw "Inference tensors cannot be saved for backward" (data) and "Setting
    requires_grad=True on inference tensor outside InferenceMode" (a state_dict snapshot)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    state = copy.deepcopy(model.state_dict())
    want = _arrays(export_gradients(model, [(state, 1.0)], (x, y), LOSS, progress=False, batch_size=4, **kwargs))
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
        state_inf = {k: v.clone() for k, v in state.items()}
    for data, ck in [((x_inf, y_inf), state), ((x, y), state_inf), ((x_inf, y_inf), state_inf)]:
        got = _arrays(export_gradients(model, [(ck, 1.0)], data, LOSS, progress=False, batch_size=4, **kwargs))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert x_inf.is_inference() and all(v.is_inference() for v in state_inf.values())  # the caller's as they were


def test_an_export_under_autocast_warns_and_a_failed_first_rows_check_names_it():
    """Was (review56 F5): full mode returned bfloat16-precision rows without a word, and last_layer refused
    blaming a weight used outside its forward, a hook or batch mixing, none of which applied. last_layer now
    exports (review201 F4: its first rows judged at bfloat16's tolerance); a real disagreement (a hook doubling the
    head's output) is refused naming autocast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ck = [(copy.deepcopy(model.state_dict()), 1.0)]
    plain = export_gradients(model, ck, (x, y), LOSS, progress=False).matrices[0]
    warned = r"called under torch.autocast \(cpu bfloat16\).*outside autocast for float32 gradients"
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match=warned) as caught:
        rounded = export_gradients(model, ck, (x, y), LOSS, progress=False).matrices[0]
    assert caught[0].filename == __file__
    assert 1e-4 < np.abs(rounded - plain).max() / np.abs(plain).max() < 5e-2  # what the warning is about
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match=warned):
        head = export_gradients(model, ck, (x, y), LOSS, mode="last_layer", progress=False)
    left, right = head.left[0].astype(np.float64), head.right[0].astype(np.float64)
    outer = np.einsum("np,nq->npq", left, right)
    rows = np.concatenate([outer[:, :, :-1].reshape(6, -1), outer[:, :, -1]], axis=1)  # 2.weight, then 2.bias
    assert np.abs(rows - plain[:, -18:]).max() / np.abs(plain[:, -18:]).max() < 5e-2
    hooked = copy.deepcopy(model)
    hooked[2].register_forward_hook(lambda module, args, out: 2.0 * out)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match=warned):
        with pytest.raises(ValueError, match=r"disagree.*under torch.autocast, cpu bfloat16: its low-precision"):
            export_gradients(hooked, ck, (x, y), LOSS, mode="last_layer", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_gradients(model, ck, (x, y), LOSS, progress=False)  # no autocast, no warning


# review69 F2: float64 NumPy data (NumPy's and scikit-learn's default) for a float32 model
@pytest.mark.parametrize("mode", ["full", "last_layer", "factored"])
def test_float64_numpy_inputs_for_a_float32_model_are_explained_not_cast(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = np.random.default_rng(0).standard_normal((12, 8))  # float64
    y = np.random.default_rng(1).integers(0, 3, 12)
    with pytest.raises(TypeError, match=r"^data: batch 0 .*\(float32\): inputs float64") as caught:
        export_gradients(model, [(model.state_dict(), 0.1)], (x, y), LOSS, mode=mode, progress=False)
    message = str(caught.value)
    assert "x.astype(np.float32)" in message and "torch.from_numpy(x).float()" in message
    assert "mat1 and mat2 must have the same dtype" in message  # torch's own words kept
    assert isinstance(caught.value.__cause__, RuntimeError)
    # following the advice gives the rows of float32 data
    float32 = export_gradients(
        model, [(model.state_dict(), 0.1)], (x.astype(np.float32), y), LOSS, mode=mode, progress=False
    )
    assert np.isfinite(_arrays(float32)[0]).all()


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x, scale):
        return self.linear(x * scale)


def test_float64_leaves_of_dict_inputs_are_named():
    model = _Scaled()
    inputs = {"x": torch.randn(6, 4), "scale": np.ones((6, 1))}
    with pytest.raises(TypeError, match=r"\): inputs\['scale'\] float64, and .*\(NumPy arrays"):
        export_gradients(
            model, [(model.state_dict(), 0.1)], (inputs, torch.zeros(6, dtype=torch.long)), LOSS, progress=False
        )


class _CastsItsInputs(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.linear, self.fail = nn.Linear(4, 3), fail

    def forward(self, x):
        if self.fail:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)")
        return self.linear(x.float())


def test_float64_data_a_model_takes_runs_and_other_errors_pass_unchanged():
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _CastsItsInputs()
    got = export_gradients(model, [(model.state_dict(), 0.1)], (x, y), LOSS, progress=False).matrices[0]
    want = export_gradients(model, [(model.state_dict(), 0.1)], (x.float(), y), LOSS, progress=False).matrices[0]
    np.testing.assert_array_equal(got, want)  # the data went in as it was: the model's own cast, no other
    failing = _CastsItsInputs(fail=True)
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied \(2x5 and 4x3\)") as caught:
        export_gradients(failing, [(failing.state_dict(), 0.1)], (x, y), LOSS, progress=False)
    assert str(caught.value).endswith(
        "(tracin's check ran the model and loss_fn on rows 0..1 of the first batch "
        "of 6; the batch's inputs (6, 4), targets (6,))"
    )  # no dtype advice


# review71 F1: only torch's words about a pair of floating dtypes are explained as the data's dtype
class _Embeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.embedding(ids).mean(1))


class _CastsThenFails(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        x = x.float()
        if x.shape[0] > 0:
            raise RuntimeError("unsupported pooling type 'max3'")
        return self.linear(x)


def test_errors_not_about_a_floating_dtype_pair_pass_unchanged_with_float64_data():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ids = np.random.default_rng(0).integers(0, 10, (6, 5)).astype(np.float64)  # float ids: torch wants Long or Int
    model = _Embeds()
    with pytest.raises(RuntimeError, match=r"^Expected tensor for argument #1 'indices' .*Long, Int") as caught:
        export_gradients(model, [(model.state_dict(), 0.1)], (ids, y), LOSS, progress=False)
    assert type(caught.value) is RuntimeError  # torch's own error, no advice to give the ids in float32
    casting = _CastsThenFails()
    with pytest.raises(RuntimeError, match=r"^unsupported pooling type 'max3' \(tracin's check ran .*\)$") as caught:
        export_gradients(casting, [(casting.state_dict(), 0.1)], (torch.randn(6, 4).double(), y), LOSS, progress=False)
    assert type(caught.value) is RuntimeError


@pytest.mark.parametrize(
    "first, shape, words",
    [
        (nn.Conv2d(1, 2, 3), (1, 4, 4), r"Input type \(double\) and bias type \(float\) should be the same"),
        (nn.LayerNorm(8), (8,), r"mixed dtype"),
        (nn.Linear(8, 8, bias=False), (8,), r"same dtype"),
    ],
)
def test_float64_data_for_float32_conv_layernorm_and_bias_free_linear_is_explained(first, shape, words):
    torch.manual_seed(0)
    model = nn.Sequential(first, nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, *shape))  # materializes the lazy layer
    x = np.random.default_rng(0).standard_normal((6, *shape))  # float64
    y = np.arange(6) % 3
    with pytest.raises(TypeError, match=r"^data: batch 0 .*\(float32\): inputs float64, .*" + words) as caught:
        export_gradients(model, [(model.state_dict(), 0.1)], (x, y), LOSS, progress=False)
    assert "x.astype(np.float32)" in str(caught.value)


# review69 F3: the loss class given for an instance of it
class _MyLoss(nn.Module):
    def forward(self, outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (
            nn.CrossEntropyLoss,
            r"loss_fn is the class nn\.CrossEntropyLoss, not a loss.*nn\.CrossEntropyLoss\(reduction='none'\)$",
        ),
        (nn.MSELoss, r"class nn\.MSELoss.*nn\.MSELoss\(reduction='none'\)$"),
        (_MyLoss, r"class _MyLoss, not a loss.*Pass an instance: _MyLoss\(\.\.\.\)"),
        (dict, r"class dict, not a loss.*an instance of dict, or a function$"),
    ],
)
def test_a_loss_class_is_refused_up_front(trained, loss_fn, message):
    model, checkpoints, train, _ = trained
    with pytest.raises(TypeError, match=message) as caught:
        export_gradients(model, checkpoints, train, loss_fn, progress=False)
    assert caught.value.__cause__ is None  # refused before any forward pass


# review71 F2: a class is refused only when its call builds an object; one whose __new__ returns losses is a function
class _NewLoss:
    def __new__(cls, outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")


class _Callable:
    def __call__(self, outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")


def test_a_class_whose_new_returns_losses_works_and_a_plain_class_is_refused(trained):
    model, checkpoints, train, _ = trained
    got = export_gradients(model, checkpoints, train, _NewLoss, progress=False)
    want = export_gradients(model, checkpoints, train, LOSS, progress=False)
    for a, b in zip(got.matrices, want.matrices, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"class .*_Callable, not a loss.*an instance of .*_Callable, or a function$"):
        export_gradients(model, checkpoints, train, _Callable, progress=False)


# review69 F7: an elementwise loss with reduction='none' keeps the outputs' shape
def test_an_unsqueezed_regression_loss_is_refused_with_the_fix_and_the_fix_gives_the_float64_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))
    x, y = torch.randn(10, 8), torch.randn(10, 1)
    mse = nn.MSELoss(reduction="none")
    for loss in (mse, nn.BCEWithLogitsLoss(reduction="none")):
        target = y if loss is mse else (y > 0).float()
        with pytest.raises(ValueError, match=r"got shape \(10, 1\)\..*loss\(outputs, targets\)\.squeeze\(-1\)"):
            export_gradients(model, [(model.state_dict(), 0.1)], (x, target), loss, progress=False)
    got = export_gradients(
        model, [(model.state_dict(), 0.1)], (x, y), lambda o, t: mse(o, t).squeeze(-1), progress=False
    ).matrices[0]
    w, b = (p.detach().double().numpy() for p in model.parameters())
    xd, yd = x.double().numpy(), y.double().numpy()
    residual = 2 * (xd @ w.T + b - yd)  # d (o - y)^2 / d o
    np.testing.assert_allclose(got, np.hstack([residual * xd, residual]), rtol=1e-5, atol=1e-6)


def test_per_element_losses_are_refused_with_a_per_example_reduction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3))
    x, y = torch.randn(10, 8), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"got shape \(10, 3\)\..*\.flatten\(1\)\.sum\(1\)"):
        export_gradients(model, [(model.state_dict(), 0.1)], (x, y), nn.MSELoss(reduction="none"), progress=False)


def test_a_model_on_the_meta_device_is_refused_naming_model_and_to_empty():
    """review147 F3: a model built on device='meta' failed deep inside ('Tensor.item() cannot be called on meta
    tensors'); now refused up front, naming `model` and model.to_empty(device=...)."""
    state = mlp().state_dict()
    with torch.device("meta"):
        model = mlp()
    x, y = classification_data(4, seed=0)
    with pytest.raises(ValueError, match=r"model: .*meta device .*to_empty\(device=\.\.\.\)"):
        export_gradients(model, [(state, 1.0)], (x, y), LOSS, progress=False)


def test_a_model_moved_off_meta_with_to_empty_exports_the_checkpoints_rows():
    state = mlp().state_dict()
    with torch.device("meta"):
        model = mlp()
    model.to_empty(device="cpu")
    x, y = classification_data(4, seed=0)
    got = export_gradients(model, [(state, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    want = export_gradients(mlp(), [(state, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_integer_inputs_for_a_float_model_are_named_as_the_datas_inputs(mode):
    """review147 F5: torch's 'mat1 and mat2 must have the same dtype, but got Long and Float' named no argument."""
    model = mlp()
    x, y = classification_data(4, seed=0)
    with pytest.raises(TypeError, match=r"data: batch 0 has integer inputs \(inputs int64\).*x\.float\(\)"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x.long(), y), LOSS, mode=mode, progress=False)


def test_floating_targets_for_cross_entropy_are_named_as_the_datas_targets():
    model = mlp()
    x, y = classification_data(4, seed=0)
    with pytest.raises(TypeError, match=r"data: batch 0 has floating targets \(targets float32\).*y\.long\(\)"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y.float()), LOSS, progress=False)


def test_a_store_path_that_is_a_file_is_refused_naming_store(tmp_path):
    model = mlp()
    path = tmp_path / "taken"
    path.write_text("not a store")
    with pytest.raises(ValueError, match=r"^store: .*taken exists and is not a directory"):
        export_gradients(model, [(model.state_dict(), 1.0)], classification_data(4, seed=0), LOSS, store=path)
    assert path.read_text() == "not a store"


@pytest.mark.parametrize("mode", ["full", "last_layer", "factored"])
def test_a_float64_model_exports_its_gradients_rounded_to_float32(mode):
    """A float64 model (scientific code) runs in float64; its rows are stored as float32 (the sinks take
    float32 / float16 / bfloat16 only), each the float64 per-example gradient rounded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    g = export_gradients(model, [(model.state_dict(), 0.5)], (x, y), LOSS, mode=mode, progress=False)
    chosen = list(model.named_parameters()) if mode != "last_layer" else list(model[2].named_parameters(prefix="2"))
    want = []
    for i in range(6):
        model.zero_grad()
        LOSS(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        want.append(torch.cat([p.grad.reshape(-1) for _, p in chosen]).numpy())
    want = np.stack(want)
    if mode == "full":
        got = g.matrices[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    else:  # each layer's (left, right) factors: weight gradient left_i right_i[:-1]^T, bias left_i
        got = []
        for left, right in zip(g.left, g.right, strict=True):
            assert left.dtype == right.dtype == np.float32
            l64, r64 = left.astype(np.float64), right.astype(np.float64)
            got += [np.einsum("np,nq->npq", l64, r64[:, :-1]).reshape(6, -1), l64]
        np.testing.assert_allclose(np.hstack(got), want, rtol=1e-5, atol=1e-10)


class _SharedTwice(nn.Module):
    """One nn.Linear reached under two names (self.b = self.a), applied twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_a_module_under_two_names_gets_its_own_parameters_back(mode):
    """functional_call puts back, for a module reached under two names, what it found under the second: the
    checkpoint's tensor, which the model then held in place of its parameters (r329 mutant: no shared module
    restored left a.weight holding the checkpoint's values after the export)."""
    model = _SharedTwice()
    own = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    later = copy.deepcopy(model)
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.25)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    export_gradients(model, [(later.state_dict(), 1.0)], (x, y), LOSS, mode=mode, progress=False)
    assert model.b is model.a
    for n, p in model.named_parameters():
        assert p is own[n][0], n
        assert torch.equal(p, own[n][1]), n


def test_a_model_with_a_buffer_on_the_meta_device_is_refused_naming_it():
    """A buffer left on meta (a non-persistent one no checkpoint holds, after device='meta' construction and a
    load) has no data either: refused up front naming it (r329 mutant: parameters only were looked at)."""
    model = mlp()
    model.register_buffer("scale", torch.ones(3, device="meta"), persistent=False)
    x, y = classification_data(4, seed=0)
    with pytest.raises(ValueError, match=r"model: .*meta device \(scale\).*to_empty"):
        export_gradients(model, [(mlp().state_dict(), 1.0)], (x, y), LOSS, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_models_gradients_are_projected_as_its_full_float32_rows(dtype):
    """A bfloat16 / float16 model's gradients go to the projection as float32 (r329 mutant: handed on in their own
    dtype, a bfloat16 block failed in .numpy() with torch's 'unsupported ScalarType BFloat16')."""
    model = mlp().to(dtype)
    x, y = classification_data(6, seed=0)
    data, checkpoints = (x.to(dtype), y), [(model.state_dict(), 1.0)]
    projection = tracin.Projection(16, seed=0)
    full = export_gradients(model, checkpoints, data, LOSS, progress=False)
    projected = export_gradients(model, checkpoints, data, LOSS, projection=projection, progress=False)
    np.testing.assert_allclose(projected.matrices[0], projection.apply(full.matrices[0]), rtol=1e-5, atol=1e-6)


class _Table(nn.Module):
    """A layer reading a large buffer (a table), as the checkpoints hold it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("table", torch.ones(1000, 4))

    def forward(self, x):
        return self.fc(x * self.table[0])


def test_a_checkpoints_buffer_copies_are_freed_before_the_next_checkpoint_runs():
    """Each checkpoint's working copies of its buffers are released when the next one is loaded: one checkpoint's
    at a time (r329 mutant: without FreshBuffers.keep every checkpoint's stayed alive to the end of the export)."""
    model = _Table()
    earlier: list[weakref.ref] = []
    seen: list[tuple[float, int]] = []  # (the table's value, earlier forwards' copies alive)

    def note(module, args):
        gc.collect()
        seen.append((float(module.table[0, 0]), sum(r() is not None for r in earlier)))
        earlier.append(weakref.ref(module.table))

    model.register_forward_pre_hook(note)
    states = [{k: v + c for k, v in model.state_dict().items()} for c in range(2)]
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    export_gradients(model, [(s, 1.0) for s in states], (x, y), LOSS, progress=False)
    first_of_second = next(alive for value, alive in seen if value == 2.0)
    assert first_of_second == 0
