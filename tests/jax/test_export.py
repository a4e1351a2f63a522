"""tracin.jax.export_gradients on nested-dict params, against the float64 NumPy reference of conftest."""

from __future__ import annotations

import dataclasses
import functools
import gc
import warnings
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import tracin
from interrupts import FailingBatches, Killed
from reference import assert_close_to_exact, factored_to_full
from tracin._export.metadata import LEFT, RIGHT
from tracin.jax import export_gradients, per_example

KERNELS = {"w1", "w2"}  # Flax-style (in, out) kernels: the reference (out, in) gradient transposed


def _close(ours, ref):
    ours = np.asarray(ours, np.float64)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_full_rows_and_scores_match_reference(mlp, data):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    grads = export_gradients(mlp.loss_fn, ckpts, (x, y), batch_size=32, progress=False)
    assert isinstance(grads, tracin.Gradients)
    assert grads.n_rows == 70 and grads.dims == (75, 75)
    np.testing.assert_array_equal(grads.weights, mlp.lrs)
    assert [p["name"] for p in grads.metadata["params"]] == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
    assert [p["shape"] for p in grads.metadata["params"]] == [[8], [5, 8], [3], [8, 3]]
    refs = [mlp.reference_rows(mlp.reference_grads(w, x, y), ["b1", "w1", "b2", "w2"], KERNELS) for w in mlp.weights]
    for ours, ref in zip(grads.matrices, refs, strict=True):
        _close(ours, ref)
    test = grads[:10]
    assert_close_to_exact(tracin.scores(test, grads), [r[:10] for r in refs], refs, mlp.lrs)


@pytest.mark.parametrize(
    "layers, names",
    [
        (["l2"], ["b2", "w2"]),
        (["l1/kernel", "l2/bias"], ["w1", "b2"]),
        (["*/kernel"], ["w1", "w2"]),
        ("l1/*", ["b1", "w1"]),
    ],
)
def test_layers_select_parameters_in_stable_order(mlp, data, layers, names):
    x, y = data
    grads = export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], (x, y), layers=layers, progress=False)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), names, KERNELS)
    _close(grads.matrices[0], ref)
    assert grads.metadata["layers"] == ([layers] if isinstance(layers, str) else layers)


def test_last_layer_factors_are_output_gradient_and_input_with_one(mlp, data):
    x, y = data
    grads = export_gradients(
        mlp.loss_fn,
        list(zip(mlp.params, mlp.lrs, strict=True)),
        (x, y),
        mode="last_layer",
        layers=["l2"],
        layer_input=mlp.hidden,
        batch_size=16,
        progress=False,
    )
    assert isinstance(grads, tracin.FactoredGradients) and grads.dims == ((3, 9), (3, 9))
    assert grads.metadata["last_layer"] == {
        "layer": "l2",
        "weight": "l2/kernel",
        "bias": "l2/bias",
        "left": LEFT,
        "right": RIGHT,
    }
    for c, w in enumerate(mlp.weights):
        ref = mlp.reference_grads(w, x, y)
        _close(grads.left[c], ref["b2"])
        _close(grads.right[c], np.hstack([ref["hidden"], np.ones((70, 1))]))
    # The factors' outer products are the layer's (weight | bias) gradient, so scores are TracIn on it.
    full = [
        np.concatenate([r["w2"], r["b2"][:, :, None]], axis=2).reshape(70, -1)
        for r in (mlp.reference_grads(w, x, y) for w in mlp.weights)
    ]
    np.testing.assert_allclose(factored_to_full(grads.left, grads.right)[0], full[0], rtol=1e-5, atol=1e-7)
    assert_close_to_exact(tracin.scores(grads, grads), full, full, mlp.lrs)


def _bias_free(mlp):
    """The MLP with a bias-free head z = tanh(x W1^T + b1) W2^T: params without l2/bias, its loss, and the
    float64 reference weights (b2 = 0)."""
    params = [{"l1": p["l1"], "l2": {"kernel": p["l2"]["kernel"]}} for p in mlp.params]
    weights = [{**w, "b2": np.zeros_like(w["b2"])} for w in mlp.weights]

    def loss(p, x, y):
        return mlp.cross_entropy(mlp.hidden(p, x) @ p["l2"]["kernel"], y)

    return params, weights, loss


def _bias_free_torch_layout(mlp):
    """The same head as a bare (out, in) leaf used as h @ W.T, params a list [l1 params, W]."""
    params = [[p["l1"], jnp.asarray(w["w2"], jnp.float32)] for p, w in zip(mlp.params, mlp.weights, strict=True)]
    weights = [{**w, "b2": np.zeros_like(w["b2"])} for w in mlp.weights]

    def loss(p, x, y):
        return mlp.cross_entropy(mlp.hidden({"l1": p[0]}, x) @ p[1].T, y)

    def hidden(p, x):
        return mlp.hidden({"l1": p[0]}, x)

    return params, weights, loss, hidden


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_bias_free_last_layer_factors_are_output_gradient_and_input(mlp, data, layout):
    """A bias-free head (x @ K, or h @ W.T of an (out, in) leaf): left dL/d(output) read at its dot_general,
    right the input without a 1, as tracin.torch factors a bias-free nn.Linear (was refused: no bias)."""
    x, y = data
    if layout == "flax":
        params, weights, loss = _bias_free(mlp)
        hidden, name, layer = mlp.hidden, "l2/kernel", "l2"
    else:
        params, weights, loss, hidden = _bias_free_torch_layout(mlp)
        name = layer = "1"
    grads = export_gradients(
        loss,
        list(zip(params, mlp.lrs, strict=True)),
        (x, y),
        mode="last_layer",
        layers=[name if layout == "torch" else "l2"],
        layer_input=hidden,
        batch_size=16,
        progress=False,
    )
    assert isinstance(grads, tracin.FactoredGradients) and grads.dims == ((3, 8), (3, 8))
    assert grads.metadata["last_layer"] == {"layer": layer, "weight": name, "bias": None, "left": LEFT, "right": RIGHT}
    assert grads.metadata["params"] == [{"name": name, "shape": [8, 3] if layout == "flax" else [3, 8]}]
    refs = [mlp.reference_grads(w, x, y) for w in weights]
    for c, ref in enumerate(refs):
        _close(grads.left[c], ref["b2"])  # dL/dz, which the bias-free head has no bias gradient to give
        _close(grads.right[c], ref["hidden"])
    full = [ref["w2"].reshape(70, -1) for ref in refs]  # float64 NumPy (out, in) kernel gradients
    assert_close_to_exact(tracin.scores(grads, grads), full, full, mlp.lrs)
    np.testing.assert_allclose(
        tracin.self_influence(grads), sum(lr * (f**2).sum(1) for lr, f in zip(mlp.lrs, full, strict=True)), rtol=1e-5
    )


def test_a_kernel_named_without_its_bias_gives_the_kernel_factors(mlp, data):
    """layers naming only the kernel of a biased layer: its gradient alone, dL/d(output) (x) input."""
    x, y = data
    grads = export_gradients(
        mlp.loss_fn,
        list(zip(mlp.params, mlp.lrs, strict=True)),
        (x, y),
        mode="last_layer",
        layers=["l2/kernel"],
        layer_input=mlp.hidden,
        progress=False,
    )
    assert grads.dims == ((3, 8), (3, 8)) and grads.metadata["last_layer"]["bias"] is None
    refs = [mlp.reference_grads(w, x, y) for w in mlp.weights]
    full = [ref["w2"].reshape(70, -1) for ref in refs]
    np.testing.assert_allclose(factored_to_full(grads.left, grads.right)[1], full[1], rtol=1e-5, atol=1e-7)
    assert_close_to_exact(tracin.scores(grads, grads), full, full, mlp.lrs)


def test_bias_free_last_layer_into_a_store_resumes_after_an_interruption(mlp, data, tmp_path):
    """The first batch read ahead (to orient the kernel) belongs to the first pass: a store export killed
    part-way resumes to the rows of the in-memory export."""
    x, y = data
    params, _, loss = _bias_free(mlp)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)]
    ckpts = list(zip(params, mlp.lrs, strict=True))
    kw = dict(mode="last_layer", layers=["l2"], layer_input=mlp.hidden, progress=False)
    with pytest.raises(Killed):  # pass 1 fingerprints the data; dies in checkpoint 0
        export_gradients(loss, ckpts, FailingBatches(batches, on=2, after=2), store=tmp_path / "s", **kw)
    stored = export_gradients(loss, ckpts, batches, store=tmp_path / "s", **kw)
    memory = export_gradients(loss, ckpts, batches, **kw)
    assert stored.dims == memory.dims == ((3, 8), (3, 8))
    np.testing.assert_allclose(tracin.scores(stored, stored), tracin.scores(memory, memory), rtol=1e-6)


def test_bias_free_last_layer_of_a_flax_dense_and_a_one_shot_iterator(data):
    """flax nn.Dense(use_bias=False) as the head, the data a one-shot iterator of batches (read once: the
    first batch, read ahead to orient the kernel, is not lost), against jax.grad of the kernel."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, features=False):
            h = jnp.tanh(nn.Dense(6)(x))
            return h if features else nn.Dense(4, use_bias=False)(h)

    x, _ = data
    y = np.random.default_rng(3).integers(0, 4, len(x))
    net = Net()
    variables = net.init(jax.random.key(0), x[:1])

    def loss(v, inputs, targets):
        logits = net.apply(v, inputs)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    def features(v, inputs):
        return net.apply(v, inputs, features=True)

    batches = iter([(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)])
    grads = export_gradients(
        loss,
        [(variables, 1.0)],
        batches,
        mode="last_layer",
        layers=["params/Dense_1"],
        layer_input=features,
        progress=False,
    )
    assert grads.n_rows == 70 and grads.dims == ((4, 6),)
    kernel_grad = jax.vmap(jax.grad(lambda v, xi, yi: loss(v, xi[None], yi[None])[0]), in_axes=(None, 0, 0))(
        variables, x, y
    )["params"]["Dense_1"]["kernel"]  # (n, in, out)
    ref = np.swapaxes(np.asarray(kernel_grad, np.float64), 1, 2).reshape(70, -1)
    np.testing.assert_allclose(factored_to_full(grads.left, grads.right)[0], ref, rtol=1e-5, atol=1e-6)


def test_last_batch_is_padded_not_recompiled_and_each_export_compiles_once(mlp, data):
    x, y = data
    traces = []

    def counted_loss(params, inputs, targets):
        traces.append(inputs.shape)  # runs while JAX traces the function, or in the eager coupling check
        return mlp.loss_fn(params, inputs, targets)

    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    ragged = export_gradients(counted_loss, ckpts, (x, y), batch_size=16, progress=False)
    # 2 checkpoints x 5 batches (the last of 6 rows, padded to 16): one abstract check of the batched
    # loss, the eager check that 4 and 2 examples give the same losses, then a single trace of the
    # per-example function (a batch of one inside vmap).
    checks = [(16, 5), (4, 5), (2, 5)]
    assert traces == [*checks, (1, 5)]
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[1], x, y), ["b1", "w1", "b2", "w2"], KERNELS)
    _close(ragged.matrices[1], ref)
    traces.clear()
    even = export_gradients(counted_loss, ckpts, (x[:64], y[:64]), batch_size=16, progress=False)
    # the compiled function is shared with the first export: only the abstract check traces the loss
    assert traces == checks, "a later export with the same loss, params and batch size reuses the compilation"
    np.testing.assert_array_equal(ragged.matrices[0][:64], even.matrices[0])
    traces.clear()
    export_gradients(counted_loss, ckpts, (x, y), batch_size=32, progress=False)
    assert traces == [(32, 5), *checks[1:], (1, 5)]  # another batch size: compiled once more


def test_a_set_smaller_than_the_batch_size_gives_the_same_bytes_fresh_and_after_a_batch_size_export(mlp):
    """README: a data set of fewer rows than batch_size runs as one batch of its row count, whatever ran
    before. The same 4-row export, first in a fresh cache, then after a 16-row export of the same loss at
    batch_size=16, gives the same bytes: before, the second was padded to 16 rows to reuse that
    compilation, and XLA's 16-row code differs from its 4-row code in the last bits (a 32 -> 64 -> 3 MLP:
    most values differed), so a Dask worker's export (fresh) differed from the client's. Rows vs float64."""
    r = np.random.default_rng(13)
    wide, hidden = 32, 64
    w = {
        "w1": r.normal(0, 0.3, (hidden, wide)),
        "b1": r.normal(0, 0.3, hidden),
        "w2": r.normal(0, 0.3, (3, hidden)),
        "b2": r.normal(0, 0.3, 3),
    }
    x, y = r.normal(size=(16, wide)).astype(np.float32), r.integers(0, 3, 16)
    batches = []

    def loss(params, inputs, targets):  # a new function object: no compilation of another test is shared
        batches.append(inputs.shape[0])  # traced on the whole batch (the abstract check) and one row (vmap)
        return mlp.loss_fn(params, inputs, targets)

    ckpts = [(mlp.as_params(w), 0.5)]
    fresh = export_gradients(loss, ckpts, (x[:4], y[:4]), batch_size=16, progress=False)
    export_gradients(loss, ckpts, (x, y), batch_size=16, progress=False)
    batches.clear()
    after = export_gradients(loss, ckpts, (x[:4], y[:4]), batch_size=16, progress=False)
    assert 16 not in batches and max(batches) == 4, f"the 4-row export after a 16-row one ran batches of {batches}"
    assert fresh.matrices[0].tobytes() == after.matrices[0].tobytes()
    ref = mlp.reference_rows(mlp.reference_grads(w, x[:4], y[:4]), ["b1", "w1", "b2", "w2"], KERNELS)
    _close(after.matrices[0], ref)  # rows unweighted (weights holds the 0.5)


def test_a_set_smaller_than_the_batch_size_runs_at_its_row_count(mlp):
    """3 rows with batch_size=1024: one batch of 3 rows, not 3 rows padded to 1024 (the memory and compute
    of 1024 rows); 8 rows at the default 64 after a train export of 100 rows at the default 64 (a batch
    of 64 has run): 8 rows, compiled once more for that row count. Rows vs the float64 reference."""
    r = np.random.default_rng(12)
    x, y = r.normal(size=(100, 5)).astype(np.float32), r.integers(0, 3, 100)
    batches = []

    def counted_loss(params, inputs, targets):
        batches.append(inputs.shape[0])  # the abstract check traces the loss on the whole batch
        return mlp.loss_fn(params, inputs, targets)

    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    few = export_gradients(counted_loss, ckpts, (x[:3], y[:3]), batch_size=1024, progress=False)
    assert max(batches) == 3, f"3 rows ran as a batch of {max(batches)}"
    export_gradients(counted_loss, ckpts, (x, y), progress=False)
    batches.clear()
    test = export_gradients(counted_loss, ckpts, (x[:8], y[:8]), progress=False)
    assert max(batches) == 8 and batches.count(1) == 1  # a batch of 8, one more per-example trace
    for c, weights in enumerate(mlp.weights):
        for n, got in ((3, few), (8, test)):
            ref = mlp.reference_rows(mlp.reference_grads(weights, x[:n], y[:n]), ["b1", "w1", "b2", "w2"], KERNELS)
            assert got.matrices[c].shape == ref.shape
            _close(got.matrices[c], ref)


def test_iterable_of_batches_equals_arrays(mlp, data):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    whole = export_gradients(mlp.loss_fn, ckpts, (x, y), progress=False)
    cuts = [0, 30, 55, 61, 70]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    listed = export_gradients(mlp.loss_fn, ckpts, batches, progress=False)
    capped = export_gradients(mlp.loss_fn, ckpts, batches, batch_size=8, progress=False)
    once = export_gradients(mlp.loss_fn, ckpts[:1], iter(batches), progress=False)
    for g in (listed, capped):
        for a, b in zip(g.matrices, whole.matrices, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(once.matrices[0], whole.matrices[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "last_layer", "kronecker"])
@pytest.mark.parametrize("fault", ["trailing shape", "float targets"])
def test_a_later_batch_the_loss_cannot_run_on_gets_the_first_batchs_error_naming_its_rows(mlp, data, mode, fault):
    """Only the first batch is checked: a later batch of new shapes or dtypes is traced anew by jax.jit, and
    when loss_fn fails there the error is the same ValueError as for the first batch, naming the rows."""
    x, y = data
    kwargs = {"progress": False}
    if mode == "last_layer":
        kwargs.update(mode="last_layer", layers=["l2"], layer_input=mlp.hidden)
    if mode == "kronecker":
        kwargs.update(projection=tracin.Projection(16, seed=1, per_layer=True, kronecker=True))
    bad = (x[32:48, :4], y[32:48]) if fault == "trailing shape" else (x[32:48], y[32:48].astype(np.float32))
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), bad, (x[48:64], y[48:64])]
    with pytest.raises(ValueError) as first:
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], [bad, *batches[1:]], **kwargs)
    assert str(first.value).startswith("loss_fn(params, inputs, targets) failed on a batch of 16: ")
    with pytest.raises(ValueError) as later:
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], batches, **kwargs)
    where = "loss_fn(params, inputs, targets) failed on a batch of 16 (rows 32 to 47 of the data, at checkpoint 0): "
    assert str(later.value) == where + str(first.value).split(": ", 1)[1]
    assert isinstance(later.value.__cause__, Exception)  # jax.jit's own error, kept as the cause


def test_dict_inputs_pytree(mlp, data):
    x, y = data

    def loss(params, inputs, targets):
        return mlp.loss_fn(params, inputs["a"] + inputs["b"], targets)

    grads = export_gradients(loss, [(mlp.params[0], 1.0)], ({"a": x, "b": 0 * x}, y), batch_size=32, progress=False)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], KERNELS)
    _close(grads.matrices[0], ref)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", jnp.bfloat16, np.float16])
def test_dtypes_are_the_float32_rows_rounded(mlp, data, dtype):
    x, y = data
    ckpts = [(mlp.params[0], 1.0)]
    exact = export_gradients(mlp.loss_fn, ckpts, (x, y), progress=False).matrices[0]
    low = export_gradients(mlp.loss_fn, ckpts, (x, y), dtype=dtype, progress=False)
    name = np.dtype(dtype).name
    assert low.dtypes == (name,) and low.metadata["dtype"] == name
    assert low.matrices[0].dtype == (np.uint16 if name == "bfloat16" else name)  # bfloat16: its bits, as documented
    as_stored = low.matrices[0].view(ml_dtypes.bfloat16) if name == "bfloat16" else low.matrices[0]
    np.testing.assert_array_equal(as_stored, exact.astype(np.dtype(dtype)))


def test_progress_bar(mlp, data, capsys):
    x, y = data
    export_gradients(mlp.loss_fn, list(zip(mlp.params, mlp.lrs, strict=True)), (x, y), progress=True)
    err = capsys.readouterr().err
    assert "70/70" in err and "140/140" not in err and "checkpoint 2/2" in err and "ex/s" in err
    export_gradients(mlp.loss_fn, list(zip(mlp.params, mlp.lrs, strict=True)), (x, y), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(loss_fn=None), TypeError, "loss_fn must be callable"),
        (dict(mode="all"), ValueError, "mode must be 'full' or 'last_layer'"),
        (dict(mode="last_layer", layers=["l2"]), ValueError, "needs layers=.* and layer_input="),
        (dict(layer_input=lambda p, x: x), ValueError, "layer_input is only used with mode='last_layer'"),
        (dict(dtype="float64"), ValueError, "dtype must be one of"),
        (dict(dtype=np.int8), ValueError, "dtype must be one of"),
        (dict(projection=16), TypeError, "projection must be a tracin.Projection"),
        (dict(store=3), TypeError, "store must be a directory path"),
        (dict(store=__file__), ValueError, "^store: .*test_export.py exists and is not a directory"),
        (dict(progress="no"), TypeError, "progress must be True, False or None .*got 'no'"),
        (dict(progress=1), TypeError, "progress must be True, False or None .*got 1"),
        (dict(layers=[3]), TypeError, "layers must be a non-empty list of name patterns"),
        (dict(data="iterator"), ValueError, "one-shot iterator, but it is read once per checkpoint"),
        (dict(data="generator", store="somewhere"), ValueError, "store= needs the number of examples up front"),
    ],
)
def test_bad_arguments(mlp, data, kwargs, error, message):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    args = dict(loss_fn=mlp.loss_fn, checkpoints=ckpts, data=(x, y), progress=False)
    args.update(kwargs)
    if args["data"] == "iterator":
        args["data"] = iter([(x, y)])
    elif args["data"] == "generator":
        args["data"], args["checkpoints"] = ((x, y) for _ in range(1)), args["checkpoints"][:1]
    with pytest.raises(error, match=message):
        export_gradients(args.pop("loss_fn"), args.pop("checkpoints"), args.pop("data"), **args)


def _projection_matrix(projection: tracin.Projection, d: int, segments: list[int] | None = None) -> np.ndarray:
    """The (d, dim) float64 matrix of `projection` on d columns, read off by projecting the identity."""
    return projection.apply(np.eye(d, dtype=np.float32), segments=segments).astype(np.float64)


def _factor_matrices(projection: tracin.Projection, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """The (p, dl) and (q, dr) float64 factor matrices of projection.apply_factored."""
    eye = np.eye(max(p, q), dtype=np.float32)
    left, right = projection.apply_factored(eye[:, :p], eye[:, :q])
    return left[:p].astype(np.float64), right[:q].astype(np.float64)


WIDTHS = [8, 40, 3, 24]  # l1/bias, l1/kernel, l2/bias, l2/kernel: the per-layer segments


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_projected_rows_are_the_reference_rows_times_the_projection(mlp, data, per_layer, dtype):
    x, y = data
    projection = tracin.Projection(16, seed=5, per_layer=per_layer)
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    projected = export_gradients(
        mlp.loss_fn, ckpts, (x, y), projection=projection, dtype=dtype, batch_size=32, progress=False
    )
    assert isinstance(projected, tracin.Gradients)
    assert projected.dims == (16, 16) and projected.dtypes == (dtype, dtype)
    assert projected.metadata["projection"] == projection.to_dict()
    matrix = _projection_matrix(projection, 75, WIDTHS if per_layer else None)  # segments: per_layer only
    if per_layer:  # each parameter's columns go to its own block of outputs only
        dims = projection.segment_dims(4)
        rows, cols = np.cumsum([0] + WIDTHS), np.cumsum([0] + dims)
        for j in range(4):
            outside = np.delete(matrix[rows[j] : rows[j + 1]], np.s_[cols[j] : cols[j + 1]], axis=1)
            assert not outside.any()
    refs = [
        mlp.reference_rows(mlp.reference_grads(w, x, y), ["b1", "w1", "b2", "w2"], KERNELS) @ matrix
        for w in mlp.weights
    ]
    if dtype == "float16":
        for ours, ref in zip(projected.matrices, refs, strict=True):
            np.testing.assert_allclose(ours.astype(np.float64), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    else:
        for ours, ref in zip(projected.matrices, refs, strict=True):
            _close(ours, ref)
        assert_close_to_exact(tracin.scores(projected[:10], projected), [r[:10] for r in refs], refs, mlp.lrs)


def test_projected_last_layer_factors_are_the_kronecker_projection(mlp, data):
    x, y = data
    projection = tracin.Projection(12, seed=9)  # factored_dims (4, 3)
    grads = export_gradients(
        mlp.loss_fn,
        list(zip(mlp.params, mlp.lrs, strict=True)),
        (x, y),
        mode="last_layer",
        layers=["l2"],
        layer_input=mlp.hidden,
        projection=projection,
        batch_size=16,
        progress=False,
    )
    assert isinstance(grads, tracin.FactoredGradients) and grads.dims == ((4, 3), (4, 3))
    assert grads.metadata["projection"] == projection.to_dict()
    pl, pr = _factor_matrices(projection, 3, 9)
    lefts, rights = [], []
    for c, w in enumerate(mlp.weights):
        ref = mlp.reference_grads(w, x, y)
        lefts.append(ref["b2"] @ pl)
        rights.append(np.hstack([ref["hidden"], np.ones((70, 1))]) @ pr)
        _close(grads.left[c], lefts[-1])
        _close(grads.right[c], rights[-1])
    full = factored_to_full(lefts, rights)
    assert_close_to_exact(tracin.scores(grads, grads), full, full, mlp.lrs)


@pytest.mark.parametrize("mode", ["full", "last_layer", "kronecker"])
def test_a_loss_is_traced_once_and_a_new_partial_is_traced_again(mlp, data, mode, per_example_jax_grad):
    """Like jax.jit: a repeated export with the same loss object reuses its compilation (one trace of the
    per-example loss in all, and the setting it read then), a functools.partial with another setting is a
    new function: traced again, rows of the scaled loss (vs the float64 reference and a jax.grad loop)."""
    x, y = data
    config = {"scale": 1.0}
    per_example_traces = []

    def loss(params, inputs, targets, scale=None):
        if inputs.shape[0] == 1:
            per_example_traces.append(scale)
        return (config["scale"] if scale is None else scale) * mlp.loss_fn(params, inputs, targets)

    kwargs = {"progress": False, "batch_size": 32}
    if mode == "last_layer":
        kwargs.update(mode="last_layer", layers=["l2"], layer_input=mlp.hidden)
    if mode == "kronecker":
        kwargs.update(projection=tracin.Projection(16, seed=1, per_layer=True, kronecker=True))
    first = export_gradients(loss, [(mlp.params[0], 1.0)], (x, y), **kwargs)
    # full: one trace; last_layer: the factors and, in the same compiled call, the kernel gradient of the
    # rows the layer_input check probes; kronecker: + the weight-mapping jaxpr (traced by every export, not compiled)
    assert len(per_example_traces) == {"full": 1, "last_layer": 2, "kronecker": 2}[mode], per_example_traces
    first_count = len(per_example_traces) - (mode == "kronecker")
    config["scale"] = 3.0
    again = export_gradients(loss, [(mlp.params[0], 1.0)], (x, y), **kwargs)
    for a, b in zip(_blocks(first), _blocks(again), strict=True):
        np.testing.assert_array_equal(b, a)  # documented: the same function object, the same compilation
    count = len(per_example_traces)
    assert count == first_count + (mode == "kronecker") * 2, "the second export compiled the loss again"
    tripled = export_gradients(functools.partial(loss, scale=3.0), [(mlp.params[0], 1.0)], (x, y), **kwargs)
    assert per_example_traces[count:] and set(per_example_traces[count:]) == {3.0}
    for a, b in zip(_blocks(first), _blocks(tripled), strict=True):
        np.testing.assert_allclose(b, 3.0 * a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    if mode == "full":
        ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], KERNELS)
        _close(tripled.matrices[0], 3.0 * ref)
        oracle = per_example_jax_grad(lambda p, i, t: 3.0 * mlp.loss_fn(p, i, t), mlp.params[0], x[:8], y[:8])
        np.testing.assert_allclose(tripled.matrices[0][:8], oracle, rtol=1e-5, atol=1e-6)


def test_the_shared_compilation_does_not_keep_the_loss_alive(mlp, data):
    x, y = data

    def make_loss(weights):
        return lambda params, inputs, targets: mlp.loss_fn(params, inputs, targets) + 0.0 * weights.sum()

    loss = make_loss(jnp.ones(1000))
    for kwargs in ({}, {"mode": "last_layer", "layers": ["l2"], "layer_input": mlp.hidden}):
        export_gradients(loss, [(mlp.params[0], 1.0)], (x, y), progress=False, **kwargs)
    alive = weakref.ref(loss)
    before = len(per_example._shared)
    own = sum(any(h.ref() is loss for h in held) for held, _ in per_example._shared)
    assert own == 2  # full rows, last-layer factors (with the layer_input check's kernel rows)
    del loss
    gc.collect()
    assert alive() is None, "the compiled-function cache keeps the loss (and what it closes over) alive"
    assert len(per_example._shared) == before - own, "its entries go with it"


def test_equal_but_distinct_losses_do_not_share_a_compilation(mlp, data):
    """Two bound methods of == objects (a dataclass field left out of ==) are two functions."""
    x, y = data

    @dataclasses.dataclass(frozen=True)
    class Scaled:
        scale: float = dataclasses.field(compare=False)

        def loss(self, params, inputs, targets):
            return self.scale * mlp.loss_fn(params, inputs, targets)

    one, four = Scaled(1.0), Scaled(4.0)
    assert one == four and hash(one) == hash(four)
    rows = [export_gradients(s.loss, [(mlp.params[0], 1.0)], (x, y), progress=False).matrices[0] for s in (one, four)]
    np.testing.assert_allclose(rows[1], 4.0 * rows[0], rtol=1e-5, atol=1e-6 * np.abs(rows[0]).max())


def _blocks(grads) -> list[np.ndarray]:
    if hasattr(grads, "left"):  # factored: the scale is in the left factor only
        return [np.asarray(grads.left[0], np.float64)]
    return [np.asarray(grads.matrices[0], np.float64)]


@pytest.mark.parametrize("mode", ["full", "last_layer", "kronecker"])
def test_examples_whose_loss_is_not_finite_are_named_in_one_warning(mlp, data, per_example_jax_grad, mode):
    """A label outside [0, classes) read with take_along_axis gives a NaN loss and a gradient of exactly 0
    (review126 F3): its row would score as 'no influence'. A RuntimeWarning names those rows of the data,
    once per export (not again at the second checkpoint); the other rows are the per-example gradients."""
    x, y = data
    x, y = x[:12], y[:12].copy()
    y[[3, 9]] = [-100, 3]  # Hugging Face's 'ignore' label, and label == classes
    kwargs = {
        "full": {},
        "last_layer": {"mode": "last_layer", "layers": ["l2"], "layer_input": mlp.hidden},
        "kronecker": {"projection": tracin.Projection(16, seed=0, per_layer=True, kronecker=True)},
    }[mode]
    checkpoints = list(zip(mlp.params, mlp.lrs, strict=True))
    with pytest.warns(RuntimeWarning, match="NaN or infinite loss") as caught:
        g = export_gradients(mlp.loss_fn, checkpoints, (x, y), batch_size=8, progress=False, **kwargs)
    ours = [w for w in caught if "NaN or infinite loss" in str(w.message)]
    assert len(ours) == 1  # one per checkpoint holding such rows (review155 F3: was one per batch), rows named once
    assert "loss for 2 rows (3, 9) of the data at checkpoint 0: " in str(ours[0].message)
    assert ours[0].filename == __file__
    if mode == "full":
        losses = np.asarray(mlp.loss_fn(mlp.params[0], x, y))
        assert np.isnan(losses[[3, 9]]).all()
        rows = np.asarray(g.matrices[0], np.float64)
        expected = per_example_jax_grad(mlp.loss_fn, mlp.params[0], x, y)
        assert not rows[[3, 9]].any()  # the zero rows the warning is about
        np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)


def test_a_last_row_whose_loss_is_not_finite_is_named_without_its_padding_copies(mlp, data):
    # 12 rows in batches of 8: the second batch is padded with copies of row 11, whose loss is NaN
    x, y = data
    x, y = x[:12], y[:12].copy()
    y[11] = -100
    checkpoints = list(zip(mlp.params, mlp.lrs, strict=True))
    with pytest.warns(RuntimeWarning, match="NaN or infinite loss") as caught:
        export_gradients(mlp.loss_fn, checkpoints, (x, y), batch_size=8, progress=False)
    ours = [str(w.message) for w in caught if "NaN or infinite loss" in str(w.message)]
    assert len(ours) == 1 and "loss for row 11 of the data at checkpoint 0: " in ours[0]


def _nnx_orbax_forms() -> dict[str, Any]:
    """Params of the forms that must not be taken for an NNX State restored without its target, by name."""
    nnx, eqx = pytest.importorskip("flax.nnx"), pytest.importorskip("equinox")
    w, b = jnp.full((3, 2), 0.5), jnp.full((2,), 0.25)
    return {
        "nnx.State": nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0))),
        "nnx.Module": nnx.Linear(3, 2, rngs=nnx.Rngs(0)),
        "linen variables": {"params": {"Dense_0": {"kernel": w, "bias": b}}},
        "equinox": eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0)),
        "part under 'value'": {"a": {"value": w}, "b": b},
    }


def _leaves_loss(params: Any, x: Any, _targets: Any) -> Any:
    """A per-example loss of any params pytree: every floating leaf's sum, times each example's own inputs."""
    total = sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating))
    return jnp.tanh(total * x[:, 0])


def test_in_memory_params_with_every_leaf_at_value_warn_as_a_saved_nnx_state_and_nothing_else_does():
    """review315 F3: an NNX State restored by orbax without a target (dicts, every leaf at 'value') warned only when
    given as a path; in memory now too, naming checkpoints[0]. NNX States and Modules, linen variables, Equinox and
    pytrees with some leaves elsewhere export without any warning."""
    x, y = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2), np.zeros(4, np.float32)
    dicts = {"a": {"value": jnp.full((3, 2), 0.5)}, "b": {"value": jnp.full((2,), 0.25)}}
    with pytest.warns(UserWarning, match=r"^checkpoints\[0\] \(params\) looks like a Flax NNX State saved to a file"):
        export_gradients(_leaves_loss, [(dicts, 1.0)], (x, y), progress=False)
    for name, params in _nnx_orbax_forms().items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = export_gradients(_leaves_loss, [(params, 1.0)], (x, y), progress=False)
        assert got.matrices[0].shape == (4, 8), name


def test_an_interrupted_pass_warns_of_the_non_finite_losses_it_stored(mlp, data, tmp_path):
    """The warning came at the end of a pass only: rows stored before an interruption were never named, as
    the resume does not compute them again (fr335)."""
    x, y = data
    y = y[:24].copy()
    y[3] = -100  # a NaN loss, a zero row, in the first batch
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    checkpoints = list(zip(mlp.params, mlp.lrs, strict=True))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Killed):
        warnings.simplefilter("always")  # pass 1 fingerprints the data; dies in checkpoint 0's after 2 batches
        export_gradients(mlp.loss_fn, checkpoints, FailingBatches(batches, on=2, after=2), store=tmp_path / "s")
    ours = [str(w.message) for w in caught if "NaN or infinite loss" in str(w.message)]
    assert ["loss for row 3 of the data at checkpoint 0: " in m for m in ours] == [True]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(mlp.loss_fn, checkpoints, batches, store=tmp_path / "s", progress=False)
    ours = [str(w.message) for w in caught if "NaN or infinite loss" in str(w.message)]
    assert ["for row 3 of the data at checkpoint 1: " in m for m in ours] == [True]  # checkpoint 0's not again
