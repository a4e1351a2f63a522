"""Cross-framework: the same MLP weights in PyTorch and JAX give the same TracIn influence and top-k.

The PyTorch side is an independent torch.func reference (functional_call + vmap(grad)) computed here;
scores from tracin.jax gradients must be within the scale-aware bound of docs/architecture.md of the float64
influence of the torch gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

import tracin
from reference import assert_close_to_exact, exact_scores, factored_to_full
from tracin.jax import export_gradients
from tracin.projection import LayerMatrix


def _torch_model(w: dict) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for name, key in (("0.weight", "w1"), ("0.bias", "b1"), ("2.weight", "w2"), ("2.bias", "b2")):
            model.get_parameter(name).copy_(torch.as_tensor(w[key], dtype=torch.float32))
    return model


def torch_rows(w: dict, x: np.ndarray, y: np.ndarray, names: list[str]) -> np.ndarray:
    """(n, d) float32 per-example gradients of the named torch parameters, concatenated."""
    model = _torch_model(w)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(chosen, xi, yi):
        out = functional_call(model, {**params, **chosen}, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(
        {k: params[k] for k in names}, torch.as_tensor(x), torch.as_tensor(y)
    )
    return torch.cat([grads[k].reshape(len(x), -1) for k in names], dim=1).numpy()


@pytest.fixture
def split(data):
    x, y = data
    return (x[10:], y[10:]), (x[:10], y[:10])  # train 60, test 10


def _check_influence(ours_test, ours_train, ref_test, ref_train, lrs):
    assert_close_to_exact(tracin.scores(ours_test, ours_train), ref_test, ref_train, lrs)
    exact = exact_scores(ref_test, ref_train, lrs)
    both = tracin.top_k(ours_test, ours_train, k=5, side="both")
    np.testing.assert_array_equal(both[0].indices, np.argsort(-exact, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(both[1].indices, np.argsort(exact, axis=1, kind="stable")[:, :5])
    self_ours = tracin.self_influence(ours_train)
    self_ref = sum(
        lr * np.einsum("nd,nd->n", r.astype(np.float64), r.astype(np.float64))
        for lr, r in zip(lrs, ref_train, strict=True)
    )
    np.testing.assert_allclose(self_ours, self_ref, rtol=1e-5)


@pytest.mark.parametrize(
    "layers, torch_names",
    [
        (None, ["0.weight", "0.bias", "2.weight", "2.bias"]),
        (["l2"], ["2.weight", "2.bias"]),
    ],
)
def test_full_gradients_match_torch(mlp, split, layers, torch_names):
    (xtr, ytr), (xte, yte) = split
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    train = export_gradients(mlp.loss_fn, ckpts, (xtr, ytr), layers=layers, batch_size=16, progress=False)
    test = export_gradients(mlp.loss_fn, ckpts, (xte, yte), layers=layers, progress=False)
    ref_train = [torch_rows(w, xtr, ytr, torch_names) for w in mlp.weights]
    ref_test = [torch_rows(w, xte, yte, torch_names) for w in mlp.weights]
    assert train.dims == tuple(r.shape[1] for r in ref_train)
    _check_influence(test, train, ref_test, ref_train, mlp.lrs)


def test_last_layer_matches_torch(mlp, split):
    (xtr, ytr), (xte, yte) = split
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    kw = dict(mode="last_layer", layers=["l2"], layer_input=mlp.hidden, progress=False)
    train = export_gradients(mlp.loss_fn, ckpts, (xtr, ytr), batch_size=16, **kw)
    test = export_gradients(mlp.loss_fn, ckpts, (xte, yte), **kw)
    ref_train = [torch_rows(w, xtr, ytr, ["2.weight", "2.bias"]) for w in mlp.weights]
    ref_test = [torch_rows(w, xte, yte, ["2.weight", "2.bias"]) for w in mlp.weights]
    _check_influence(test, train, ref_test, ref_train, mlp.lrs)


@pytest.mark.parametrize(
    "mode, jax_layers, torch_layers",
    [
        ("full", None, None),
        ("full", ["l2"], ["2"]),
        ("last_layer", ["l2"], ["2"]),
    ],
)
def test_same_influence_as_tracin_torch(mlp, split, mode, jax_layers, torch_layers):
    import tracin.torch

    (xtr, ytr), (xte, yte) = split
    models = [_torch_model(w) for w in mlp.weights]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    extra = dict(layer_input=mlp.hidden) if mode == "last_layer" else {}

    def ours(x, y):
        return export_gradients(
            mlp.loss_fn,
            list(zip(mlp.params, mlp.lrs, strict=True)),
            (x, y),
            mode=mode,
            layers=jax_layers,
            progress=False,
            **extra,
        )

    def theirs(x, y):
        return tracin.torch.export_gradients(
            models[0],
            list(zip(states, mlp.lrs, strict=True)),
            (torch.as_tensor(x), torch.as_tensor(y)),
            ce,
            mode=mode,
            layers=torch_layers,
            progress=False,
        )

    jax_test, jax_train, torch_test, torch_train = ours(xte, yte), ours(xtr, ytr), theirs(xte, yte), theirs(xtr, ytr)
    assert jax_train.dims == torch_train.dims
    if mode == "last_layer":  # both factor as dL/d(output) and [input, 1]
        for a, b in zip(jax_train.left + jax_train.right, torch_train.left + torch_train.right, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        ref_test, ref_train = (
            factored_to_full(torch_test.left, torch_test.right),
            factored_to_full(torch_train.left, torch_train.right),
        )
    else:
        ref_test, ref_train = list(torch_test.matrices), list(torch_train.matrices)
    assert_close_to_exact(tracin.scores(jax_test, jax_train), ref_test, ref_train, mlp.lrs)
    for side in ("proponents", "opponents"):
        np.testing.assert_array_equal(
            tracin.top_k(jax_test, jax_train, k=5, side=side).indices,
            tracin.top_k(torch_test, torch_train, k=5, side=side).indices,
        )


def _torch_layout_params(w: dict) -> list:
    """JAX params laid out as torch's: a list [w1 (out, in), b1, w2 (out, in), b2], so the flattened
    gradient rows have torch's column order and a projection of them is the same map on both sides."""
    return [jnp.asarray(w[k], jnp.float32) for k in ("w1", "b1", "w2", "b2")]


def _torch_layout_loss(mlp):
    def loss(params, x, y):
        w1, b1, w2, b2 = params
        return mlp.cross_entropy(jnp.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    return loss


@pytest.mark.parametrize("mode, per_layer", [("full", False), ("full", True), ("last_layer", False)])
def test_same_projection_gives_the_same_influence_as_tracin_torch(mlp, split, mode, per_layer):
    import tracin.torch

    (xtr, ytr), (xte, yte) = split
    projection = tracin.Projection(16, seed=11, per_layer=per_layer)
    models = [_torch_model(w) for w in mlp.weights]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    if mode == "full":
        loss_fn, params, extra = _torch_layout_loss(mlp), [_torch_layout_params(w) for w in mlp.weights], {}
    else:
        loss_fn, params, extra = mlp.loss_fn, mlp.params, dict(layers=["l2"], layer_input=mlp.hidden)

    def ours(x, y):
        return export_gradients(
            loss_fn,
            list(zip(params, mlp.lrs, strict=True)),
            (x, y),
            mode=mode,
            projection=projection,
            progress=False,
            **extra,
        )

    def theirs(x, y):
        return tracin.torch.export_gradients(
            models[0],
            list(zip(states, mlp.lrs, strict=True)),
            (torch.as_tensor(x), torch.as_tensor(y)),
            ce,
            mode=mode,
            projection=projection,
            progress=False,
        )

    jax_test, jax_train, torch_test, torch_train = ours(xte, yte), ours(xtr, ytr), theirs(xte, yte), theirs(xtr, ytr)
    assert jax_train.dims == torch_train.dims
    assert jax_train.metadata["projection"] == torch_train.metadata["projection"] == projection.to_dict()
    if mode == "last_layer":
        ref_test = factored_to_full(torch_test.left, torch_test.right)
        ref_train = factored_to_full(torch_train.left, torch_train.right)
    else:
        assert [p["shape"] for p in jax_train.metadata["params"]] == [
            p["shape"] for p in torch_train.metadata["params"]
        ]
        ref_test, ref_train = list(torch_test.matrices), list(torch_train.matrices)
    _check_influence(jax_test, jax_train, ref_test, ref_train, mlp.lrs)


def test_same_kronecker_projection_as_tracin_torch_over_tokens():
    """Bias-free nn.Linear layers over tokens and JAX (out, in) weights with the same values: the same layout
    (LayerMatrix(out, in) per weight) and the same per-token projected rows."""
    import tracin.torch

    r = np.random.default_rng(12)
    d, h, c, t = 5, 8, 3, 4
    weights = [(r.normal(0, 0.6, (h, d)), r.normal(0, 0.6, (c, h))) for _ in range(2)]
    x, y = r.normal(size=(11, t, d)).astype(np.float32), r.integers(0, c, (11, t))
    projection = tracin.Projection(2 * 12, seed=5, per_layer=True, kronecker=True)
    model = torch.nn.Sequential(torch.nn.Linear(d, h, bias=False), torch.nn.Tanh(), torch.nn.Linear(h, c, bias=False))
    states = [{"0.weight": torch.as_tensor(w1).float(), "2.weight": torch.as_tensor(w2).float()} for w1, w2 in weights]

    def torch_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)

    def jax_loss(params, xs, labels):
        w1, w2 = params
        logits = jnp.tanh(xs @ w1.T) @ w2.T
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0].sum(1)

    lrs = [0.5, 0.25]
    ours = export_gradients(
        jax_loss,
        [([jnp.asarray(w, jnp.float32) for w in ws], lr) for ws, lr in zip(weights, lrs, strict=True)],
        (x, y),
        projection=projection,
        batch_size=4,
        progress=False,
    )
    theirs = tracin.torch.export_gradients(
        model,
        list(zip(states, lrs, strict=True)),
        (torch.as_tensor(x), torch.as_tensor(y)),
        torch_loss,
        projection=projection,
        progress=False,
    )
    layout = [LayerMatrix(h, d).to_dict(), LayerMatrix(c, h).to_dict()]
    assert ours.metadata["projection"] == theirs.metadata["projection"] == {**projection.to_dict(), "segments": layout}
    for a, b in zip(ours.matrices, theirs.matrices, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("kernel_layout", ["flax", "torch"])
def test_bias_free_last_layer_matches_tracin_torch(mlp, split, kernel_layout):
    """A bias-free head: nn.Linear(8, 3, bias=False) in torch, x @ K ((in, out) Flax kernel) or h @ W.T (an
    (out, in) leaf) in JAX with the same weights: the same factors (dL/d(output), the input without a 1), dims,
    metadata last_layer (bias None) and influence (JAX refused a bias-free head before)."""
    import tracin.torch

    (xtr, ytr), (xte, yte) = split
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=False))
    states = [
        {
            "0.weight": torch.as_tensor(w["w1"]).float(),
            "0.bias": torch.as_tensor(w["b1"]).float(),
            "2.weight": torch.as_tensor(w["w2"]).float(),
        }
        for w in mlp.weights
    ]
    if kernel_layout == "flax":
        params = [{"l1": p["l1"], "head": p["l2"]["kernel"]} for p in mlp.params]

        def loss(p, x, y):
            return mlp.cross_entropy(mlp.hidden(p, x) @ p["head"], y)

    else:
        pairs = zip(mlp.params, mlp.weights, strict=True)
        params = [{"l1": p["l1"], "head": jnp.asarray(w["w2"], jnp.float32)} for p, w in pairs]

        def loss(p, x, y):
            return mlp.cross_entropy(mlp.hidden(p, x) @ p["head"].T, y)

    def ours(x, y):
        return export_gradients(
            loss,
            list(zip(params, mlp.lrs, strict=True)),
            (x, y),
            mode="last_layer",
            layers=["head"],
            layer_input=mlp.hidden,
            progress=False,
        )

    def theirs(x, y):
        return tracin.torch.export_gradients(
            model,
            list(zip(states, mlp.lrs, strict=True)),
            (torch.as_tensor(x), torch.as_tensor(y)),
            torch.nn.CrossEntropyLoss(reduction="none"),
            mode="last_layer",
            layers=["2"],
            progress=False,
        )

    jax_test, jax_train, torch_test, torch_train = ours(xte, yte), ours(xtr, ytr), theirs(xte, yte), theirs(xtr, ytr)
    assert jax_train.dims == torch_train.dims == ((3, 8), (3, 8))
    assert torch_train.metadata["last_layer"]["bias"] is None is jax_train.metadata["last_layer"]["bias"]
    assert {k: v for k, v in jax_train.metadata["last_layer"].items() if k not in ("layer", "weight")} == {
        k: v for k, v in torch_train.metadata["last_layer"].items() if k not in ("layer", "weight")
    }
    for a, b in zip(jax_train.left + jax_train.right, torch_train.left + torch_train.right, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the float64 NumPy reference: torch_rows' kernel gradients of the model with its bias at 0
    zero_bias = [{**w, "b2": np.zeros(3)} for w in mlp.weights]
    ref_test = [torch_rows(w, xte, yte, ["2.weight"]) for w in zero_bias]
    ref_train = [torch_rows(w, xtr, ytr, ["2.weight"]) for w in zero_bias]
    _check_influence(jax_test, jax_train, ref_test, ref_train, mlp.lrs)
    # across frameworks too: last_layer rows are the factors, whichever way the JAX kernel is stored
    assert_close_to_exact(tracin.scores(torch_test, jax_train), ref_test, ref_train, mlp.lrs)
    for side in ("proponents", "opponents"):
        np.testing.assert_array_equal(
            tracin.top_k(jax_test, jax_train, k=5, side=side).indices,
            tracin.top_k(torch_test, torch_train, k=5, side=side).indices,
        )


def test_torch_and_jax_sides_score_together_only_when_their_rows_are_laid_out_alike(mlp, split):
    """review229 F1: a tracin.torch side scored against a tracin.jax side of another parameter layout (dict
    keys sorted, kernels (in, out)) gave silently wrong scores; now refused naming both layouts. JAX params
    in torch's order and orientation score as torch against torch does."""
    import tracin.torch

    (xtr, ytr), (xte, yte) = split
    states = [{k: v.detach().clone() for k, v in _torch_model(w).state_dict().items()} for w in mlp.weights]
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    data = (torch.as_tensor(xte), torch.as_tensor(yte))
    torch_test = tracin.torch.export_gradients(
        _torch_model(mlp.weights[0]), list(zip(states, mlp.lrs, strict=True)), data, ce, progress=False
    )
    dict_train = export_gradients(mlp.loss_fn, list(zip(mlp.params, mlp.lrs, strict=True)), (xtr, ytr), progress=False)
    with pytest.raises(ValueError, match=r"\('torch'\) and train \('jax'\) lay out their rows differently"):
        tracin.scores(torch_test, dict_train)
    aligned = [_torch_layout_params(w) for w in mlp.weights]
    train = export_gradients(
        _torch_layout_loss(mlp), list(zip(aligned, mlp.lrs, strict=True)), (xtr, ytr), progress=False
    )
    ref_train = [torch_rows(w, xtr, ytr, ["0.weight", "0.bias", "2.weight", "2.bias"]) for w in mlp.weights]
    assert_close_to_exact(tracin.scores(torch_test, train), list(torch_test.matrices), ref_train, mlp.lrs)
