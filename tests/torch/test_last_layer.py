"""mode="last_layer" and mode="factored": factored gradients of nn.Linear layers, against Captum."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import LateReuse, tiny_bert
from torch import nn
from torch_oracle import (
    MeanMix,
    SharedQuery,
    assert_scores_match,
    captum_scores,
    captum_tracin,
    classification_data,
    mlp,
    train_checkpoints,
)

import tracin
from tracin._export.metadata import LEFT, RIGHT
from tracin.torch import export_gradients, last_layer
from tracin.torch.last_layer import LinearFactors

LOSS = nn.CrossEntropyLoss(reduction="none")


def _export_both(model, checkpoints, train, test, **kwargs):
    return (
        export_gradients(model, checkpoints, train, LOSS, mode="last_layer", batch_size=16, progress=False, **kwargs),
        export_gradients(model, checkpoints, test, LOSS, mode="last_layer", progress=False, **kwargs),
    )


def test_weight_only_layer_matches_captum_tracincp_fast(tmp_path):
    model = mlp(bias_last=False)
    train, test = classification_data(40, seed=1), classification_data(6, seed=2)
    checkpoints = train_checkpoints(model, *train, tmp_path)
    g_train, g_test = _export_both(model, checkpoints, train, test)
    assert g_train.dims == ((4, 8),) * 3 and g_train.metadata["last_layer"] == {
        "layer": "4",
        "weight": "4.weight",
        "bias": None,
        "left": LEFT,
        "right": RIGHT,
    }
    oracle = captum_tracin(model, checkpoints, train, fast_layer="4")
    assert_scores_match(tracin.scores(g_test, g_train), captum_scores(oracle, test))
    both = tracin.top_k(g_test, g_train, k=4, side="both")
    for ours, proponents in ((both.proponents, True), (both.opponents, False)):
        theirs_idx, theirs_val = oracle.influence(test, k=4, proponents=proponents)
        np.testing.assert_array_equal(ours.indices, theirs_idx.numpy())
    np.testing.assert_allclose(tracin.self_influence(g_train), oracle.self_influence().numpy(), rtol=1e-4)


def test_weight_and_bias_match_captum_tracincp_on_that_layer(tmp_path):
    model = mlp()
    train, test = classification_data(40, seed=1), classification_data(6, seed=2)
    checkpoints = train_checkpoints(model, *train, tmp_path)
    g_train, g_test = _export_both(model, checkpoints, train, test)
    assert g_train.dims == ((4, 9),) * 3
    assert g_train.metadata["params"] == [{"name": "4.weight", "shape": [4, 8]}, {"name": "4.bias", "shape": [4]}]
    oracle = captum_tracin(model, checkpoints, train, layers=["4"])
    assert_scores_match(tracin.scores(g_test, g_train), captum_scores(oracle, test))
    np.testing.assert_allclose(tracin.self_influence(g_train), oracle.self_influence().numpy(), rtol=1e-4)


def test_a_named_inner_linear_layer_equals_its_full_gradients(tmp_path):
    model = mlp()
    train = classification_data(20, seed=1)
    checkpoints = train_checkpoints(model, *train, tmp_path)
    factored = export_gradients(model, checkpoints, train, LOSS, mode="last_layer", layers=["2"], progress=False)
    full = export_gradients(model, checkpoints, train, LOSS, layers=["2"], progress=False)
    for left, right, g in zip(factored.left, factored.right, full.matrices, strict=True):
        outer = np.einsum("np,nq->npq", left, right)  # (n, out, in + 1): weight columns, then bias
        as_full = np.concatenate([outer[:, :, :-1].reshape(20, -1), outer[:, :, -1]], axis=1)
        np.testing.assert_allclose(as_full, g, rtol=1e-5, atol=1e-7)


class PerToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)
        self.twice = nn.Linear(3, 3)

    def forward(self, ids):
        return self.twice(self.twice(self.proj(self.embed(ids)).mean(1)))


def test_layers_without_a_rank_one_gradient_are_refused():
    model = PerToken()
    data = (torch.randint(0, 10, (5, 4)), torch.randint(0, 3, (5,)))
    ckpt = [(model.state_dict(), 1.0)]
    with pytest.raises(ValueError, match=r"input of shape \(5, 4, 4\).*mode='full' with layers=\['proj'\]"):
        export_gradients(model, ckpt, data, LOSS, mode="last_layer", layers=["proj"], progress=False)
    with pytest.raises(ValueError, match="'twice' ran 2 times"):
        export_gradients(model, ckpt, data, LOSS, mode="last_layer", progress=False)
    with pytest.raises(ValueError, match="takes one nn.Linear"):
        export_gradients(model, ckpt, data, LOSS, mode="last_layer", layers=["proj", "twice"], progress=False)
    with pytest.raises(ValueError, match="'embed' is Embedding"):
        export_gradients(model, ckpt, data, LOSS, mode="last_layer", layers="embed", progress=False)


def test_reduced_losses_are_refused_in_last_layer_mode():
    model = mlp()
    data = classification_data(8, seed=1)
    with pytest.raises(ValueError, match="mean- or sum-reduced"):
        export_gradients(
            model,
            [(model.state_dict(), 1.0)],
            data,
            lambda o, y: nn.functional.cross_entropy(o, y),
            mode="last_layer",
            progress=False,
        )


def test_factored_mode_matches_captum_on_every_linear_layer(tmp_path):
    """mode="factored": a (left, right) pair per Linear layer per checkpoint; exact TracIn over all
    of the MLP's parameters, like Captum's TracInCP on the full gradients."""
    model = mlp()
    train, test = classification_data(40, seed=1), classification_data(6, seed=2)
    checkpoints = train_checkpoints(model, *train, tmp_path)
    g_train = export_gradients(model, checkpoints, train, LOSS, mode="factored", batch_size=16, progress=False)
    g_test = export_gradients(model, checkpoints, test, LOSS, mode="factored", progress=False)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert g_train.n_checkpoints == 3 * len(linear)
    assert g_train.weights.tolist() == [lr for _, lr in checkpoints for _ in linear]
    assert g_train.metadata["mode"] == "factored"
    assert [p["name"] for p in g_train.metadata["params"]] == [n for n, _ in model.named_parameters()]
    oracle = captum_tracin(model, checkpoints, train)
    assert_scores_match(tracin.scores(g_test, g_train), captum_scores(oracle, test))
    theirs_idx, _ = oracle.influence(test, k=5, proponents=True)
    np.testing.assert_array_equal(tracin.top_k(g_test, g_train, k=5).indices, theirs_idx.numpy())
    np.testing.assert_allclose(tracin.self_influence(g_train), oracle.self_influence().numpy(), rtol=1e-4)
    full = export_gradients(model, checkpoints, test, LOSS, progress=False)
    with pytest.raises(ValueError, match="test is full .* but train is factored .*: both sides must be factored or"):
        tracin.scores(full, g_train)


def test_factored_mode_store_equals_memory_and_refuses_non_linear_parameters(tmp_path):
    model = mlp()
    train = classification_data(30, seed=3)
    checkpoints = train_checkpoints(model, *train, tmp_path)
    memory = export_gradients(model, checkpoints, train, LOSS, mode="factored", batch_size=7, progress=False)
    store = export_gradients(
        model, checkpoints, train, LOSS, mode="factored", store=tmp_path / "s", batch_size=7, progress=False
    )
    np.testing.assert_array_equal(tracin.self_influence(store), tracin.self_influence(memory))
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(5, 1, 10), torch.randint(0, 4, (5,))
    with pytest.raises(ValueError, match="needs every chosen parameter to be an nn.Linear"):
        export_gradients(conv, [(conv.state_dict(), 1.0)], (x, y), LOSS, mode="factored", progress=False)
    with pytest.raises(ValueError, match="factors whole nn.Linear layers"):
        export_gradients(
            conv, [(conv.state_dict(), 1.0)], (x, y), LOSS, mode="factored", layers=["2.weight"], progress=False
        )
    only_linear = export_gradients(
        conv, [(conv.state_dict(), 1.0)], (x, y), LOSS, mode="factored", layers=["2"], progress=False
    )
    assert only_linear.dims == ((4, 17),)


def float64_rows(model, state, x, y, loss, names, call=None):
    """Independent oracle: (n, d) float64 per-example gradients of `names` (flattened, concatenated),
    by torch.autograd.grad on a float64 copy of the model, one example at a time."""
    twin = copy.deepcopy(model).double().eval()
    twin.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    params = dict(twin.named_parameters(remove_duplicate=False))
    rows = []
    for i in range(len(y)):
        xi = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        out = call(twin, xi) if call else twin(xi)
        parts = torch.autograd.grad(loss(out, y[i : i + 1]).sum(), [params[n] for n in names], allow_unused=True)
        zeros_if_unused = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, parts, strict=True)]
        rows.append(torch.cat([g.reshape(-1) for g in zeros_if_unused]))
    return torch.stack(rows).numpy()


def as_full(left, right, bias=True):
    """The full rows (weight, then bias) of one factor pair: row i is left_i (x) right_i."""
    outer = np.einsum("np,nq->npq", left, right)
    if not bias:
        return outer.reshape(len(left), -1)
    return np.concatenate([outer[:, :, :-1].reshape(len(left), -1), outer[:, :, -1]], axis=1)


def test_last_layer_with_a_one_shot_generator_keeps_every_row():
    """The layer is found from the first batch, which is then exported too (was: first batch lost)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4))
    g = export_gradients(model, [(state, 1.0)], batches, LOSS, mode="last_layer", progress=False)
    assert g.n_rows == 10
    want = float64_rows(model, state, x, y, LOSS, ["2.weight", "2.bias"])
    np.testing.assert_allclose(as_full(g.left[0], g.right[0]), want, rtol=1e-5, atol=1e-6)


class _StoredGenerator(torch.utils.data.IterableDataset):
    """Re-iterable in form, one-shot underneath: __iter__ hands out the same stored generator."""

    def __init__(self, x, y):
        self.batches = ((x[i : i + 4], y[i : i + 4]) for i in range(0, len(y), 4))

    def __iter__(self):
        return self.batches


def test_last_layer_over_a_loader_of_one_stored_generator_keeps_every_row():
    """Finding the layer read the first batch through one iterator and the export through another: the
    first 4 of 10 rows were lost silently (rows 4..9 exported as rows 0..5). Now nothing is read twice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(_StoredGenerator(x, y), batch_size=None)
    g = export_gradients(model, [(state, 1.0)], loader, LOSS, mode="last_layer", progress=False)
    assert g.n_rows == 10
    want = float64_rows(model, state, x, y, LOSS, ["2.weight", "2.bias"])
    np.testing.assert_allclose(as_full(g.left[0], g.right[0]), want, rtol=1e-5, atol=1e-6)


class TiedHead(nn.Module):
    """An embedding whose weight is also the decoder's (as GPT-2's lm_head and transformer.wte)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.dec = nn.Linear(4, 10, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(torch.tanh(self.emb(ids).mean(1)))


def test_last_layer_on_a_tied_head_is_its_gradient_through_the_head():
    """Was a KeyError ('dec.weight', a name load_checkpoint leaves out). Now: the weight under its first
    name, its gradient through dec's forward only (oracle: a float64 copy with dec untied)."""
    torch.manual_seed(0)
    model = TiedHead()
    ids, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 10, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = [(state, 0.5)]
    for layers in (None, ["dec"]):
        g = export_gradients(model, ckpt, (ids, y), LOSS, mode="last_layer", layers=layers, progress=False)
        assert g.metadata["params"] == [{"name": "emb.weight", "shape": [10, 4]}]
        assert g.metadata["last_layer"]["layer"] == "dec"
        untied = copy.deepcopy(model)
        untied.dec.weight = nn.Parameter(untied.emb.weight.detach().clone())
        want = float64_rows(untied, untied.state_dict(), ids, y, LOSS, ["dec.weight"])
        np.testing.assert_allclose(as_full(g.left[0], g.right[0], bias=False), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"only tied second names \('dec.weight' is tied to 'emb.weight'"):
        export_gradients(model, ckpt, (ids, y), LOSS, layers=["dec"], progress=False)


class SharedLinear(nn.Module):
    """One nn.Linear under two names (self.b = self.a), called once, as b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = self.a
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.b(x))).tanh()


@pytest.mark.parametrize("layers", [["a"], ["b"]])
def test_last_layer_on_a_module_shared_under_two_names_takes_either_name(layers):
    """Was (review60 F2): layers=["b"] refused as "no module of the model", and layers=["a"] failed in the
    first-rows check (its derivative perturbed the weight under the name 'a' only: the forward reads it as
    'b'). Oracle: float64 autograd of the shared weight."""
    torch.manual_seed(0)
    model = SharedLinear()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = export_gradients(model, [(state, 1.0)], (x, y), LOSS, mode="last_layer", layers=layers, progress=False)
    assert g.metadata["last_layer"]["layer"] == "a"
    assert [p["name"] for p in g.metadata["params"]] == ["a.weight", "a.bias"]
    want = float64_rows(model, state, x, y, LOSS, ["a.weight", "a.bias"])
    np.testing.assert_allclose(as_full(g.left[0], g.right[0]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "last_layer", "factored"])
def test_an_export_leaves_a_module_shared_under_two_names_its_own_parameters(mode):
    """Was: torch.func.functional_call left the shared Linear holding the last checkpoint's tensors (plain
    tensors, not its parameters) after every export; mode='factored' refused its factors as disagreeing."""
    torch.manual_seed(0)
    model = SharedLinear()
    own = [(p, p.detach().clone()) for p in model.parameters()]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    state = {k: v + 0.25 for k, v in model.state_dict().items()}
    g = export_gradients(model, [(state, 1.0)], (x, y), LOSS, mode=mode, progress=False)
    assert model.a is model.b and isinstance(model.a.weight, nn.Parameter)
    assert [p for p in model.parameters()] == [p for p, _ in own]
    assert all(torch.equal(p, copy) for p, copy in own)
    names = ["a.weight", "a.bias", "fc.weight", "fc.bias"]
    want = float64_rows(model, state, x, y, LOSS, names)
    if mode == "full":
        np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-7)
    else:
        got = [as_full(left, right) for left, right in zip(g.left[0:], g.right[0:], strict=True)]
        layers = [lf.shape[1] * rt.shape[1] for lf, rt in zip(g.left, g.right, strict=True)]
        wanted = want[:, -layers[0] :] if mode == "last_layer" else want
        np.testing.assert_allclose(np.concatenate(got, axis=1), wanted, rtol=1e-5, atol=1e-7)


def test_per_token_tied_head_refusal_suggests_the_first_name():
    class PerTokenTied(TiedHead):
        def forward(self, ids):
            return self.dec(self.emb(ids)).mean(1)

    model = PerTokenTied()
    data = (torch.randint(0, 10, (4, 3)), torch.randint(0, 10, (4,)))
    with pytest.raises(ValueError, match=r"Use mode='full' with layers=\['emb.weight'\]"):
        export_gradients(model, [(model.state_dict(), 1.0)], data, LOSS, mode="last_layer", progress=False)


@pytest.mark.parametrize("mode", ["factored", "last_layer"])
def test_inplace_ops_after_the_layers_are_exact(mode):
    """ReLU(inplace=True) after a factored Linear: was a RuntimeError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    g = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), LOSS, mode=mode, progress=False)
    layers = ["0", "2"] if mode == "factored" else ["2"]
    got = np.concatenate([as_full(g.left[c], g.right[c]) for c in range(len(layers))], axis=1)
    names = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
    want = float64_rows(model, model.state_dict(), x, y, LOSS, names)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class AlsoOutside(nn.Module):
    """b's weight is also used outside b's forward: the outer product of b's call is not its gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + 0.5 * x @ self.b.weight.T


def doubled_head():
    """A forward hook changes the head's output: dL/d(output) is not dL/d(W x + b)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].register_forward_hook(lambda module, args, out: 2.0 * out)
    return model


@pytest.mark.parametrize("mode", ["factored", "last_layer"])
@pytest.mark.parametrize(("make", "layer"), [(AlsoOutside, "b"), (doubled_head, "2")])
def test_factors_that_are_not_the_gradient_are_refused(mode, make, layer):
    """Was silently wrong (relative errors 0.74 and 0.5 against float64 autograd): now the first rows are
    checked against per-example autograd."""
    model = make()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=rf"mode='{mode}': the factors of \['{layer}'\] disagree.*Use mode='full'"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), LOSS, mode=mode, progress=False)


_PEAK_SCRIPT = """
import resource, sys, torch
from tracin.torch import export_gradients
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 8000))
x, y = torch.randn(32, 16), torch.randint(0, 8000, (32,))
loss = torch.nn.CrossEntropyLoss(reduction="none")
state = {k: v.clone() for k, v in model.state_dict().items()}
loss(model(x), y).sum().backward()
model.zero_grad(set_to_none=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
export_gradients(model, [(state, 1.0)], (x, y), loss, mode=sys.argv[1], layers=["2"], progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (8000 * 1025 * 4))
"""


@pytest.mark.parametrize("mode", ["last_layer", "factored"])
def test_the_first_rows_check_holds_a_few_copies_of_the_weight(mode):
    """The check along random directions: peak memory a few copies of the head's weight (was about 11
    dense copies: one per-example gradient per checked row, their stack, the outer products, 2.1 GB for
    a Linear(1024, 32000) head). Peak RSS growth of the export, after one forward and backward pass."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, mode], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 6.0, out.stdout  # 2.3 (last_layer) and 3.3 (factored); 13.2 and 13.7 before


def test_bfloat16_factors_pass_the_check_and_match_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    model = model.to(torch.bfloat16)
    x, y = torch.randn(32, 16).bfloat16(), torch.randint(0, 10, (32,))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(o, t):
        return nn.functional.cross_entropy(o.float(), t, reduction="none")

    for mode, layers in (("last_layer", ["4"]), ("factored", ["0", "2", "4"])):
        g = export_gradients(model, [(state, 1.0)], (x, y), loss, mode=mode, layers=layers, progress=False)
        got = np.concatenate([as_full(g.left[c], g.right[c]) for c in range(len(layers))], axis=1)
        names = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
        want = float64_rows(model.float(), state, x.float(), y, loss, names)
        model.to(torch.bfloat16)
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 0.05


def deep_half_mlp(dtype):
    """Depth 8, width 128: its float16 per-row weight gradients are subnormal or zero."""
    torch.manual_seed(8)
    mods = []
    for k in range(8):
        mods += [nn.Linear(64 if k == 0 else 128, 128), nn.GELU()]
    return nn.Sequential(*mods, nn.Linear(128, 1000)).to(dtype)


@pytest.mark.parametrize(("mode", "layers"), [("factored", None), ("last_layer", ["0"])])
def test_float16_factors_of_a_deep_mlp_pass_the_check_and_match_float64(mode, layers):
    """Were refused ('a weight also used outside its layer's forward'): the check's own float16 autograd
    reference was off (subnormal per-row gradients); half-precision layers are now checked in float32."""
    model = deep_half_mlp(torch.float16)
    x, y = torch.randn(8, 64, dtype=torch.float16), torch.randint(0, 1000, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(o, t):
        return nn.functional.cross_entropy(o.float(), t, reduction="none")

    g = export_gradients(model, [(state, 1.0)], (x, y), loss, mode=mode, layers=layers, progress=False)
    chosen = layers or [str(2 * k) for k in range(9)]
    for c, layer in enumerate(chosen):
        got = as_full(g.left[c].astype(np.float64), g.right[c].astype(np.float64))
        want = float64_rows(model.float(), state, x.float(), y, loss, [f"{layer}.weight", f"{layer}.bias"])
        model.half()
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        # float16 rounding through the backward pass: 6e-3 on layer 0 (8 layers deep), 1.5e-4 on the head
        assert err.max() < 8 * torch.finfo(torch.float16).eps, (layer, err.max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["factored", "last_layer"])
def test_a_half_precision_weight_used_outside_its_forward_is_still_refused(mode, dtype):
    torch.manual_seed(0)
    model = AlsoOutside().to(dtype)
    x, y = torch.randn(5, 6, dtype=dtype), torch.randint(0, 3, (5,))

    def loss(o, t):
        return nn.functional.cross_entropy(o.float(), t, reduction="none")

    with pytest.raises(ValueError, match=rf"mode='{mode}': the factors of \['b'\] disagree.*Use mode='full'"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), loss, mode=mode, progress=False)


def _per_example_mse(o, t):
    return (o - t).pow(2).mean(1)


def well_fit_regression(mix: float | None = None, seed: int = 0):
    """review183 F3: an MLP 8-32-16 (MeanMix(mix) before its head: examples mixed) at a well-fit checkpoint, targets
    its own outputs plus 1e-4 noise (residuals 1e-4 of outputs ~1): (model, state, x, y)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), *([MeanMix(mix)] if mix else []), nn.Linear(32, 16))
    x = torch.randn(64, 8)
    with torch.no_grad():
        y = model(x) + 1e-4 * torch.randn(64, 16)
    return model, {k: v.clone() for k, v in model.state_dict().items()}, x, y


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("mode", "layers"), [("factored", ["0", "2"]), ("last_layer", ["2"])])
def test_a_well_fit_float32_regression_passes_the_check_and_matches_float64(mode, layers, seed):
    """Was refused ('the factors of ['0', '2'] disagree ... a layer or loss_fn mixing the examples'): the residual,
    the left factor, differs batched vs alone by float32 rounding of the outputs, ~1e-3 of itself. A float32 layer
    that disagrees is now checked again in float64, where it agrees; the rows are float64 autograd's to float32
    rounding of that residual."""
    model, state, x, y = well_fit_regression(seed=seed)
    g = export_gradients(model, [(state, 1.0)], (x, y), _per_example_mse, mode=mode, layers=layers, progress=False)
    for c, layer in enumerate(layers):
        got = as_full(g.left[c].astype(np.float64), g.right[c].astype(np.float64))
        want = float64_rows(model, state, x, y, _per_example_mse, [f"{layer}.weight", f"{layer}.bias"])
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 5e-3, (layer, err.max())  # float32 rounding of residuals 1e-4 of the outputs


@pytest.mark.parametrize(("mode", "bad"), [("factored", r"\['0', '3'\]"), ("last_layer", r"\['3'\]")])
def test_a_well_fit_regression_mixing_its_examples_is_still_refused_after_the_float64_look(mode, bad):
    """The float64 look sees a batch mean (1% of it added before the head) as float32 did."""
    model, state, x, y = well_fit_regression(mix=0.01)
    with pytest.raises(ValueError, match=rf"mode='{mode}': the factors of {bad} disagree.*Use mode='full'"):
        export_gradients(model, [(state, 1.0)], (x, y), _per_example_mse, mode=mode, progress=False)


def test_the_float64_look_is_made_only_for_a_disagreement(monkeypatch):
    """Its cost (a float64 copy of the state and a pass) only where float32 disagrees: not for a classifier."""
    looks = []
    widened = LinearFactors._verdict_widened
    monkeypatch.setattr(LinearFactors, "_verdict_widened", lambda *a: looks.append(a[-1]) or widened(*a))
    model = mlp()
    x, y = classification_data(16, seed=1)
    export_gradients(model, [(model.state_dict(), 1.0)], (x, y), LOSS, mode="factored", progress=False)
    assert looks == []
    model, state, x, y = well_fit_regression()
    export_gradients(model, [(state, 1.0)], (x, y), _per_example_mse, mode="last_layer", layers=["2"], progress=False)
    assert [f.__name__ for f in looks] == ["as_float64"]


def test_under_autocast_the_float64_look_is_not_made(monkeypatch):
    """The exported factors carry autocast's rounding: a disagreement there (a batch mean before the head) is
    refused naming autocast, without a float64 look. (A well-fit regression, whose bfloat16 gradient is autocast's
    rounding alone, was refused here too: it now exports as mode='full' does, both that rounding.)"""
    looks = []
    widened = LinearFactors._verdict_widened
    monkeypatch.setattr(LinearFactors, "_verdict_widened", lambda *a: looks.append(a[-1]) or widened(*a))
    model, state, x, y = well_fit_regression(mix=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="torch.autocast"):
        with pytest.raises(ValueError, match=r"disagree.*under torch.autocast, cpu bfloat16"):
            export_gradients(model, [(state, 1.0)], (x, y), _per_example_mse, mode="last_layer", progress=False)
    assert looks == []


class MCDropout(nn.Module):
    """Dropout kept on in eval mode (MC dropout): the forward draws random numbers."""

    def __init__(self, outside=0.0):
        super().__init__()
        self.a, self.b, self.outside = nn.Linear(6, 16), nn.Linear(16, 3), outside

    def forward(self, x):
        hidden = nn.functional.dropout(torch.tanh(self.a(x)), 0.1, training=True)
        return self.b(hidden) + self.outside * x[:, :3] @ self.b.weight[:, :3].T


@pytest.mark.parametrize("mode", ["factored", "last_layer"])
def test_a_random_forward_is_checked_row_by_row_under_one_rng_state(mode):
    """MC dropout was refused ('the factors disagree...'): each checked row's factors and derivatives now
    see the same dropout mask, so it exports; a weight also used outside its layer is still refused, the
    message naming the random forward."""
    torch.manual_seed(0)
    model = MCDropout()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    layers = ["a", "b"][mode == "last_layer" :]
    g = export_gradients(model, [(state, 1.0)], (x, y), LOSS, mode=mode, layers=layers, progress=False)
    assert g.n_rows == 8 and all(np.isfinite(left).all() and np.abs(left).max() > 0 for left in g.left)
    with pytest.raises(ValueError, match=r"\['b'\] disagree.*draws random numbers.*Use mode='full'"):
        bad = MCDropout(outside=0.5)
        export_gradients(bad, [(bad.state_dict(), 1.0)], (x, y), LOSS, mode=mode, layers=["b"], progress=False)


class _SqueezedHead(nn.Module):
    """A binary classifier ending in .squeeze(): (batch,) logits on a batch, 0-d on one row."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(5, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x))).squeeze()


@pytest.mark.parametrize("mode", ["last_layer", "factored"])
def test_a_model_squeezed_to_0d_on_one_row_is_explained(mode):
    """The factors' check runs single examples: the loss's shape error says so and names the cause
    (review31 F4 in the factored modes; it ended in the bare loss error)."""
    torch.manual_seed(0)
    model = _SqueezedHead()
    x, y = torch.randn(9, 5), torch.randint(0, 2, (9,)).float()
    loss = nn.BCEWithLogitsLoss(reduction="none")
    assert loss(model(x), y).shape == (9,)  # the user's own batches work
    with pytest.raises(ValueError, match=r"Target size") as raised:
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), loss, mode=mode, progress=False)
    said = str(raised.value)
    assert "a batch of one row" in said and "shape () on one row and (2,) on two" in said
    assert ".squeeze(-1) or .flatten()" in said


class _RowLoop(nn.Module):
    """A Linear run on one example at a time (a loop over the rows, concatenated)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(torch.cat([self.b(r[None]) for r in x])))


def test_factored_mode_on_a_layer_run_one_example_at_a_time_says_so():
    """Was (review61 looped.py): the hooks expanded each batch-1 call to the batch, and the export ended with the
    loss's raw 'Expected input batch_size (16) to match target batch_size (4)'."""
    torch.manual_seed(0)
    model = _RowLoop()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ck = [(copy.deepcopy(model.state_dict()), 1.0)]
    with pytest.raises(
        ValueError,
        match=r"mode='factored': .*'b' ran on batch-1 tensors in a batch of 4 rows.*"
        r"Use mode='full'",
    ) as caught:
        export_gradients(model, ck, (x, y), LOSS, mode="factored", layers=["b", "fc"], batch_size=4, progress=False)
    assert "Expected input batch_size" in str(caught.value)  # the pass's own error, named


def test_an_error_of_the_batch_itself_is_not_blamed_on_a_shared_call():
    """Review62 F1: with a layer shared by the batch, a bad label's IndexError was re-raised as a ValueError
    saying the layer ran in a loop over the rows (use mode='full'). The batch's own error comes through."""
    torch.manual_seed(0)
    model = SharedQuery()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ck = [(copy.deepcopy(model.state_dict()), 1.0)]
    kw = {"mode": "factored", "layers": ["q", "fc"], "batch_size": 4, "progress": False}
    assert export_gradients(model, ck, (x, y), LOSS, **kw).n_rows == 8  # the shared call itself is fine
    y[6] = 7
    with pytest.raises(IndexError, match="out of bounds"):
        export_gradients(model, ck, (x, y), LOSS, **kw)


def _bare_linear_case():
    """A bare nn.Linear(4, 3) (its module name is ""), two checkpoints, five examples."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    checkpoints = []
    for lr in (0.1, 0.2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        checkpoints.append(({k: v.clone() for k, v in model.state_dict().items()}, lr))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    return model, checkpoints, x, y


def _bare_linear_reference(state, x, y) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dlogits (5, 3), [x, 1] (5, 5)) in float64 NumPy for softmax cross-entropy: example i's gradient
    w.r.t. [W | b] is their outer product."""
    w, b, xs = state["weight"].double().numpy(), state["bias"].double().numpy(), x.double().numpy()
    z = xs @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y.numpy()] -= 1.0
    return p, np.hstack([xs, np.ones((len(xs), 1))])


@pytest.mark.parametrize("kw", [{"mode": "last_layer"}, {"mode": "factored"}, {"mode": "factored", "layers": "weight"}])
def test_a_bare_linear_model_is_factored_as_float64_outer_products(kw):
    """A bare nn.Linear is named "" by named_modules(): its parameters are "weight" and "bias", not
    ".weight" (a KeyError in the first-rows check before)."""
    model, checkpoints, x, y = _bare_linear_case()
    if kw.get("layers") == "weight":
        with pytest.raises(ValueError, match=r"\['bias'\] of the model \(Linear\) is not chosen"):
            export_gradients(model, checkpoints, (x, y), LOSS, progress=False, **kw)
        kw = {**kw, "layers": ["weight", "bias"]}
    g = export_gradients(model, checkpoints, (x, y), LOSS, progress=False, **kw)
    assert g.dims == ((3, 5),) * 2 and g.n_rows == 5  # one (out, in + 1) layer per checkpoint
    np.testing.assert_array_equal(g.weights, [0.1, 0.2])
    for c, (state, _) in enumerate(checkpoints):
        left, right = _bare_linear_reference(state, x, y)
        np.testing.assert_allclose(np.asarray(g.left[c]), left, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(g.right[c]), right, rtol=1e-5, atol=1e-6)
        rows = np.einsum("bo,bi->boi", np.asarray(g.left[c]), np.asarray(g.right[c])).reshape(5, -1)
        np.testing.assert_allclose(rows, np.einsum("bo,bi->boi", left, right).reshape(5, -1), rtol=1e-5, atol=1e-6)


def test_a_bare_linear_last_layer_metadata_names_its_parameters():
    model, checkpoints, x, y = _bare_linear_case()
    g = export_gradients(model, checkpoints, (x, y), LOSS, mode="last_layer", progress=False)
    entry = g.metadata["last_layer"]
    assert (entry["layer"], entry["weight"], entry["bias"]) == ("", "weight", "bias")


def test_a_bare_linear_that_cannot_be_factored_names_its_parameters_for_mode_full():
    """The mode='full' advice gives layers= the parameter names: the module name "" is no pattern."""
    model, checkpoints, _, y = _bare_linear_case()
    x = torch.randn(5, 2, 4)  # (batch, tokens, in): not one outer product per example

    def loss(out, targets):
        return LOSS(out.sum(dim=1), targets)

    for mode in ("last_layer", "factored"):
        with pytest.raises(ValueError, match=r"got input of shape \(5, 2, 4\).*layers=\['weight', 'bias'\]"):
            export_gradients(model, checkpoints, (x, y), loss, mode=mode, progress=False)
    full = export_gradients(model, checkpoints, (x, y), loss, layers=["weight", "bias"], progress=False)
    assert full.dims == (15, 15)  # 3 x 4 weight + 3 bias, per checkpoint


def test_a_bare_linear_named_by_a_parameter_for_last_layer_is_told_to_leave_layers_out():
    model, checkpoints, x, y = _bare_linear_case()
    with pytest.raises(ValueError, match="is itself its one nn.Linear layer; leave layers=None"):
        export_gradients(model, checkpoints, (x, y), LOSS, mode="last_layer", layers=["weight"], progress=False)


@pytest.mark.parametrize(
    "wrap",
    [
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.parametrizations.spectral_norm,
        lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Doubled()),
    ],
    ids=["weight_norm", "spectral_norm", "custom"],
)
@pytest.mark.parametrize("layers", [None, ["2"]])
@pytest.mark.parametrize("adam", [False, True])
def test_a_parametrized_head_is_refused_naming_the_layer_and_mode_full(wrap, layers, adam):
    """review72 F2: a parametrized Linear computes its weight from parametrizations.weight.original*; the factors
    (the gradient of that computed weight) are not its parameters' gradients. Refused like old-style weight_norm
    (was KeyError '2.weight', or with Adam 'the rank-one preconditioner cannot place it')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    wrap(model[2])
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    state = copy.deepcopy(model.state_dict())
    if adam:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        LOSS(model(x), y).mean().backward()
        opt.step()
        model.load_state_dict(state)
        checkpoints, kw = [(state, 1.0, copy.deepcopy(opt.state_dict()))], {"preconditioner": "adam"}
    else:
        checkpoints, kw = [(state, 1.0)], {}
    for mode in ("last_layer",) if layers is None else ("last_layer", "factored"):
        match = r"layer '2' is parametrized.*parametrizations\.weight\.original.*Use mode='full' with layers=\['2'\]"
        if mode == "factored":
            match = "mode='factored' needs every chosen parameter to be an nn.Linear weight or bias"
        with pytest.raises(ValueError, match=match):
            export_gradients(model, checkpoints, (x, y), LOSS, mode=mode, layers=layers, progress=False, **kw)
    full = export_gradients(model, checkpoints, (x, y), LOSS, layers=["2"], progress=False, **kw)
    assert [p["name"] for p in full.metadata["params"]][0] == "2.bias"


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_weight_reused_outside_its_layer_after_the_checked_rows_is_refused_on_its_batch():
    """review147 F1: rows 30-39 of a model reusing a.weight outside a's forward for those rows only were factored
    silently (Gram 53% off). Now each batch's factors, summed, must equal autograd's gradient of its summed loss:
    refused naming the layer and the batch, with the mode='full' layers to use; the same model with the reuse in no
    row exports without error."""
    model = LateReuse()
    x, y = classification_data(40, seed=4)
    x[:, 0] = torch.where(torch.arange(40) >= 30, 3.0, 0.0)
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"mode='factored': the factors of 'a' .* batch 4's summed loss.*\['a', 'b'\]"):
        export_gradients(model, [(state, 1.0)], (x, y), LOSS, mode="factored", batch_size=8, progress=False)
    x[:, 0] = 0.0
    export_gradients(model, [(state, 1.0)], (x, y), LOSS, mode="factored", batch_size=8, progress=False)


class _SlightLateReuse(LateReuse):
    """LateReuse with the reuse outside a's forward scaled by 1/100."""

    def forward(self, x):
        extra = nn.functional.linear(x, self.a.weight) * (x[:, :1] > 1.5).to(x.dtype) / 100
        return self.b(torch.tanh(self.a(x)) + extra)


def test_a_reuse_of_a_hundredth_after_the_checked_rows_is_refused():
    """The sum check's bar is SUM_SIGMAS (4) times the float32 tolerance (1.1e-4) of the size: a reuse putting the
    batch's factors 6.2e-3 of its size off is refused (r297 M31: a bar 100 times higher let it through)."""
    model = _SlightLateReuse()
    x, y = classification_data(40, seed=4)
    x[:, 0] = torch.where(torch.arange(40) >= 30, 3.0, 0.0)
    with pytest.raises(
        ValueError, match=r"the factors of 'a' \(by 6\.\de-03 of its size, tolerance 1\.1e-04\) .* batch 4"
    ):
        export_gradients(
            model, [(model.state_dict(), 1.0)], (x, y), LOSS, mode="factored", batch_size=8, progress=False
        )


def test_a_well_fit_regression_without_room_for_the_float64_look_is_refused_saying_so(monkeypatch):
    """Where the float64 copy would not fit, the float32 verdict stands, the refusal saying why."""
    monkeypatch.setattr(last_layer, "float64_room", lambda state: "the float64 check was skipped (simulated)")
    model, state, x, y = well_fit_regression()
    with pytest.raises(ValueError, match=r"disagree.*\(the float64 check was skipped \(simulated\)\)\. Use mode="):
        export_gradients(model, [(state, 1.0)], (x, y), _per_example_mse, mode="last_layer", progress=False)


def _tiny_bert_classifier():
    """BERT (hidden 32, 2 layers) with a 3-class head, built from its config (no download)."""
    model = tiny_bert()
    ids = torch.randint(1, 97, (6, 12), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 9, 5, 12, 3, 7])[:, None]).long()
    return model, {"input_ids": ids * mask, "attention_mask": mask}, torch.tensor([0, 1, 2, 0, 1, 2])


def _bert_loss(outputs, labels):
    return nn.functional.cross_entropy(outputs.logits.float(), labels, reduction="none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("mode", "layers"), [("last_layer", ["2"]), ("factored", ["0", "2"])])
def test_an_mlp_under_autocast_exports_factors_within_its_rounding_of_float64(mode, layers, dtype):
    """review201 F4: every export under torch.autocast was refused ('the factors disagree...') while mode='full'
    exported: the first rows were judged at float32's tolerance. They are now judged at autocast's dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(12, 16), torch.randint(0, 4, (12,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=dtype):
        g = export_gradients(model, [(state, 1.0)], (x, y), LOSS, mode=mode, layers=layers, progress=False)
    for c, layer in enumerate(layers):
        got = as_full(g.left[c].astype(np.float64), g.right[c].astype(np.float64))
        want = float64_rows(model, state, x, y, LOSS, [f"{layer}.weight", f"{layer}.bias"])
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 4 * torch.finfo(dtype).eps, (layer, err.max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("mode", "layers"), [("last_layer", None), ("factored", ["bert.pooler.dense", "classifier"])])
def test_a_bert_classifier_under_autocast_exports_factors_within_its_rounding_of_float64(mode, layers, dtype):
    model, inputs, labels = _tiny_bert_classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=dtype):
        g = export_gradients(
            model, [(state, 1.0)], (inputs, labels), _bert_loss, mode=mode, layers=layers, progress=False
        )
    chosen = layers or ["classifier"]
    twin = copy.deepcopy(model).double()
    for c, layer in enumerate(chosen):
        got = as_full(g.left[c].astype(np.float64), g.right[c].astype(np.float64))
        names = [f"{layer}.weight", f"{layer}.bias"]
        want = float64_rows(twin, state, labels, labels, _bert_loss, names, call=_bert_row(inputs))
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 4 * torch.finfo(dtype).eps, (layer, err.max())


def _bert_row(inputs):
    """float64_rows' `call` for BERT: the row of `inputs` whose label was sliced (matched by position)."""
    rows = iter(range(len(inputs["input_ids"])))

    def call(twin, _):
        i = next(rows)
        return twin(**{k: v[i : i + 1] for k, v in inputs.items()})

    return call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["factored", "last_layer"])
@pytest.mark.parametrize(("make", "layer"), [(AlsoOutside, "b"), (doubled_head, "2")])
def test_factors_that_are_not_the_gradient_are_still_refused_under_autocast(make, layer, mode, dtype):
    model = make()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with torch.autocast("cpu", dtype=dtype), pytest.warns(UserWarning, match="torch.autocast"):
        with pytest.raises(ValueError, match=rf"mode='{mode}': the factors of \['{layer}'\] disagree.*Use mode='full'"):
            export_gradients(model, [(model.state_dict(), 1.0)], (x, y), LOSS, mode=mode, progress=False)
