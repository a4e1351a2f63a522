"""The compiled per-example functions' guards: reduced losses and wrong layer inputs are refused."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin.jax import export_gradients


@pytest.mark.parametrize(
    "reduce, message",
    [
        (jnp.mean, r"per-example losses of shape \(64,\) for a batch of 64, got \(\) \(a mean or sum"),
        (lambda losses: losses[:, None], r"shape \(64,\) for a batch of 64, got \(64, 1\)"),
        (lambda losses: (losses > 1).astype(jnp.int32), "floating-point losses, got dtype int32"),
        (  # jax.value_and_grad(..., has_aux=True)'s convention (review255 F4)
            lambda losses: (losses, {"mean": losses.mean()}),
            r"got a tuple of 2 \(a \(losses, aux\) pair, as for has_aux=True\?\); tracin takes no aux output: "
            "return the per-example losses alone",
        ),
    ],
)
def test_reduced_or_misshaped_losses_are_refused(mlp, data, reduce, message):
    x, y = data
    with pytest.raises(ValueError, match=message):
        export_gradients(lambda p, a, b: reduce(mlp.loss_fn(p, a, b)), [(mlp.params[0], 1.0)], (x, y), progress=False)


def test_a_failing_loss_is_reported_with_its_argument(mlp, data):
    x, y = data
    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed on a batch of 64: .*missing"):
        export_gradients(
            lambda p, a, b: mlp.loss_fn(p["missing"], a, b), [(mlp.params[0], 1.0)], (x, y), progress=False
        )


@pytest.mark.parametrize(
    "lookup, error",
    [
        (lambda p: p["L1"], "KeyError: 'L1'"),
        (lambda p: p.kernel, "AttributeError: 'dict' object has no attribute 'kernel'"),
        (lambda p: list(p.values())[2], r"IndexError: list index out of range"),
        (lambda p: list(p)[0]["l1"], "TypeError: string indices must be integers"),
        (lambda p: p["l1"]["kernel"]["w"], "TypeError: JAX does not support string indexing"),
    ],
    ids=["KeyError", "AttributeError", "IndexError", "TypeError", "array"],
)
def test_a_failed_lookup_names_the_error_type_and_the_params_top_level_paths(mlp, data, lookup, error):
    """review143 F3: a checkpoint of another model version ('W' where the loss reads p["w"]) failed with
    "...: 'w'", the KeyError's type lost and the params' paths unnamed."""
    x, y = data
    with pytest.raises(ValueError) as caught:
        export_gradients(
            lambda p, a, b: lookup(p) + mlp.loss_fn(p, a, b), [(mlp.params[0], 1.0)], (x, y), progress=False
        )
    message = str(caught.value)
    assert re.search(r"failed on a batch of 64: " + error, message), message
    assert message.endswith(
        "; the params' top-level paths are 'l1', 'l2' (a checkpoint of another model version than the loss reads?)"
    )


def test_other_errors_of_the_loss_name_their_type_without_the_paths(mlp, data):
    x, y = data
    with pytest.raises(ValueError, match=r"failed on a batch of 64: TypeError: .*dot_general") as caught:
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], (x[:, :4], y), progress=False)
    assert "top-level paths" not in str(caught.value)


def test_errors_on_a_padded_batch_count_the_rows_given(mlp, data):
    """A batch of 4 rows padded to batch_size 64 (an iterable's batch is padded to batch_size): the errors
    say 4 rows were padded; 4 rows of arrays run at 4 (64 never ran) and say nothing of padding."""
    x, y = data
    params = mlp.params[0]

    def mean(p, a, b):
        return mlp.loss_fn(p, a, b).mean()

    with pytest.raises(ValueError, match=r"shape \(64,\) for a batch of 64 \(4 rows padded to 64\), got \(\)"):
        export_gradients(mean, [(params, 1.0)], [(x[:4], y[:4])], batch_size=64, progress=False)
    with pytest.raises(ValueError, match=r"failed on a batch of 64 \(4 rows padded to 64\): .*missing"):
        export_gradients(lambda p, a, b: p["missing"], [(params, 1.0)], [(x[:4], y[:4])], batch_size=64, progress=False)
    with pytest.raises(ValueError, match=r"shape \(4,\) for a batch of 4, got \(\)"):
        export_gradients(mean, [(params, 1.0)], (x[:4], y[:4]), progress=False)


@pytest.mark.parametrize(
    "layer_input, message",
    [
        (lambda p, x: x, r"must return the \(batch, 8\) input of l2/kernel, got shape \(64, 5\)"),
        (lambda p, x: jnp.maximum(x @ p["l1"]["kernel"], 0), "does not return the input of l2/kernel"),
        (lambda p, x: p["nope"], r"layer_input\(params, inputs\) failed"),
        # review63 F1: an integer or bool input was a bare NumPy "data type ... not inexact" from finfo
        (
            lambda p, x: jnp.full((x.shape[0], 8), 3, jnp.int32),
            r"layer_input\(params, inputs\) must return floating-point values, the input of l2/kernel, got int32",
        ),
        (lambda p, x: jnp.ones((x.shape[0], 8)) > 0, r"must return floating-point values, .*got bool"),
    ],
)
def test_wrong_layer_inputs_are_refused(mlp, data, layer_input, message):
    x, y = data
    with pytest.raises(ValueError, match=message):
        export_gradients(
            mlp.loss_fn,
            [(mlp.params[0], 1.0)],
            (x, y),
            mode="last_layer",
            layers=["l2"],
            layer_input=layer_input,
            progress=False,
        )


@pytest.mark.parametrize("layers", [["l1", "l2"], ["l1/kernel", "l2/kernel"], ["l2/bias"]])
def test_last_layer_needs_one_kernel_and_at_most_one_bias(mlp, data, layers):
    x, y = data
    with pytest.raises(ValueError, match="must name one dense layer"):
        export_gradients(
            mlp.loss_fn,
            [(mlp.params[0], 1.0)],
            (x, y),
            mode="last_layer",
            layers=layers,
            layer_input=mlp.hidden,
            progress=False,
        )


def _bias_free_head(mlp):
    params = {"l1": mlp.params[0]["l1"], "l2": {"kernel": mlp.params[0]["l2"]["kernel"]}}
    return params, lambda p, x, y: mlp.cross_entropy(mlp.hidden(p, x) @ p["l2"]["kernel"], y)


def _penalised(mlp):
    return lambda p, x, y: (
        mlp.cross_entropy(mlp.hidden(p, x) @ p["l2"]["kernel"], y) + 1e-3 * jnp.sum(p["l2"]["kernel"] ** 2)
    )


def _twice(mlp):
    def loss(p, x, y):  # the head applied twice (a second product), as with tied weights
        h = mlp.hidden(p, x)
        return mlp.cross_entropy(h @ p["l2"]["kernel"] + jnp.tanh(h @ p["l2"]["kernel"]), y)

    return loss


def _in_scan(mlp):
    def loss(p, x, y):
        def step(h, _):
            return h, h @ p["l2"]["kernel"]

        _, out = jax.lax.scan(step, mlp.hidden(p, x), None, length=1)
        return mlp.cross_entropy(out[0], y)

    return loss


def _per_token(mlp):
    def loss(p, x, y):  # the head applied to two "tokens" per example: not one output row
        h = jnp.stack([mlp.hidden(p, x), mlp.hidden(p, -x)], axis=1)
        return mlp.cross_entropy((h @ p["l2"]["kernel"]).sum(1), y)

    return loss


def _looked_up(mlp):
    return lambda p, x, y: mlp.cross_entropy(mlp.hidden(p, x)[:, :3] + p["l2"]["kernel"][y], y)


@pytest.mark.parametrize(
    "make_loss, message",
    [
        (_twice, r"l2/kernel \[8, 3\] is named without a bias, .* but it is used 2 times: use mode='full'"),
        (_penalised, r"but it is used by integer_pow: use mode='full' with layers=\['l2/kernel'\]"),
        (_in_scan, r"one dot_general that uses it .* but it is used inside scan: use mode='full' with "),
        (_per_token, r"l2/kernel \[8, 3\] gives 2 output rows of 3 per example .* not one"),
        (_looked_up, r"but it is looked up by ids \(an embedding\)"),
    ],
)
def test_a_bias_free_last_layer_needs_its_kernel_in_one_dot_general(mlp, data, make_loss, message):
    """Without a bias, dL/d(output) is read at the kernel's one dot_general (exact): a kernel used twice,
    also in a penalty, inside scan, over several output rows per example or looked up is refused, saying why."""
    x, y = data
    params, _ = _bias_free_head(mlp)
    with pytest.raises(ValueError, match=message):
        export_gradients(
            make_loss(mlp),
            [(params, 1.0)],
            (x, y),
            mode="last_layer",
            layers=["l2"],
            layer_input=mlp.hidden,
            progress=False,
        )


@pytest.mark.parametrize(
    "layer_input, message",
    [
        (
            lambda p, x: x[:, :3] @ jnp.ones((3, 8)),
            r"input of l2/kernel at checkpoint 0, row 0 of the data \(every row is checked.*: layer_input differs "
            "from the input its dot_general gets by",
        ),
        (lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]), "does not return the input of l2/kernel"),  # no b1
        (lambda p, x: x, r"must return the \(batch, 8\) input of l2/kernel, got shape \(64, 5\)"),
    ],
)
def test_wrong_layer_inputs_of_a_bias_free_last_layer_are_refused(mlp, data, layer_input, message):
    x, y = data
    params, loss = _bias_free_head(mlp)
    with pytest.raises(ValueError, match=message):
        export_gradients(
            loss, [(params, 1.0)], (x, y), mode="last_layer", layers=["l2"], layer_input=layer_input, progress=False
        )


def _head_model(dtype):
    r = np.random.default_rng(5)
    x, y = r.normal(size=(16, 8)).astype(np.float32), r.integers(0, 5, 16)
    params = {
        "l1": {"kernel": jnp.asarray(r.normal(size=(8, 32)), dtype)},
        "head": {"kernel": jnp.asarray(r.normal(size=(32, 5)) * 0.3, dtype), "bias": jnp.zeros(5, dtype)},
    }

    def features(p, inputs):
        return jnp.tanh(inputs.astype(p["l1"]["kernel"].dtype) @ p["l1"]["kernel"])

    def loss(p, inputs, targets, decay=0.0):
        logits = features(p, inputs) @ p["head"]["kernel"] + p["head"]["bias"]
        penalty = decay * jnp.sum(p["head"]["kernel"].astype(jnp.float32) ** 2)
        return -jax.nn.log_softmax(logits.astype(jnp.float32))[jnp.arange(targets.shape[0]), targets] + penalty

    return x, y, params, features, loss


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_last_layer_of_low_precision_params_is_checked_to_their_precision(dtype):
    """The layer_input check allows the rounding of the params' dtype (it refused every bfloat16 /
    float16 model at 1e-4), and still refuses a wrong input."""
    x, y, params, features, loss = _head_model(dtype)
    got = export_gradients(
        loss, [(params, 1.0)], (x, y), mode="last_layer", layers=["head"], layer_input=features, progress=False
    )
    left, right = np.asarray(got.left[0], np.float64), np.asarray(got.right[0], np.float64)
    w1, k = (np.asarray(params[n]["kernel"], np.float64) for n in ("l1", "head"))
    h = np.tanh(np.asarray(jnp.asarray(x, dtype), np.float64) @ w1)  # float64 reference
    z = h @ k
    p = np.exp(z - z.max(1, keepdims=True))
    delta = p / p.sum(1, keepdims=True) - np.eye(5)[y]
    np.testing.assert_allclose(left, delta, atol=2e-2)
    np.testing.assert_allclose(right[:, :-1], h, atol=2e-2)
    with pytest.raises(ValueError, match="does not return the input of head/kernel"):
        export_gradients(
            loss,
            [(params, 1.0)],
            (x, y),
            mode="last_layer",
            layers=["head"],
            layer_input=lambda p, i: jnp.maximum(i.astype(dtype) @ p["l1"]["kernel"], 0),
            progress=False,
        )


def test_last_layer_of_float32_params_computed_in_bfloat16_is_checked_to_that_precision():
    """The standard Flax mixed precision (float32 params, nn.Dense(dtype=bfloat16)): the check took its
    tolerance from the params' dtype alone and refused a correct layer_input."""
    x, y, params, _, _ = _head_model(jnp.float32)
    bf16 = lambda a: a.astype(jnp.bfloat16)  # noqa: E731

    def features(p, inputs):
        return jnp.tanh(bf16(inputs) @ bf16(p["l1"]["kernel"]))

    def loss(p, inputs, targets):
        logits = features(p, inputs) @ bf16(p["head"]["kernel"]) + bf16(p["head"]["bias"])
        return -jax.nn.log_softmax(logits.astype(jnp.float32))[jnp.arange(targets.shape[0]), targets]

    kw = dict(mode="last_layer", layers=["head"], progress=False)
    got = export_gradients(loss, [(params, 1.0)], (x, y), layer_input=features, **kw)
    h = np.tanh(np.asarray(x, np.float64) @ np.asarray(params["l1"]["kernel"], np.float64))
    np.testing.assert_allclose(np.asarray(got.right[0], np.float64)[:, :-1], h, atol=2e-2)
    with pytest.raises(ValueError, match="does not return the input of head/kernel"):
        wrong = lambda p, i: jnp.maximum(bf16(i) @ bf16(p["l1"]["kernel"]), 0)  # noqa: E731
        export_gradients(loss, [(params, 1.0)], (x, y), layer_input=wrong, **kw)


def test_compute_eps_is_that_of_the_coarsest_dtype_computed_in(monkeypatch):
    from tracin.jax.per_example import compute_eps

    def eps(fn):
        return compute_eps(jax.make_jaxpr(fn)(jnp.ones((4, 3)), jnp.ones((3, 2))))

    assert eps(lambda a, b: a @ b) == np.finfo(np.float32).eps
    mixed = jax.jit(lambda a, b: (a.astype(jnp.bfloat16) @ b.astype(jnp.bfloat16)).astype(jnp.float32))
    assert eps(mixed) == 2.0**-7  # inside a jit: the nested jaxpr counts
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert eps(lambda a, b: a @ b) == 2.0**-10  # float32 products run as TF32
    assert eps(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)) == np.finfo(np.float32).eps


def test_compute_eps_skips_inputs_and_exact_casts():
    """Float16 inputs cast to float32 and an unused bfloat16 leaf compute nothing in 16 bits (review11
    eps.py: 9.8e-4 and 7.8e-3 before); a cast down to float8 does round."""
    from tracin.jax.per_example import compute_eps

    f32 = float(np.finfo(np.float32).eps)
    x16 = jnp.ones((4, 8), jnp.float16)
    assert compute_eps(jax.make_jaxpr(lambda w, x: x.astype(jnp.float32) @ w)(jnp.ones(8), x16)) == f32
    params = {"w": jnp.ones(8), "ema": jnp.ones(3, jnp.bfloat16)}
    assert compute_eps(jax.make_jaxpr(lambda p, x: x @ p["w"])(params, jnp.ones((4, 8)))) == f32
    fp8 = jax.make_jaxpr(lambda w, x: (x @ w).astype(jnp.float8_e4m3fn).astype(jnp.float32))
    assert compute_eps(fp8(jnp.ones(8), jnp.ones((4, 8)))) == 0.125


@pytest.mark.parametrize("case", ["f16inputs", "unusedbf16", "fp8"])
def test_a_slightly_coupled_loss_is_refused_whatever_dtypes_it_touches(mlp, data, case, monkeypatch):
    """loss_i - 2% of the batch mean (or shifted by the batch's size): accepted before (rtol 7.8e-3 /
    0.0625 / 1.0 from the float16 inputs, an unused bfloat16 leaf, a float8 value). On a CPU the
    tolerance stays 1e-4; on a GPU it is capped at bfloat16's 8 eps, so float8 does not switch the
    check off."""
    x, y = data
    params = mlp.params[0]
    if case == "f16inputs":
        x = np.asarray(x, np.float16)
    if case == "unusedbf16":
        params = {**params, "ema": jnp.ones(3, jnp.bfloat16)}
    if case == "fp8":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def coupled(p, inputs, targets):
        ce = mlp.loss_fn({k: p[k] for k in mlp.params[0]}, inputs.astype(jnp.float32), targets)
        if case == "fp8":  # a loss shifted by 1/4 per row of its batch: 0.5 apart, about 20% of it
            return ce + 0 * ce.astype(jnp.float8_e4m3fn).astype(jnp.float32) + 0.25 * inputs.shape[0]
        return ce - 0.02 * ce.mean()

    with pytest.raises(ValueError, match="loss_fn couples the examples of a batch"):
        export_gradients(coupled, [(params, 1.0)], (x, y), progress=False)


def test_an_uncoupled_loss_rounding_differently_in_smaller_batches_is_accepted(mlp, data, monkeypatch):
    """On a GPU, batches of 4 and 2 rows may run other kernels (TF32): losses differing by 6e-4
    relative are not coupling; a batch mean still is (test above). A CPU rounds both alike (1e-4)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, y = data

    def rounded(params, inputs, targets):
        loss = mlp.loss_fn(params, inputs, targets)
        return loss * (1 + 6e-4 * (inputs.shape[0] == 2))

    got = export_gradients(rounded, [(mlp.params[0], 1.0)], (x[:8], y[:8]), batch_size=4, progress=False)
    assert got.matrices[0].shape[0] == 8


def test_a_penalty_on_the_last_layer_is_named_as_a_cause():
    x, y, params, features, loss = _head_model(jnp.float32)
    with pytest.raises(
        ValueError, match=r"or the loss uses head/kernel or head/bias outside y = x K \+ b \(weight decay"
    ):
        export_gradients(
            functools.partial(loss, decay=0.1),
            [(params, 1.0)],
            (x, y),
            mode="last_layer",
            layers=["head"],
            layer_input=features,
            progress=False,
        )


def test_a_loss_coupling_the_examples_of_a_batch_is_refused(mlp, data):
    """Centring by the batch mean made every row 0 (each example is differentiated alone); a loss
    reading only its own example still passes."""
    x, y = data

    def centred(params, inputs, targets):
        h = inputs @ params["l1"]["kernel"]
        return mlp.loss_fn(params, inputs - inputs.mean(0), targets) + 0 * h.sum(1)

    with pytest.raises(ValueError, match=r"loss_fn couples the examples of a batch: .* in a batch of 2 and .* of 4"):
        export_gradients(centred, [(mlp.params[0], 1.0)], (x, y), progress=False)
    got = export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], (x[:3], y[:3]), progress=False)
    assert got.matrices[0].shape[0] == 3


def test_a_loss_reduced_over_the_batch_axis_whose_other_axis_equals_the_batch_size_is_named():
    """Token losses (batch, T) averaged over the batch axis give (T,): shape (batch_size,) when T equals
    it, so the traced shape check passes; the eager check on 4 and 2 examples names the shape."""
    rng = np.random.default_rng(0)
    params = {
        "E": rng.standard_normal((10, 4)).astype(np.float32),
        "W": rng.standard_normal((4, 10)).astype(np.float32),
    }
    T = 8
    ids, tgt = rng.integers(0, 10, (20, T)), rng.integers(0, 10, (20, T))

    def token_losses(p, a, b):
        logp = jax.nn.log_softmax(p["E"][a] @ p["W"])
        return -jnp.take_along_axis(logp, b[..., None], -1)[..., 0]  # (batch, T)

    with pytest.raises(
        ValueError, match=r"loss_fn must return per-example losses of shape \(4,\) for a batch of 4, got \(8,\)"
    ):
        export_gradients(lambda p, a, b: token_losses(p, a, b).mean(0), [(params, 1.0)], (ids, tgt), batch_size=T)
    fixed = export_gradients(lambda p, a, b: token_losses(p, a, b).mean(1), [(params, 1.0)], (ids, tgt), batch_size=T)
    assert fixed.matrices[0].shape == (20, 80)


def test_the_per_example_function_compiles_once_per_input_shape_not_per_row_count():
    """export_gradients' batch_size docstring: batches of other row counts are padded (no new trace of
    loss_fn), every new sequence length is one more trace (and XLA compile), a repeated one none."""
    r = np.random.default_rng(0)
    params = {"emb": jnp.asarray(r.normal(size=(10, 4)), jnp.float32), "w": jnp.asarray(r.normal(size=(4, 3)))}

    def traces(shapes):
        calls = []

        def loss(p, ids, y):
            calls.append(ids.shape)
            logits = p["emb"][ids].mean(-2) @ p["w"]
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]

        batches = [(r.integers(0, 10, (n, t)), r.integers(0, 3, n)) for n, t in shapes]
        export_gradients(loss, [(params, 1.0)], batches, progress=False)
        return len(calls)

    one = traces([(4, 5)])
    assert traces([(4, 5), (3, 5), (2, 5)]) == one
    assert traces([(4, 5), (4, 6), (4, 7), (2, 5), (4, 6)]) == one + 2


def _padding_row_model(seed: int = 0):
    """An embedding whose row 0 (padding) is zeroed in the loss with .at[] (JAX only: NumPy arrays have
    no .at), with a float64 NumPy reference of its per-example gradients."""
    r = np.random.default_rng(seed)
    vocab, width, n, t = 7, 4, 6, 5
    params = {"E": r.normal(size=(vocab, width)).astype(np.float32), "w": r.normal(size=width).astype(np.float32)}
    ids = r.integers(0, vocab, (n, t)).astype(np.int32)
    ids[:, 0] = 0
    y = r.normal(size=(n, t)).astype(np.float32)

    def loss(p, ids, y):
        table = p["E"].at[0].set(0.0)
        return ((table[ids] @ p["w"] - y) ** 2).sum(-1)

    table = params["E"].astype(np.float64)
    table[0] = 0.0
    w = params["w"].astype(np.float64)
    rows = []
    for i in range(n):
        g_table, g_w = np.zeros_like(table), np.zeros_like(w)
        for tok, target in zip(ids[i], y[i], strict=True):
            residual = 2 * (table[tok] @ w - target)
            g_w += residual * table[tok]
            if tok != 0:
                g_table[tok] += residual * w
        rows.append(np.concatenate([g_table.ravel(), g_w]))
    return params, (ids, y), loss, np.array(rows)


@pytest.mark.parametrize("form", ["numpy", "msgpack", "jax"])
def test_numpy_params_run_a_jax_only_loss_as_jax_params_do(form, tmp_path):
    """The eager check of uncoupled examples gives loss_fn JAX arrays, as the compiled functions do: a
    NumPy pytree or a Flax msgpack checkpoint (restored as NumPy) with a loss using .at[] exports the
    float64 reference rows (before: AttributeError, NumPy arrays have no .at)."""
    params, data, loss, expected = _padding_row_model()
    if form == "msgpack":
        serialization = pytest.importorskip("flax.serialization")
        source: object = tmp_path / "params.msgpack"
        source.write_bytes(serialization.msgpack_serialize(params))
    elif form == "jax":
        source = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        source = params
    got = export_gradients(loss, [(source, 1.0)], data, progress=False)
    np.testing.assert_allclose(np.asarray(got.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5)


def test_ids_past_the_table_export_alike_from_numpy_and_jax_params():
    """A pad id past the embedding table: JAX's gather clamps it, NumPy indexing raises (IndexError
    before, from the eager check on NumPy params); NumPy params now give the JAX params' rows."""
    params, (ids, y), _, _ = _padding_row_model(1)
    ids = ids.copy()
    ids[:, 1] = params["E"].shape[0] + 2

    def loss(p, ids, y):
        return ((jnp.tanh(p["E"][ids]) @ p["w"] - y) ** 2).sum(-1)

    as_jax = export_gradients(loss, [(jax.tree_util.tree_map(jnp.asarray, params), 1.0)], (ids, y), progress=False)
    as_numpy = export_gradients(loss, [(params, 1.0)], (ids, y), progress=False)
    np.testing.assert_array_equal(np.asarray(as_numpy.matrices[0]), np.asarray(as_jax.matrices[0]))
    assert np.isfinite(np.asarray(as_numpy.matrices[0])).all()


def test_a_loss_failing_in_the_eager_check_is_reported_with_its_argument(mlp, data):
    """A loss that traces on the full batch but raises on a smaller one (the eager check runs it on 4
    and 2 examples) is a ValueError naming loss_fn and the rows, not the loss's own exception."""
    x, y = data

    def picky(p, inputs, targets):
        if inputs.shape[0] < 4:
            raise RuntimeError("needs 4 rows")
        return mlp.loss_fn(p, inputs, targets)

    with pytest.raises(
        ValueError, match=r"loss_fn\(params, inputs, targets\) failed on the first 2 examples .*: needs 4 rows"
    ):
        export_gradients(picky, [(mlp.params[0], 1.0)], (x, y), progress=False)


def _rows_after_4_doubled(mlp):
    """A layer_input right on rows 0-3 and doubled from row 4 on (marked by a sixth input column)."""
    return lambda p, i: mlp.hidden(p, i[:, :5]) * (1 + i[:, 5:])


def _split_head(mlp):
    """The l2 head with a bias, its kernel used in two products (halves): no tap, its gradient still that of
    y = x K + b."""
    return lambda p, x, y: mlp.cross_entropy(
        mlp.hidden(p, x) @ (0.5 * p["l2"]["kernel"]) + mlp.hidden(p, x) @ (0.5 * p["l2"]["kernel"]) + p["l2"]["bias"],
        y,
    )


@pytest.mark.parametrize("head", ["bias", "bias, no tap", "bias-free"])
def test_a_layer_input_wrong_on_later_batches_is_refused_naming_the_row(mlp, data, head):
    """review155 F1: the check ran on 4 rows of the first batch only; a layer_input wrong from row 4 on
    (batch_size=4) was exported, its factors scoring 2.5-4x the full rows. Every row is checked against the
    input tapped at the kernel's product, with a bias or without; a kernel with a bias but no such product,
    on every batch's first and last rows (its per-example gradient)."""
    x, y = data
    x = np.c_[x, np.arange(len(x)) >= 4].astype(np.float32)
    loss = {"bias": mlp.loss_fn, "bias, no tap": _split_head(mlp)}.get(head)
    params, loss = (mlp.params[0], loss) if loss is not None else _bias_free_head(mlp)
    wrapped = lambda p, i, t: loss(p, i[:, :5], t)  # noqa: E731
    kw = dict(mode="last_layer", layers=["l2"], progress=False)
    with pytest.raises(
        ValueError, match=r"^layer_input\(params, inputs\) does not return the input of l2/kernel at "
    ) as e:
        export_gradients(wrapped, [(params, 1.0)], (x, y), layer_input=_rows_after_4_doubled(mlp), batch_size=4, **kw)
    probed = head == "bias, no tap"
    checked = "the first and last rows of every batch are" if probed else "every row is"
    assert f"at checkpoint 0, row 4 of the data ({checked} checked; this batch holds rows 4 to 7)" in str(e.value)
    differs = (
        r"layer_input gives dL/d\(output\) \(x\) layer_input, which differs from the kernel's per-example gradient"
        if probed
        else "layer_input differs from the input its dot_general gets"
    )
    assert re.search(differs + r" by [0-9.]+ of its norm \(allowed: 0.0001\)", str(e.value)), str(e.value)
    # within the first batch too: its last row (63) where rows are probed, else every row (the first wrong one, 4)
    first = 63 if probed else 4
    with pytest.raises(ValueError, match=rf"at checkpoint 0, row {first} of the data .*holds rows 0 to 63\)"):
        export_gradients(wrapped, [(params, 1.0)], (x, y), layer_input=_rows_after_4_doubled(mlp), **kw)
    right = lambda p, i: mlp.hidden(p, i[:, :5])  # noqa: E731
    got = export_gradients(wrapped, [(params, 1.0)], (x, y), layer_input=right, batch_size=4, **kw)
    ref = mlp.reference_grads(mlp.weights[0], x[:, :5], y)  # float64
    h = ref["hidden"]
    np.testing.assert_allclose(
        got.right[0], h if head == "bias-free" else np.c_[h, np.ones(len(h))], rtol=1e-5, atol=1e-6
    )
    if head != "bias-free":
        np.testing.assert_allclose(got.left[0], ref["b2"], rtol=1e-5, atol=1e-6)  # dL/d(logits)


def test_a_bias_outside_y_equals_xk_plus_b_is_refused_at_each_checkpoint(mlp, data):
    """With a bias, layer_input is checked on every row at the kernel's tap, and the bias gradient (the left
    factor) against dL/d(output) read at that tap: a penalty on the bias alone (a right layer_input) is
    refused at checkpoint 1 when only its bias is away from 0."""
    x, y = data
    checkpoints = [(mlp.params[0], 1.0), (mlp.params[1], 1.0)]

    def penalised(p, i, t):
        return mlp.loss_fn(p, i, t) + 10.0 * jnp.sum(p["l2"]["bias"] ** 2)

    zero_bias = jax.tree_util.tree_map(lambda a: a, mlp.params[0])
    zero_bias["l2"]["bias"] = jnp.zeros_like(zero_bias["l2"]["bias"])  # no penalty gradient at checkpoint 0
    kw = dict(mode="last_layer", layers=["l2"], layer_input=mlp.hidden, batch_size=16, progress=False)
    with pytest.raises(
        ValueError,
        match=r"at checkpoint 1, row 0 of the data \(every row is checked; .*: layer_input gives the bias "
        r"gradient as the kernel's dL/d\(output\), which differs",
    ) as e:
        export_gradients(penalised, [(zero_bias, 1.0), checkpoints[1]], (x, y), **kw)
    assert "or the loss uses l2/kernel or l2/bias outside y = x K + b" in str(e.value)
    got = export_gradients(mlp.loss_fn, checkpoints, (x, y), **kw)  # the same loss without the penalty
    for k, w in enumerate(mlp.weights):
        h = mlp.reference_grads(w, x, y)["hidden"]
        np.testing.assert_allclose(got.right[k][:, :-1], h, rtol=1e-5, atol=1e-6)


def test_a_bias_scaled_per_example_is_refused_on_the_first_such_row(mlp, data):
    """y = x K + b * s with s 1 on the first batch and 3 from row 20 on: the bias gradient is not dL/dy
    there, and the factors dL/db (x) [layer_input, 1] are not the kernel's gradient; refused at that row
    (the kernel-gradient check on each checkpoint's first batch alone passed it)."""
    x, y = data
    scale = np.where(np.arange(len(x)) >= 20, 3.0, 1.0).astype(np.float32)

    def scaled(p, i, t):
        h = mlp.hidden(p, i["x"])
        logits = h @ p["l2"]["kernel"] + p["l2"]["bias"] * i["s"][:, None]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], 1)[:, 0]

    kw = dict(mode="last_layer", layers=["l2"], batch_size=16, progress=False)
    with pytest.raises(
        ValueError, match=r"at checkpoint 0, row 20 of the data \(every row is checked; .*bias gradient"
    ):
        export_gradients(
            scaled,
            [(mlp.params[0], 1.0)],
            ({"x": x, "s": scale}, y),
            layer_input=lambda p, i: mlp.hidden(p, i["x"]),
            **kw,
        )


def test_a_layer_input_closing_over_one_checkpoints_params_is_refused_at_the_next(mlp, data):
    """review155 F1: a layer_input reading checkpoint 0's params instead of its argument passed the check
    (checkpoint 0 only) and gave checkpoint 1 the wrong factors. Every checkpoint is checked."""
    x, y = data
    stale = lambda p, i: mlp.hidden(mlp.params[0], i)  # noqa: E731
    checkpoints = list(zip(mlp.params, mlp.lrs, strict=True))
    with pytest.raises(
        ValueError, match=r"input of l2/kernel at checkpoint 1, row 0 of the data .*its params argument"
    ):
        export_gradients(
            mlp.loss_fn, checkpoints, (x, y), mode="last_layer", layers=["l2"], layer_input=stale, progress=False
        )


def test_a_layer_input_ignoring_the_padding_mask_is_refused(mlp):
    """review155 F1: length-sorted data (the first batch unpadded) and a layer_input pooling over every token
    while the loss pools over the unmasked ones: the padded batches got wrong factors without a word."""
    r = np.random.default_rng(0)
    n, t = 12, 6
    tokens = r.normal(size=(n, t, 5)).astype(np.float32)
    lengths = np.r_[[t] * 4, np.sort(r.integers(2, t, n - 4))[::-1]]
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    y = r.integers(0, 3, n)
    params = mlp.params[0]

    def pooled(p, inputs, weights):
        h = jnp.tanh(inputs["x"] @ p["l1"]["kernel"] + p["l1"]["bias"])
        return (h * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)

    def loss(p, inputs, targets):
        return mlp.cross_entropy(pooled(p, inputs, inputs["mask"]) @ p["l2"]["kernel"] + p["l2"]["bias"], targets)

    kw = dict(mode="last_layer", layers=["l2"], batch_size=4, progress=False)
    data = ({"x": tokens, "mask": mask}, y)
    with pytest.raises(ValueError, match=r"at checkpoint 0, row (4|7) of the data .*the same padding mask\)?$"):
        export_gradients(
            loss, [(params, 1.0)], data, layer_input=lambda p, i: pooled(p, i, jnp.ones_like(i["mask"])), **kw
        )
    got = export_gradients(loss, [(params, 1.0)], data, layer_input=lambda p, i: pooled(p, i, i["mask"]), **kw)
    w1, b1 = (np.asarray(params["l1"][k], np.float64) for k in ("kernel", "bias"))
    h = np.tanh(tokens.astype(np.float64) @ w1 + b1)
    expected = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # float64 masked mean
    np.testing.assert_allclose(got.right[0][:, :-1], expected, rtol=1e-5, atol=1e-6)


def test_a_float16_head_with_a_bias_on_confident_examples_is_not_refused():
    """A float16 model predicting rows 0 and 1 with near certainty: their dL/d(output) is below float16's
    smallest normal, where the kernel's gradient is rounded to multiples of its smallest subnormal, not to a
    fraction of itself; the layer_input check must allow that rounding (it refused a correct layer_input,
    by 4.5% of the gradient's norm). The factors' outer products equal float64 NumPy's kernel gradient."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    p = {
        "w1": jnp.asarray(rng.standard_normal((5, 8)), jnp.float16),
        "k": jnp.asarray(12 * rng.standard_normal((8, 3)), jnp.float16),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float16),
    }
    feats = lambda p, x: jnp.tanh(x.astype(jnp.float16) @ p["w1"])  # noqa: E731
    logits = lambda p, x: feats(p, x) @ p["k"] + p["b"]  # noqa: E731

    def loss_fn(p, x, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits(p, x).astype(jnp.float32)), y[:, None], 1)[:, 0]

    y = np.asarray(jnp.argmax(logits(p, x), axis=1))
    y = np.where(np.arange(8) >= 2, (y + 1) % 3, y)  # rows 0 and 1 (the probed first row) predicted right
    assert float(loss_fn(p, x, y)[0]) < 1e-6  # dL/dy of row 0 is float16-subnormal
    g = export_gradients(loss_fn, [(p, 1.0)], (x, y), mode="last_layer", layers=["k", "b"], layer_input=feats)
    left, right = np.asarray(g.left[0], np.float64), np.asarray(g.right[0], np.float64)
    f = np.asarray(feats(p, x), np.float64)
    lg = np.asarray(logits(p, x), np.float64)
    soft = np.exp(lg - lg.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    dy = soft - np.eye(3)[y]
    np.testing.assert_allclose(right[:, :-1], f, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(left[2:], dy[2:], rtol=2e-2, atol=2e-3)  # rows not subnormal: to float16 rounding


@pytest.mark.parametrize("in_scan", [False, True])
def test_a_float16_product_with_a_float32_bias_on_confident_examples_is_not_refused(in_scan):
    """A float32 head whose product runs in float16 and whose float32 bias is added after it (y = (x16 @ K16) + b):
    on confidently fit rows dL/dy is float16-subnormal at the product but not in the bias gradient, and the
    kernel's gradient is rounded to float16's subnormal steps; a correct layer_input must not be refused
    (it was: the bias check by 1.1%, the kernel-gradient probe by 2.4%). Outer products match float64 NumPy's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 5)).astype(np.float32)
    p = {
        "w1": rng.standard_normal((5, 6)).astype(np.float32),
        "k": 8 * rng.standard_normal((6, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
    }
    feats = lambda p, x: jnp.tanh(x @ p["w1"])  # noqa: E731

    def head(p, x):
        return (feats(p, x).astype(jnp.float16) @ p["k"].astype(jnp.float16)).astype(jnp.float32) + p["b"]

    def logits(p, x):
        if not in_scan:
            return head(p, x)
        return jax.lax.scan(lambda c, _: (head(p, x), None), jnp.zeros((x.shape[0], 4)), None, length=1)[0]

    def loss_fn(p, x, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits(p, x)), y[:, None], 1)[:, 0]

    y = np.asarray(jnp.argmax(logits(p, x), axis=1))  # every row fit, many with a loss below 1e-6
    assert (np.asarray(loss_fn(p, x, y)) < 1e-6).sum() >= 5
    g = export_gradients(
        loss_fn, [(p, 1.0)], (x, y), mode="last_layer", layers=["k", "b"], layer_input=feats, batch_size=8
    )
    f = np.tanh(x.astype(np.float64) @ p["w1"])
    np.testing.assert_allclose(np.asarray(g.right[0], np.float64)[:, :-1], f, rtol=1e-5, atol=1e-6)
    half = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    lg = half(half(f) @ half(p["k"])) + p["b"]  # the product rounded to float16, as the loss computes it
    soft = np.exp(lg - lg.max(1, keepdims=True))
    dy = soft / soft.sum(1, keepdims=True) - np.eye(4)[y]
    np.testing.assert_allclose(np.asarray(g.left[0], np.float64), dy, rtol=0, atol=1e-3)


@pytest.mark.parametrize("head", ["bias", "bias-free"])
def test_a_layer_input_wrong_on_the_last_row_of_a_padded_batch_alone_is_refused(mlp, data, head):
    """r304: layer_input doubled on row 11 alone, the last real row of the second batch (12 rows in batches of
    8, padded with copies of it): every real row is checked at the kernel's tap, the last one included."""
    x, y = data
    x, y = np.c_[x[:12], np.arange(12) == 11].astype(np.float32), y[:12]
    params, loss = (mlp.params[0], mlp.loss_fn) if head == "bias" else _bias_free_head(mlp)
    wrapped = lambda p, i, t: loss(p, i[:, :5], t)  # noqa: E731
    kw = dict(mode="last_layer", layers=["l2"], batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"at checkpoint 0, row 11 of the data \(every row is checked; this batch "):
        export_gradients(wrapped, [(params, 1.0)], (x, y), layer_input=_rows_after_4_doubled(mlp), **kw)


def test_a_coupled_loss_is_refused_on_data_of_two_rows(mlp, data):
    """r304: two rows (the fewest the check can compare: a batch of 2 against a batch of 1) are checked too."""
    x, y = data

    def centred(params, inputs, targets):
        return mlp.loss_fn(params, inputs - inputs.mean(0), targets)

    with pytest.raises(ValueError, match=r"loss_fn couples the examples of a batch: .* in a batch of 1 and .* of 2"):
        export_gradients(centred, [(mlp.params[0], 1.0)], (x[:2], y[:2]), progress=False)


def test_a_watch_of_more_non_finite_losses_than_it_lists_counts_the_rest():
    """r304: 13 NaN / inf losses over two batches (the second padded): the first 10 rows listed, "and 3 more",
    the padding's copies of a NaN row not counted; rows seen again (the next checkpoint) are not counted again."""
    import warnings

    from tracin.jax.batches import Batch
    from tracin.jax.per_example import LossWatch

    watch = LossWatch()
    watch(np.r_[np.full(7, np.nan), 1.0], Batch(0, 8, None, None))
    watch(np.r_[np.full(5, np.inf), 2.0, np.nan, np.nan], Batch(8, 7, None, None))  # row 14; the last is padding
    with pytest.warns(RuntimeWarning, match=r"for 13 rows \(0, 1, 2, 3, 4, 5, 6, 8, 9, 10 and 3 more\) of the data "):
        watch.flush()
    watch(np.r_[np.full(7, np.nan), 1.0], Batch(0, 8, None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.flush()
