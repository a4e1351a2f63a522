"""find_sites / run_tapped on three shapes of use the other tests leave open: a weight used transposed
(x @ W.T, torch's layout: the transpose is a view, its permutation maps the contracted axis back to the
leaf's), a 2-D bias broadcast over the tokens and then fed to the next matmul (a bias: neither a site nor
a reason), and a weight on the left of its product (W @ x), whose tapped activation is the other operand.
Expectations are worked by hand or in float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from tracin.jax.jaxpr_taps import Site, find_sites, run_tapped  # noqa: E402


def test_a_weight_used_transposed_is_mapped_on_the_leaf_axis_it_contracts():
    """x (5, 3) @ W.T with W (4, 3): the product contracts W's axis 1 (its columns) with x's axis 1, and
    W's rows (4) are the output's axis 1."""
    closed = jax.make_jaxpr(lambda w, x: x @ w.T)(jnp.zeros((4, 3), jnp.float32), jnp.ones((5, 3), jnp.float32))
    assert [e.primitive.name for e in closed.jaxpr.eqns] == ["transpose", "dot_general"]
    sites, reasons = find_sites(closed, {0: "w"})
    assert reasons == {}
    expected = Site((1,), False, 1, 1, 1, (1,), (1,), (5, 4), jnp.dtype(jnp.float32), False)
    assert sites == {"w": expected}


def test_a_2d_bias_broadcast_over_the_tokens_before_the_next_matmul_is_neither_site_nor_refused():
    """(x @ W.T + b) @ V with b (1, 4) added to (5, 4) tokens: b is a bias (its gradient a sum of output
    gradients), though the sum reaches a dot_general; only a leaf of the sum's own size added before a
    matmul would be refused."""
    w, b, v = jnp.zeros((4, 3)), jnp.zeros((1, 4)), jnp.ones((4, 2))
    closed = jax.make_jaxpr(lambda w, b, x: (x @ w.T + b) @ v)(w, b, jnp.ones((5, 3)))
    sites, reasons = find_sites(closed, {0: "w", 1: "b"})
    assert reasons == {}
    assert set(sites) == {"w"}


def test_a_weight_on_the_left_of_its_product_taps_the_other_operand():
    """loss = sum((W @ x)^2), W (4, 3), x (3, 5): the tap sees x, the gradient of a zero added to the
    product is dL/dy = 2 W x, and dL/dy x^T is W's gradient 2 W x x^T (float64 NumPy)."""
    r = np.random.default_rng(3)
    w, x = r.normal(size=(4, 3)).astype(np.float32), r.normal(size=(3, 5)).astype(np.float32)
    closed = jax.make_jaxpr(lambda w, x: ((w @ x) ** 2).sum())(w, x)
    sites, reasons = find_sites(closed, {0: "w"})
    assert reasons == {} and sites["w"].weight_operand == 0 and sites["w"].contract == 1

    def tapped(zero):
        outs, acts = run_tapped(closed, sites, [jnp.asarray(w), jnp.asarray(x)], {"w": zero})
        return outs[0], acts["w"]

    (loss, act), dy = jax.value_and_grad(tapped, has_aux=True)(jnp.zeros((4, 5), jnp.float32))
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    np.testing.assert_allclose(float(loss), ((w64 @ x64) ** 2).sum(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(act), x)
    np.testing.assert_allclose(np.asarray(dy, np.float64) @ x64.T, 2 * w64 @ x64 @ x64.T, rtol=1e-5, atol=1e-5)


def test_a_table_stored_transposed_is_looked_up_on_its_columns():
    """t (2, 5), an embedding stored (dim, vocab), read as t.T[ids]: a lookup whose ids index the leaf's axis 1
    (contract 1, its columns), the rows of the transposed view; t (5, 2) read as t[ids] indexes axis 0."""
    ids = jnp.asarray(np.array([3, 0, 4], np.int32))
    stored_t = jax.make_jaxpr(lambda t: t.T[ids])(jnp.zeros((2, 5), jnp.float32))
    plain = jax.make_jaxpr(lambda t: t[ids])(jnp.zeros((5, 2), jnp.float32))
    for closed, contract in ((stored_t, 1), (plain, 0)):
        sites, reasons = find_sites(closed, {0: "t"})
        assert reasons == {}
        site = sites["t"]
        assert (site.lookup, site.contract, site.out_axes, site.out_shape) == (True, contract, (1,), (3, 2))
