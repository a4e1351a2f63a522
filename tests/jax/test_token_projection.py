"""tracin.jax per-token Kronecker projections (Projection(..., per_layer=True, kronecker=True)) against float64
references: per-example gradients by jax.grad on one example at a time (its padding cut off), projected by
(P_rows kron P_cols) vec(G) for mapped weights and P g for the other leaves; against Projection.apply on the
full exported rows; and against tracin.torch on the same bias-free layers."""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import subprocess
import sys
import warnings

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracin
from interrupts import ctrl_c_on_call
from store_files import assert_same_store_files
from tracin.jax import export, export_gradients, token_projection
from tracin.jax.batches import Batch
from tracin.jax.jaxpr_taps import find_sites
from tracin.jax.params import layout_of
from tracin.jax.per_example import FullRows
from tracin.jax.token_projection import rows_function
from tracin.projection import LayerMatrix

D, H, A, C = 6, 10, 4, 5  # token features, hidden width, attention width, classes
LRS = (0.5, 0.1)
VOCAB, TYPES = 13, 3


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _normal(r: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(r.normal(0, 0.5, shape))


def _token_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """(batch,) summed cross-entropy of the tokens where mask is 1."""
    lp = jax.nn.log_softmax(logits)
    return -(jnp.take_along_axis(lp, labels[..., None], -1)[..., 0] * mask).sum(-1)


def _tokens(r: np.random.Generator, n: int, t: int, dtype=np.float64):
    """Inputs {"x" (n, t, D), "mask" (n, t)} with right padding (lengths 2..t), labels (n, t), lengths."""
    lengths = r.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(dtype)
    x = r.normal(size=(n, t, D)).astype(dtype) * mask[..., None]
    return {"x": x, "mask": mask}, r.integers(0, C, (n, t)), lengths.tolist()


# --- models: plain jnp over a params dict ---


def mlp_params(r):
    """embed (D, H) Flax-layout, hidden kernel (H, H) + bias inside a remat'ed jit, head (C, H) torch-layout,
    scale."""
    return {
        "embed": _normal(r, D, H),
        "hidden": {"bias": _normal(r, H), "kernel": _normal(r, H, H)},
        "head": _normal(r, C, H),
        "scale": _normal(r, H),
    }


def mlp_loss(p, inputs, labels):
    h = jnp.tanh(inputs["x"] @ p["embed"])
    hidden = jax.checkpoint(jax.jit(lambda h, w, b: jnp.tanh(h @ w + b)))  # remat around a jit around the use
    h = hidden(h, p["hidden"]["kernel"], p["hidden"]["bias"]) * p["scale"]
    return _token_ce(jnp.einsum("bth,ch->btc", h, p["head"]), labels, inputs["mask"])


def attention_params(r):
    return {
        "q": _normal(r, D, A),
        "k": _normal(r, D, A),
        "v": _normal(r, D, A),
        "o": _normal(r, H, A),
        "cls": _normal(r, H, C),
    }


def attention_loss(p, inputs, labels):
    """One attention head over the unpadded keys, out projection (H, A) used as W @ a, head (H, C)."""
    x, mask = inputs["x"], inputs["mask"]
    q, k, v = (x @ p[n] for n in "qkv")
    s = jnp.einsum("bqa,bka->bqk", q, k) / np.sqrt(A)
    s = jnp.where(mask[:, None, :] > 0, s, -1e30)
    att = jnp.einsum("bqk,bka->bqa", jax.nn.softmax(s, -1), v)
    h = jnp.tanh(jnp.einsum("ha,bqa->bqh", p["o"], att))
    return _token_ce(h @ p["cls"], labels, mask)


MLP_LAYOUT = [  # PARAM_ORDER: dict keys sorted
    LayerMatrix(D, H).to_dict(),  # embed
    LayerMatrix(C, H).to_dict(),  # head, in its own (C, H) orientation
    H,  # hidden/bias
    LayerMatrix(H, H).to_dict(),  # hidden/kernel
    H,  # scale
]
ATTENTION_LAYOUT = [
    LayerMatrix(H, C).to_dict(),
    LayerMatrix(D, A).to_dict(),
    LayerMatrix(H, A).to_dict(),
    LayerMatrix(D, A).to_dict(),
    LayerMatrix(D, A).to_dict(),
]


# --- the reference ---


def example_grads(loss_fn, params, inputs, labels, lengths) -> list[list[np.ndarray]]:
    """Per example the float64 gradients of its loss (padding cut off) w.r.t. every leaf, in PARAM_ORDER."""
    grad = jax.grad(lambda p, i, y: loss_fn(p, i, y)[0])
    out = []
    for i, n in enumerate(lengths):
        one = {key: np.asarray(v[i : i + 1, :n]) for key, v in inputs.items()}
        out.append(
            [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grad(params, one, labels[i : i + 1, :n]))]
        )
    return out


def projected_reference(proj: tracin.Projection, layout: list, grads: list[list[np.ndarray]]) -> np.ndarray:
    """(n, dim) float64: per layout segment (P_rows kron P_cols) vec(G) or P g."""
    dims = proj.segment_dims(len(layout))
    rows = []
    for g in grads:
        parts = []
        for j, (segment, dim) in enumerate(zip(layout, dims, strict=True)):
            if isinstance(segment, dict):
                p_rows, p_cols = (f.astype(np.float64) for f in proj.layer_factors(j, segment, dim))
                used = np.kron(p_rows, p_cols) @ g[j].reshape(-1)
                parts += [used, np.zeros(dim - used.size)]
            else:
                p = proj.project_segment(np.eye(segment, dtype=np.float32), j, segment, dim).T.astype(np.float64)
                parts.append(p @ g[j].reshape(-1))
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def assert_rows_close(got, want, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * np.abs(want).max())


def _export(loss_fn, params, data, proj, **kw):
    return export_gradients(
        loss_fn, list(zip(params, LRS[: len(params)], strict=True)), data, projection=proj, progress=False, **kw
    )


# --- exactness ---


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sparse"])
@pytest.mark.parametrize(
    "model, layout", [("mlp", MLP_LAYOUT), ("attention", ATTENTION_LAYOUT)], ids=["mlp", "attention"]
)
def test_rows_are_the_kronecker_projection_of_float64_per_example_gradients(x64, kind, model, layout):
    """Padding (mask 0, masked keys) adds nothing: the reference is computed on the unpadded examples."""
    r = np.random.default_rng(1)
    make, loss_fn = (mlp_params, mlp_loss) if model == "mlp" else (attention_params, attention_loss)
    params = [make(r), make(r)]
    inputs, labels, lengths = _tokens(r, 9, 7)
    proj = tracin.Projection(5 * 12, 3, kind, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every 2-D leaf is mapped: no fallback warning
        g = _export(loss_fn, params, (inputs, labels), proj, batch_size=4)
    assert g.metadata["projection"]["segments"] == layout
    assert g.metadata["projection"]["kronecker"] is True and list(g.dims) == [proj.dim, proj.dim]
    for c, p in enumerate(params):
        assert_rows_close(
            g.matrices[c], projected_reference(proj, layout, example_grads(loss_fn, p, inputs, labels, lengths))
        )
    full = export_gradients(loss_fn, [(params[0], 0.5)], (inputs, labels), progress=False)
    assert_rows_close(g.matrices[0], proj.apply(full.matrices[0], segments=layout).astype(np.float64))


def test_an_example_with_nan_is_stored_and_named_by_scoring_with_plain_leaves_too(x64):
    """An example whose input holds NaN gets a NaN row, its plain leaves' segments (hidden/bias, scale)
    included, as without a projection and as its mapped blocks: the export does not fail; the other rows
    are exact, and self_influence names the row."""
    r = np.random.default_rng(4)
    params = [mlp_params(r), mlp_params(r)]
    inputs, labels, lengths = _tokens(r, 9, 7)
    inputs["x"][4, 0, 0] = np.nan
    proj = tracin.Projection(5 * 12, 3, per_layer=True, kronecker=True)
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite loss for row 4 of the data at checkpoint 0"):
        g = _export(mlp_loss, params, (inputs, labels), proj, batch_size=4)
    finite = [i for i in range(9) if i != 4]
    for c, p in enumerate(params):
        rows = np.asarray(g.matrices[c])
        assert np.isnan(rows[4]).all()
        want = projected_reference(proj, MLP_LAYOUT, example_grads(mlp_loss, p, inputs, labels, lengths))
        assert_rows_close(rows[finite], want[finite])
    with pytest.raises(ValueError, match=r"contains NaN or Inf values, first in rows \[4\]"):
        tracin.self_influence(g)


def test_padding_tokens_add_nothing(x64):
    r = np.random.default_rng(2)
    params = [attention_params(r), attention_params(r)]
    inputs, labels, _ = _tokens(r, 6, 5)
    padded = {
        "x": np.concatenate([inputs["x"], r.normal(size=(6, 3, D))], 1),
        "mask": np.pad(inputs["mask"], ((0, 0), (0, 3))),
    }
    proj = tracin.Projection(5 * 9, 4, per_layer=True, kronecker=True)
    short = _export(attention_loss, params, (inputs, labels), proj)
    long = _export(attention_loss, params, (padded, np.pad(labels, ((0, 0), (0, 3)))), proj)
    for a, b in zip(short.matrices, long.matrices, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def lookup_params(r):
    """tok (VOCAB, D) rows by token id, pos (D, T) columns by position, typ (TYPES, D) rows by type id, head
    (C, D); ids out of range take no gradient (tok's plain W[ids] too, though its forward clamps them)."""
    return {"head": _normal(r, C, D), "pos": _normal(r, D, 7), "tok": _normal(r, VOCAB, D), "typ": _normal(r, TYPES, D)}


def lookup_loss(p, inputs, labels):
    ids, types = inputs["ids"], inputs["types"]
    positions = jnp.arange(ids.shape[1])
    h = (
        p["tok"][ids]
        + jnp.take(p["pos"], positions, axis=1).T
        + jnp.take(p["typ"], types, 0, mode="fill", fill_value=0)
    )
    return _token_ce(jnp.tanh(h) @ p["head"].T, labels, inputs["mask"])


def test_lookups_of_rows_and_columns_by_ids(x64):
    r = np.random.default_rng(9)
    params = [lookup_params(r), lookup_params(r)]
    inputs, labels, lengths = _tokens(r, 8, 7)
    inputs = {
        "ids": r.integers(0, VOCAB + 1, labels.shape),  # VOCAB (a padding id) out of range, on unmasked tokens
        "types": r.integers(0, TYPES + 2, labels.shape),  # TYPES and TYPES + 1 out of range
        "mask": inputs["mask"],
    }
    proj = tracin.Projection(4 * 16, 10, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _export(lookup_loss, params, (inputs, labels), proj, batch_size=3)
    layout = [LayerMatrix(C, D).to_dict(), LayerMatrix(D, 7).to_dict(), LayerMatrix(VOCAB, D).to_dict()]
    layout.append(LayerMatrix(TYPES, D).to_dict())
    assert g.metadata["projection"]["segments"] == layout
    for c, p in enumerate(params):
        grads = example_grads(lookup_loss, p, inputs, labels, lengths)
        assert_rows_close(g.matrices[c], projected_reference(proj, layout, grads))
    kw = dict(layers=["typ", "head"], progress=False)  # tok and pos then are arrays, not candidates
    with pytest.warns(RuntimeWarning, match="rows of dim 64, not fewer than the gradient's row width 48"):
        chosen = export_gradients(lookup_loss, [(params[0], 1.0)], (inputs, labels), projection=proj, **kw)
    assert chosen.metadata["projection"]["segments"] == [layout[0], layout[3]]
    full = export_gradients(lookup_loss, [(params[0], 1.0)], (inputs, labels), **kw)
    assert_rows_close(chosen.matrices[0], proj.apply(full.matrices[0], segments=[layout[0], layout[3]]).astype(float))


def _flax_model():
    class Tokens(linen.Module):
        @linen.compact
        def __call__(self, x, ids):
            h = jnp.tanh(linen.Dense(H)(x + linen.Embed(VOCAB, D)(ids)))  # Embed: a lookup inside a jit
            return linen.Dense(C)(h)

    return Tokens()


class _FlaxBlock(linen.Module):
    """Masked self-attention (3-D DenseGeneral kernels) + residual, LayerNorm, a Dense MLP."""

    @linen.compact
    def __call__(self, x, mask):
        attended = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(
            x, mask=linen.make_attention_mask(mask, mask)
        )
        h = linen.LayerNorm()(x + attended)
        h = jnp.tanh(linen.Dense(H)(h))
        return linen.Dense(C)(h)


def test_flax_attention_block_maps_its_3d_kernels(x64):
    """query / key / value kernels (D, heads, head_dim) are D x (heads * head_dim) matrices, the out kernel
    (heads, head_dim, D) a (heads * head_dim) x D one; exact against float64 jax.grad on unpadded examples."""
    r = np.random.default_rng(11)
    inputs, labels, lengths = _tokens(r, 7, 6)
    model = _FlaxBlock()
    params = [
        jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64), model.init(jax.random.key(s), inputs["x"], inputs["mask"])
        )
        for s in (0, 1)
    ]

    def loss_fn(p, i, y):
        return _token_ce(model.apply(p, i["x"], i["mask"]), y, i["mask"])

    qkv, heads = LayerMatrix(D, 8).to_dict(), 8
    # Dense_0 (H), Dense_1 (C), LayerNorm_0 bias / scale, attention key, out, query, value: bias and kernel each
    layout = [H, LayerMatrix(D, H).to_dict(), C, LayerMatrix(H, C).to_dict(), D, D, heads, qkv, D]
    layout += [LayerMatrix(heads, D).to_dict(), heads, qkv, heads, qkv]
    proj = tracin.Projection(len(layout) * 16, 12, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _export(loss_fn, params, (inputs, labels), proj, batch_size=4)
    assert g.metadata["projection"]["segments"] == layout
    for c, p in enumerate(params):
        grads = example_grads(loss_fn, p, inputs, labels, lengths)
        assert_rows_close(g.matrices[c], projected_reference(proj, layout, grads))


def _equinox_model(key):
    k1, k2 = jax.random.split(key)
    return [eqx.nn.Linear(D, H, key=k1), eqx.nn.Linear(H, C, use_bias=False, key=k2)]


def _equinox_loss(layers, inputs, labels):
    def one(x):  # x (T, D): each layer applied token by token (W @ x_t under vmap: the weight is the lhs)
        return jax.vmap(layers[1])(jnp.tanh(jax.vmap(layers[0])(x)))

    return _token_ce(jax.vmap(one)(inputs["x"]), labels, inputs["mask"])


@pytest.mark.parametrize("library", ["flax", "equinox"])
def test_flax_and_equinox_models_equal_projection_apply_on_full_rows(library):
    r = np.random.default_rng(3)
    inputs, labels, _ = _tokens(r, 10, 4, np.float32)
    if library == "flax":
        model = _flax_model()
        inputs["ids"] = r.integers(0, VOCAB, inputs["mask"].shape)
        params = [model.init(jax.random.key(s), inputs["x"], inputs["ids"]) for s in (0, 1)]

        def loss_fn(p, i, y):
            return _token_ce(model.apply(p, i["x"], i["ids"]), y, i["mask"])

        # params/Dense_0/{bias, kernel (D, H)}, params/Dense_1/{bias, kernel (H, C)}, params/Embed_0/embedding
        layout = [H, LayerMatrix(D, H).to_dict(), C, LayerMatrix(H, C).to_dict(), LayerMatrix(VOCAB, D).to_dict()]
    else:
        params, loss_fn = [_equinox_model(jax.random.key(s)) for s in (0, 1)], _equinox_loss
        layout = [LayerMatrix(H, D).to_dict(), H, LayerMatrix(C, H).to_dict()]  # weight (out, in), bias
    proj = tracin.Projection(len(layout) * 16, 5, "sparse", per_layer=True, kronecker=True)
    g = _export(loss_fn, params, (inputs, labels), proj, batch_size=3)
    full = export_gradients(loss_fn, [(p, 1.0) for p in params], (inputs, labels), progress=False)
    assert g.metadata["projection"]["segments"] == layout
    for c in range(2):
        want = proj.apply(full.matrices[c], segments=layout).astype(np.float64)
        assert_rows_close(g.matrices[c], want, rtol=2e-4)  # float32 on both sides


def _equinox_lm(key):
    """eqx.nn.Embedding (VOCAB, D), then two Linear layers, float64."""
    k1, k2, k3 = jax.random.split(key, 3)
    layers = [eqx.nn.Embedding(VOCAB, D, key=k1), eqx.nn.Linear(D, H, key=k2), eqx.nn.Linear(H, C, key=k3)]
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, layers)


def _equinox_lm_loss(layers, inputs, labels):
    def one(ids):  # ids (T,): the embedding called on each scalar id under vmap, as Equinox requires
        h = jnp.tanh(jax.vmap(layers[1])(jax.vmap(layers[0])(ids)))
        return jax.vmap(layers[2])(h)

    return _token_ce(jax.vmap(one)(inputs["ids"]), labels, inputs["mask"])


def _column_lookup_loss(p, inputs, labels):
    """A (D, VOCAB) table whose columns are looked up by a scalar id under vmap: not mapped (its ids are the
    indices' second component), so computed in full."""
    h = jax.vmap(jax.vmap(lambda t: p["table"][:, t]))(inputs["ids"])
    return _token_ce(jnp.tanh(h) @ p["head"], labels, inputs["mask"])


@pytest.mark.parametrize("form", ["equinox embedding", "column lookup under vmap"])
def test_a_scalar_lookup_under_vmap_as_in_equinox_embedding_is_mapped(x64, form):
    """eqx.nn.Embedding under vmap is a gather of indices (id, 0) with nothing collapsed: mapped per token,
    out-of-range and negative ids included (Equinox wraps negative ids, CLIP clamps the others), exact
    against float64 jax.grad of each example projected by the same factors. A column looked up the same
    way is not mapped (one warning) and still exact."""
    r = np.random.default_rng(12)
    _, labels, lengths = _tokens(r, 7, 6)
    mask = (np.arange(6)[None] < np.asarray(lengths)[:, None]).astype(np.float64)
    inputs = {"ids": r.integers(-VOCAB - 2, VOCAB + 3, labels.shape), "mask": mask}
    if form == "equinox embedding":
        params, loss_fn = [_equinox_lm(jax.random.key(s)) for s in (0, 1)], _equinox_lm_loss
        layout = [LayerMatrix(VOCAB, D).to_dict(), LayerMatrix(H, D).to_dict(), H, LayerMatrix(C, H).to_dict(), C]
    else:
        params = [{"head": _normal(r, D, C), "table": _normal(r, D, VOCAB)} for _ in range(2)]
        loss_fn, layout = _column_lookup_loss, [LayerMatrix(D, C).to_dict(), D * VOCAB]
        inputs["ids"] = np.clip(inputs["ids"], -VOCAB, VOCAB - 1)  # in range: its gradient needs no clamping
    proj = tracin.Projection(len(layout) * 16, 7, per_layer=True, kronecker=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = _export(loss_fn, params, (inputs, labels), proj, batch_size=3)
    fallback = [str(w.message) for w in caught if "kronecker=True" in str(w.message)]
    if form == "equinox embedding":
        assert fallback == []
    else:
        assert len(fallback) == 1 and "'table': used in a gather that is not a lookup of whole rows" in fallback[0]
    assert g.metadata["projection"]["segments"] == layout
    for c, p in enumerate(params):
        grads = example_grads(loss_fn, p, inputs, labels, lengths)
        assert_rows_close(g.matrices[c], projected_reference(proj, layout, grads))


# --- fallbacks ---


def fallback_params(r):
    return {"head": _normal(r, C, H), "in": _normal(r, D, H), "mix": _normal(r, H, H), "rnn": _normal(r, H, H)}


def fallback_loss(p, inputs, labels):
    """mix used twice, rnn inside a scan over the tokens, in and head mapped."""
    h = jnp.tanh(inputs["x"] @ p["in"])
    h = jnp.tanh(jnp.tanh(h @ p["mix"]) @ p["mix"])

    def step(carry, h_t):
        carry = jnp.tanh(carry @ p["rnn"] + h_t)
        return carry, carry

    _, h = jax.lax.scan(step, jnp.zeros_like(h[:, 0]), jnp.swapaxes(h, 0, 1))
    return _token_ce(jnp.swapaxes(h, 0, 1) @ p["head"].T, labels, inputs["mask"])


def test_weights_used_twice_or_in_a_scan_are_projected_flat_with_one_warning(x64):
    r = np.random.default_rng(4)
    params = [fallback_params(r), fallback_params(r)]
    inputs, labels, lengths = _tokens(r, 7, 5)
    proj = tracin.Projection(4 * 16, 6, per_layer=True, kronecker=True)
    with pytest.warns(UserWarning) as record:
        g = _export(fallback_loss, params, (inputs, labels), proj, batch_size=4)
    messages = [str(w.message) for w in record if "kronecker" in str(w.message)]
    assert len(messages) == 1
    assert "'mix': used 2 times" in messages[0] and "'rnn': used inside scan" in messages[0]
    assert "'in'" not in messages[0] and "'head'" not in messages[0]
    layout = [LayerMatrix(C, H).to_dict(), LayerMatrix(D, H).to_dict(), H * H, H * H]
    assert g.metadata["projection"]["segments"] == layout
    for c, p in enumerate(params):
        want = projected_reference(proj, layout, example_grads(fallback_loss, p, inputs, labels, lengths))
        assert_rows_close(g.matrices[c], want)


def _reshaped_dot(w, x):
    return x @ w.reshape(D, 2, H // 2).reshape(D, H)


def _conv(w, x):  # w (3, D, H): a 1-D convolution kernel (width, in, out) over the tokens
    return jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


_FROZEN = np.random.default_rng(13).normal(0, 0.5, (3, D, H))  # frozen base weights the chosen ones are added to


@pytest.mark.parametrize(
    "use, shape, why",
    [
        (_reshaped_dot, (D, H), "passed through reshape before a dot_general"),
        (lambda w, x: x @ (2.0 * w), (D, H), "used by mul"),
        (_conv, (3, D, H), "used by conv_general_dilated"),
        (lambda w, x: x @ (w + _FROZEN[0]), (D, H), "added to another value before a dot_general"),
        (
            lambda w, x: x @ jax.jit(lambda v: (v - _FROZEN[1]).T)(w).T,
            (D, H),
            "added to another value before a dot_general",
        ),
        (lambda w, x: _conv(w + _FROZEN, x), (3, D, H), "added to another value before a conv_general_dilated"),
    ],
    ids=[
        "reshape_then_dot",
        "scaled_then_dot",
        "conv",
        "added_then_dot",
        "subtracted_in_a_jit_transposed_then_dot",
        "added_then_conv",
    ],
)
def test_an_unmapped_weight_of_two_or_more_axes_is_named_in_the_one_warning(x64, use, shape, why):
    r = np.random.default_rng(12)
    params = [{"head": _normal(r, C, H), "w": _normal(r, *shape)} for _ in range(2)]
    inputs, labels, lengths = _tokens(r, 5, 4)

    def loss_fn(p, i, y):
        return _token_ce(jnp.tanh(use(p["w"], i["x"])) @ p["head"].T, y, i["mask"])

    proj = tracin.Projection(2 * 16, 3, per_layer=True, kronecker=True)
    with pytest.warns(UserWarning) as record:
        g = _export(loss_fn, params, (inputs, labels), proj)
    messages = [str(w.message) for w in record if "kronecker" in str(w.message)]
    assert len(messages) == 1 and f"'w': {why}" in messages[0] and "'head'" not in messages[0]
    layout = [LayerMatrix(C, H).to_dict(), int(np.prod(shape))]
    assert g.metadata["projection"]["segments"] == layout
    for c, p in enumerate(params):
        assert_rows_close(
            g.matrices[c], projected_reference(proj, layout, example_grads(loss_fn, p, inputs, labels, lengths))
        )


def test_a_bias_broadcast_over_the_tokens_is_exempt_though_its_sum_reaches_a_dot_general():
    def loss(w, b, x):  # keys x @ w + b, b (1, H) added to every token, then scored against themselves
        k = x @ w + b
        return jnp.sum(k @ k.T)

    closed = jax.make_jaxpr(loss)(jnp.zeros((D, H)), jnp.zeros((1, H)), jnp.zeros((7, D)))
    sites, reasons = find_sites(closed, {0: "w", 1: "b"})
    assert list(sites) == ["w"] and reasons == {}


def test_the_other_of_two_chosen_weights_in_one_dot_general_is_named_for_the_product():
    def loss(a, b, x):  # a low-rank product of two chosen leaves, a stored (2, 3, 4) and reshaped to (6, 4)
        return jnp.sum(x @ (a.reshape(6, 4) @ b))

    closed = jax.make_jaxpr(loss)(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((7, 6)))
    sites, reasons = find_sites(closed, {0: "a", 1: "b"})
    assert sites == {}
    assert reasons == {
        "a": "passed through reshape before a dot_general",
        "b": "multiplied by another chosen weight in one dot_general",
    }


def _reversing_matmul():
    """x @ w with a custom_vjp whose rule reverses the input's gradient and doubles the weight's."""

    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, (x, w)

    def bwd(res, g):
        x, w = res
        return -(g @ w.T), 2 * jnp.einsum("...i,...o->io", x, g)

    matmul.defvjp(fwd, bwd)
    return matmul


def test_a_weight_inside_a_custom_vjp_function_is_projected_flat_and_its_rule_kept(x64):
    """The rule changes both inputs' gradients: the upstream weight 'in' (mapped) gets the reversed gradient
    through it, 'w' (inside it: one warning) the doubled one, as jax.grad gives them."""
    r = np.random.default_rng(5)
    matmul = _reversing_matmul()
    params = [{"in": _normal(r, D, H), "w": _normal(r, H, C)} for _ in range(2)]
    inputs, labels, lengths = _tokens(r, 5, 4)

    def loss_fn(p, i, y):
        return _token_ce(matmul(jnp.tanh(i["x"] @ p["in"]), p["w"]), y, i["mask"])

    proj = tracin.Projection(2 * 16, 7, per_layer=True, kronecker=True)
    with pytest.warns(UserWarning) as record:
        g = _export(loss_fn, params, (inputs, labels), proj)
    messages = [str(w.message) for w in record if "kronecker" in str(w.message)]
    assert len(messages) == 1 and "'w': used inside a custom_vjp function" in messages[0]
    layout = [LayerMatrix(D, H).to_dict(), H * C]
    assert g.metadata["projection"]["segments"] == layout
    for c, p in enumerate(params):
        assert_rows_close(
            g.matrices[c], projected_reference(proj, layout, example_grads(loss_fn, p, inputs, labels, lengths))
        )


def _mean_loss(p, inputs, labels):
    return mlp_loss(p, inputs, labels).mean()


@pytest.mark.parametrize(
    "dim, kwargs, match",
    [
        (60, dict(mode="last_layer", layers=["head"], layer_input=lambda p, i: i["x"]), "needs mode='full'"),
        (60, dict(preconditioner="adam"), r"checkpoints\[0\] has no optimizer state, which preconditioner='adam'"),
        (60, dict(preconditioner="adam_update"), "'adam_update' is not rank one"),
        (60, dict(loss=_mean_loss), r"per-example losses of shape \(4,\) for a batch of 4, got \(\) \(a mean"),
        (4, {}, "5 segments need dim >= 5"),
        (5 * 17, {}, r"gives weight 'embed' 17 outputs for its 6 x 10 gradient; \(k_rows, k_cols\) = \(1, 10\)"),
    ],
)
def test_what_a_kronecker_projection_cannot_go_with(dim, kwargs, match):
    r = np.random.default_rng(6)
    inputs, labels, _ = _tokens(r, 4, 3, np.float32)
    proj = tracin.Projection(dim, per_layer=True, kronecker=True)
    loss = kwargs.pop("loss", mlp_loss)
    with pytest.raises(ValueError, match=match):
        export_gradients(loss, [(mlp_params(r), 1.0)], (inputs, labels), projection=proj, progress=False, **kwargs)


def test_an_unbalanced_share_is_refused_with_the_outputs_it_uses_the_rule_and_a_dim_that_fits(x64):
    """dim = 85 gives each of 5 segments 17 outputs, a prime: embed's 6 x 10 gradient would be projected as
    1 x 10. The refusal said "which factor as (1, 10)" and advised 5 x 1024 (review65 F2, as tracin.torch): it
    says how many outputs are used, the rule, and a dim near the request that exports."""
    r = np.random.default_rng(6)
    params = mlp_params(r)
    inputs, labels, lengths = _tokens(r, 4, 5)
    prime = tracin.Projection(5 * 17, per_layer=True, kronecker=True)
    with pytest.raises(ValueError) as refused:
        export_gradients(mlp_loss, [(params, 1.0)], (inputs, labels), projection=prime, progress=False)
    assert str(refused.value) == (
        "projection: dim=85 over 5 segments gives weight 'embed' 17 outputs for its 6 x 10 gradient; (k_rows, "
        "k_cols) = (1, 10), the most balanced factors of 17 within those sides, uses 10 of them (the other 7 stay "
        "zero) and projects the gradient's 6 rows to 1: a factor below both its side's size and isqrt(17) // 2 = 2 "
        "is refused. Choose dim = 5 segments x k with k whose factors balance on every Kronecker layer, "
        "e.g. 5 x 16 = 80"
    )
    dim = int(re.search(r"= (\d+)$", str(refused.value)).group(1))
    proj = tracin.Projection(dim, 1, per_layer=True, kronecker=True)
    got = export_gradients(mlp_loss, [(params, 1.0)], (inputs, labels), projection=proj, progress=False)
    assert got.metadata["projection"]["segments"] == MLP_LAYOUT
    assert [proj.kronecker_dims(16, LayerMatrix(**s)) for s in MLP_LAYOUT[:2]] == [(4, 4), (4, 4)]
    want = projected_reference(proj, MLP_LAYOUT, example_grads(mlp_loss, params, inputs, labels, lengths))
    assert_rows_close(got.matrices[0], want)


def test_a_batch_shape_that_maps_other_weights_is_an_error():
    r = np.random.default_rng(10)

    def loss_fn(p, inputs, labels):  # w used twice on sequences longer than 4 tokens
        h = inputs["x"] @ p["w"]
        return _token_ce(h + inputs["x"] @ p["w"] if h.shape[1] > 4 else h, labels, inputs["mask"])

    short, long = _tokens(r, 4, 3, np.float32), _tokens(r, 4, 6, np.float32)
    proj = tracin.Projection(16, per_layer=True, kronecker=True)
    with pytest.raises(ValueError, match=r"maps other weights per token than the first batch did \(\['w'\]\)"):
        export_gradients(
            loss_fn, [({"w": _normal(r, D, C)}, 1.0)], [short[:2], long[:2]], projection=proj, progress=False
        )


def test_import_tracin_jax_leaves_the_kronecker_machinery_out():
    code = "import sys, tracin.jax; print(sorted(m for m in sys.modules if m.startswith('tracin.jax.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "export" in loaded and "token_projection" not in loaded and "jaxpr_taps" not in loaded


def test_a_jax_without_what_the_kronecker_projection_needs_is_an_import_error_naming_the_version(monkeypatch):
    r = np.random.default_rng(6)
    inputs, labels, _ = _tokens(r, 4, 3, np.float32)
    monkeypatch.delattr(jax.extend.core, "jaxprs_in_params")  # as in JAX 0.9
    for name in ("tracin.jax.token_projection", "tracin.jax.jaxpr_taps"):
        monkeypatch.delitem(sys.modules, name)
    proj = tracin.Projection(60, per_layer=True, kronecker=True)
    match = rf"kronecker=True needs JAX >= {export.KRONECKER_JAX}, found JAX {jax.__version__}.*jaxprs_in_params"
    with pytest.raises(ImportError, match=match):
        export_gradients(mlp_loss, [(mlp_params(r), 1.0)], (inputs, labels), projection=proj, progress=False)


class _BrokenLoader(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds tracin.jax.token_projection and loads it as a module whose code hits an attribute bug."""

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "tracin.jax.token_projection" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise AttributeError("module 'jax.numpy' has no attribute 'not_a_function'")


def test_an_attribute_error_importing_the_kronecker_machinery_is_raised_as_it_is(monkeypatch):
    """On a JAX that has what it needs, a bug of ours is not reported as a JAX too old."""
    r = np.random.default_rng(6)
    inputs, labels, _ = _tokens(r, 4, 3, np.float32)
    monkeypatch.delitem(sys.modules, "tracin.jax.token_projection")
    monkeypatch.setattr(sys, "meta_path", [_BrokenLoader(), *sys.meta_path])
    proj = tracin.Projection(60, per_layer=True, kronecker=True)
    with pytest.raises(AttributeError, match="not_a_function"):
        export_gradients(mlp_loss, [(mlp_params(r), 1.0)], (inputs, labels), projection=proj, progress=False)


def adam_preconditioned(grads: list[list[np.ndarray]], layout: list, nu: list, step: float, b2: float, eps: float):
    """Per example its gradients preconditioned as "adam" with a Kronecker projection: a mapped weight's G
    by the rank-one r c^T / sum(r) of v_hat + eps^2 (G * sqrt(s / r) / sqrt(c)), the others exactly."""
    v_hats = [np.asarray(v, np.float64) / (1 - b2**step) for v in nu]
    out = []
    for g in grads:
        parts = []
        for segment, gj, v in zip(layout, g, v_hats, strict=True):
            if isinstance(segment, dict):
                v = v.reshape(segment["rows"], segment["cols"]) + eps**2
                r, c = v.sum(1), v.sum(0)
                parts.append(gj.reshape(v.shape) * np.sqrt(r.sum() / r)[:, None] / np.sqrt(c)[None, :])
            else:
                parts.append(gj / (np.sqrt(v) + eps))
        out.append(parts)
    return out


def test_adam_scales_mapped_weights_by_the_rank_one_factorisation_and_other_leaves_exactly(x64):
    optax = pytest.importorskip("optax")
    b1, b2, eps = 0.8, 0.95, 1e-6
    r = np.random.default_rng(13)
    inputs, labels, lengths = _tokens(r, 8, 5)
    params, opt = mlp_params(r), optax.adam(0.05, b1=b1, b2=b2, eps=eps)
    state, checkpoints = opt.init(params), []
    mean_grad = jax.jit(jax.grad(lambda p: mlp_loss(p, inputs, labels).mean()))
    for lr, steps in ((0.05, 2), (0.02, 3)):
        for _ in range(steps):
            updates, state = opt.update(mean_grad(params), state, params)
            params = optax.apply_updates(params, updates)
        checkpoints.append((params, lr, state))
    proj = tracin.Projection(5 * 12, 14, per_layer=True, kronecker=True)
    g = export_gradients(
        mlp_loss,
        checkpoints,
        (inputs, labels),
        projection=proj,
        preconditioner="adam",
        preconditioner_options={"b1": b1, "b2": b2, "eps": eps},
        batch_size=3,
        progress=False,
    )
    meta = g.metadata
    assert meta["preconditioner"]["kind"] == "adam" and "rank-one" in meta["preconditioner"]["factored"]
    assert meta["projection"]["segments"] == MLP_LAYOUT and len(meta["fingerprints"]["optimizer_states"]) == 2
    for c, (p, _, st) in enumerate(checkpoints):
        adam = next(x for x in st if isinstance(x, optax.ScaleByAdamState))
        nu, step = jax.tree_util.tree_leaves(adam.nu), float(adam.count)
        grads = adam_preconditioned(example_grads(mlp_loss, p, inputs, labels, lengths), MLP_LAYOUT, nu, step, b2, eps)
        assert_rows_close(g.matrices[c], projected_reference(proj, MLP_LAYOUT, grads))
    plain = export_gradients(mlp_loss, [c[:2] for c in checkpoints], (inputs, labels), projection=proj, progress=False)
    assert not np.allclose(plain.matrices[1], g.matrices[1], rtol=1e-2)  # the preconditioner changed the rows


def test_batches_of_other_shapes_store_and_resume(tmp_path):
    """A list of batches of two sequence lengths (traced twice, same layout); an interrupted store export
    resumed holds the bytes of an uninterrupted one, and the rows of the in-memory export."""
    r = np.random.default_rng(7)
    params = [jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), mlp_params(r)) for _ in range(2)]
    first, second = _tokens(r, 5, 4, np.float32), _tokens(r, 3, 6, np.float32)
    data = [(first[0], first[1]), (second[0], second[1])]
    proj = tracin.Projection(5 * 16, 8, per_layer=True, kronecker=True)
    memory = _export(mlp_loss, params, data, proj, batch_size=3)
    for c in range(2):
        for (inputs, labels), lo, hi in ((data[0], 0, 5), (data[1], 5, 8)):
            full = export_gradients(mlp_loss, [(params[c], 1.0)], (inputs, labels), progress=False)
            want = proj.apply(full.matrices[0], segments=MLP_LAYOUT).astype(np.float64)
            assert_rows_close(memory.matrices[c][lo:hi], want, rtol=2e-4)

    with ctrl_c_on_call(token_projection.KroneckerRows, "__call__", 3):
        _export(mlp_loss, params, data, proj, batch_size=3, store=tmp_path / "g")
    store = _export(mlp_loss, params, data, proj, batch_size=3, store=tmp_path / "g")
    fresh = _export(mlp_loss, params, data, proj, batch_size=3, store=tmp_path / "f")
    assert store.metadata == fresh.metadata == memory.metadata
    assert store.metadata["projection"]["segments"] == MLP_LAYOUT
    assert_same_store_files(tmp_path / "g", tmp_path / "f")
    np.testing.assert_array_equal(tracin.self_influence(store), tracin.self_influence(memory))


# --- memory ---


def test_no_per_example_weight_gradient_is_formed():
    """Every value in the jaxpr of the compiled rows function (forward, backward, projection) holds fewer
    than batch x rows x cols elements, the size of the mapped weights' per-example gradients."""
    r = np.random.default_rng(8)
    big = 96
    params = {
        "a": jnp.asarray(r.normal(size=(D, big)), jnp.float32),
        "b": jnp.asarray(r.normal(size=(big, big)), jnp.float32),
    }

    def deep_loss(p, inputs, labels):
        h = jnp.tanh(jnp.tanh(inputs["x"] @ p["a"]) @ p["b"])
        return _token_ce(h[..., :C], labels, inputs["mask"])

    inputs, labels, _ = _tokens(r, 8, 3, np.float32)
    layout = layout_of(params, None)
    rows = rows_function(deep_loss, layout, (0, 1), (1, 1))
    factors = [(jnp.ones((4, D)), jnp.ones((8, big))), (jnp.ones((8, big)), jnp.ones((8, big)))]
    closed = jax.make_jaxpr(rows)([params["a"], params["b"]], [], [], factors, inputs, labels)
    limit = 8 * big * big
    assert all(v.aval.size < limit for v in _values(closed.jaxpr)), "a (batch, rows, cols) value was formed"
    assert any(v.aval.size >= big * big for v in _values(closed.jaxpr))  # the weight itself is there
    full = FullRows(deep_loss, layout, jnp.float32)  # its rows are the per-example gradients: seen by the walk
    leaves = [*params.values()]
    full_jaxpr = jax.make_jaxpr(lambda x, y: full(leaves, [], Batch(0, 8, x, y)))(inputs, labels).jaxpr
    assert any(v.aval.size >= limit for v in _values(full_jaxpr))


def _values(jaxpr):
    """Every variable of a jaxpr and of the jaxprs nested in it."""
    yield from jaxpr.invars
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _values(sub)


def test_a_kronecker_projection_no_narrower_than_the_rows_warns(x64):
    """review143 F4: per-token rows of dim columns at least the gradient's width d widen what is stored."""
    r = np.random.default_rng(3)
    params = [mlp_params(r)]
    d = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params[0]))
    inputs, labels, _ = _tokens(r, 3, 4)
    proj = tracin.Projection(5 * 48, 2, per_layer=True, kronecker=True)
    assert proj.dim >= d
    expected = rf"dim {proj.dim}, not fewer than the gradient's row width {d}: .*drop projection= to store the exact"
    with pytest.warns(RuntimeWarning, match=expected) as caught:
        g = _export(mlp_loss, params, (inputs, labels), proj, batch_size=4)
    assert list(g.dims) == [proj.dim]
    assert [w.filename for w in caught if w.category is RuntimeWarning] == [__file__]


def test_ids_below_minus_the_table_size_take_no_gradient_as_in_the_full_rows():
    """r304: jnp.take(..., mode="fill") keeps an id below -vocab negative at the gather (one above wraps): it
    reads the fill value and its row gets no gradient, in the per-token projection as in the full rows."""
    r = np.random.default_rng(5)
    params = {"E": r.normal(size=(6, 4)).astype(np.float32), "W": r.normal(size=(4, 3)).astype(np.float32)}
    ids = r.integers(0, 6, (5, 7))
    ids[:, ::3] = -10  # -10 + 6 < 0: out of range

    def loss(p, inputs, targets):
        h = jnp.take(p["E"], inputs, axis=0, mode="fill", fill_value=0).sum(1)
        return -jax.nn.log_softmax(h @ p["W"])[jnp.arange(targets.shape[0]), targets]

    labels = r.integers(0, 3, 5)
    proj = tracin.Projection(32, 3, per_layer=True, kronecker=True)
    g = export_gradients(loss, [(params, 1.0)], (ids, labels), projection=proj, progress=False)
    layout = g.metadata["projection"]["segments"]
    assert layout == [LayerMatrix(6, 4).to_dict(), LayerMatrix(4, 3).to_dict()]
    full = export_gradients(loss, [(params, 1.0)], (ids, labels), progress=False)
    assert_rows_close(g.matrices[0], proj.apply(full.matrices[0], segments=layout).astype(np.float64))
