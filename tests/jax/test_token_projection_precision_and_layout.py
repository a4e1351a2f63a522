"""tracin.jax per-token Kronecker projections (review r340, killer tests of hand mutants): float64 parameters
are projected in float64 (token terms that cancel keep the small gradient they leave), a batch whose shapes
map a weight as another matrix is refused like one mapping other weights, and the layout cannot be read
before a batch has fixed it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracin
from tracin.jax import export_gradients
from tracin.jax.params import layout_of
from tracin.jax.token_projection import KroneckerRows
from tracin.projection import LayerMatrix

D, K = 4, 6  # the weight (D, K): 4 x 6, its segment of dim 12 projected as k_rows x k_cols


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _linear_loss(p, x, y):
    """(batch,): sum over tokens t and outputs k of (x_t @ W)_k * y_tk; the per-example gradient is X^T Y."""
    return ((x @ p["w"]) * y).sum((1, 2))


def test_float64_weights_are_projected_in_float64_where_token_terms_cancel(x64):
    """Two tokens of activation 1e6 a whose output gradients 1e6 c and -1e6 c + d cancel to d: G = 1e6 a d^T,
    each token's term 1e12 a c^T. In float32 the per-token projections lose the 1e6-sized sum to rounding
    of 1e12-sized terms (relative error ~1e-1); in float64, as the weights are, the rows match float64
    NumPy."""
    r = np.random.default_rng(0)
    n = 3
    a, c, d = r.normal(size=(n, D)), r.normal(size=(n, K)), r.normal(size=(n, K))
    x = np.stack([1e6 * a, 1e6 * a], 1)  # (n, 2 tokens, D)
    y = np.stack([1e6 * c, -1e6 * c + d], 1)  # (n, 2 tokens, K)
    params = {"w": jnp.asarray(r.normal(size=(D, K)))}
    proj = tracin.Projection(12, 3, per_layer=True, kronecker=True)
    g = export_gradients(_linear_loss, [(params, 1.0)], (x, y), projection=proj, progress=False)
    layer = LayerMatrix(D, K).to_dict()
    assert g.metadata["projection"]["segments"] == [layer]
    p_rows, p_cols = (f.astype(np.float64) for f in proj.layer_factors(0, layer, 12))
    grads = np.einsum("ntd,ntk->ndk", x, y)  # float64: 1e6 a d^T up to rounding of 1e-4
    want = np.stack([np.kron(p_rows, p_cols) @ gi.reshape(-1) for gi in grads])
    want = np.pad(want, ((0, 0), (0, 12 - want.shape[1])))
    got = np.asarray(g.matrices[0], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _split_by_length(p, x, y):
    """w (D, 2, 3): on sequences of up to 4 tokens contracted on its first axis (a D x 6 matrix), on longer
    ones x's first 3 features contracted on its last axis (a (D * 2) x 3 matrix): the same weight mapped,
    as another matrix."""
    if x.shape[1] <= 4:
        h = jnp.einsum("btd,dhk->bthk", x, p["w"])
    else:
        h = jnp.einsum("btk,dhk->btdh", x[..., :3], p["w"])
    return jnp.tanh(h).reshape(h.shape[0], -1).sum(1) + 0.0 * y


def test_a_batch_shape_that_maps_a_weight_as_another_matrix_is_an_error():
    """The first batch fixes w's segment as a D x 6 matrix; a later batch mapping it as 8 x 3 would project
    its gradient with the factors of the other shape: refused, naming w, as for a weight no longer mapped."""
    r = np.random.default_rng(1)
    short = (r.normal(size=(3, 4, D)).astype(np.float32), np.zeros(3, np.float32))
    long = (r.normal(size=(3, 6, D)).astype(np.float32), np.zeros(3, np.float32))
    params = {"w": jnp.asarray(r.normal(size=(D, 2, 3)), jnp.float32)}
    proj = tracin.Projection(16, per_layer=True, kronecker=True)
    first = export_gradients(_split_by_length, [(params, 1.0)], [short], projection=proj, progress=False)
    assert first.metadata["projection"]["segments"] == [LayerMatrix(D, 6).to_dict()]
    with pytest.raises(ValueError, match=r"maps other weights per token than the first batch did \(\['w'\]\)"):
        export_gradients(_split_by_length, [(params, 1.0)], [short, long], projection=proj, progress=False)


def test_the_layout_is_not_read_before_a_batch_has_fixed_it():
    params = {"w": jnp.zeros((D, K), jnp.float32)}
    proj = tracin.Projection(12, per_layer=True, kronecker=True)
    rows = KroneckerRows(_linear_loss, layout_of(params, None), proj, params, [], None)
    with pytest.raises(RuntimeError, match="the layout is fixed by the first batch: no batch has been seen"):
        rows.spec()
