"""find_sites at the edges of what it maps (review r340, killer tests of hand mutants): a cast is a view the
weight is followed through; a dot_general with batch dimensions or no contracted axis, a gather of part of
a row, of several rows per id, or of a window its FILL_OR_DROP mode could drop, and a weight handed back by
a nested call are refused with the reason the one warning names."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
lax = jax.lax

from tracin.jax.jaxpr_taps import find_sites  # noqa: E402

LOOKUP_REFUSED = "used in a gather that is not a lookup of whole rows of a matrix by ids"
IDS = jnp.asarray([1, 0, 3], jnp.int32)


def _sites(loss, *avals):
    return find_sites(jax.make_jaxpr(loss)(*avals), {0: "w"})


def test_a_weight_cast_to_another_float_before_its_matmul_is_mapped_through_the_cast():
    """x @ w.astype(float16) (mixed precision): convert_element_type keeps the matrix; the site is the
    dot_general, w its rhs contracted on its first axis, the output float16."""
    x = jnp.ones((4, 5), jnp.float16)
    sites, reasons = _sites(lambda w: (x @ w.astype(jnp.float16)).astype(jnp.float32).sum(), jnp.zeros((5, 3)))
    assert reasons == {} and list(sites) == ["w"]
    site = sites["w"]
    assert (site.lookup, site.weight_operand, site.split, site.contract) == (False, 1, 1, 0)
    assert (site.act_axes, site.out_axes, site.out_shape, site.out_dtype) == ((1,), (1,), (4, 3), jnp.float16)


def test_a_dot_general_with_batch_dimensions_is_refused():
    """einsum("hij,thj->thi"): the heads axis is a batch dimension of the dot_general: no single matrix."""
    x = jnp.ones((5, 2, 3))
    got = _sites(lambda w: jnp.einsum("hij,thj->thi", w, x).sum(), jnp.zeros((2, 4, 3)))
    assert got == ({}, {"w": "used in a dot_general with batch dimensions"})


def test_a_dot_general_contracting_no_axis_of_the_weight_is_refused():
    """tensordot(x, w, axes=0), an outer product: a dot_general that contracts none of w's axes."""
    got = _sites(lambda w: jnp.tensordot(jnp.ones(4), w, axes=0).sum(), jnp.zeros((5, 3)))
    assert got == ({}, {"w": "used in a dot_general contracting other axes than its first or its last ones"})


def test_a_gather_of_part_of_each_row_is_refused():
    """Rows by ids, but 2 of their 3 columns (slice_sizes (1, 2)): not whole rows."""
    dn = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
    got = _sites(lambda w: lax.gather(w, IDS[:, None], dn, (1, 2)).sum(), jnp.zeros((5, 3)))
    assert got == ({}, {"w": LOOKUP_REFUSED})


def test_a_gather_of_two_rows_per_id_is_refused():
    """dynamic_slice of 2 rows from each id under vmap: a window of rows, not one row per id."""
    got = _sites(lambda w: jax.vmap(lambda i: lax.dynamic_slice(w, (i, 0), (2, 3)))(IDS).sum(), jnp.zeros((5, 3)))
    assert got == ({}, {"w": LOOKUP_REFUSED})


@pytest.mark.parametrize("mode", ["fill", "clip"])
def test_a_scalar_lookup_form_of_fill_or_drop_mode_is_refused(mode):
    """The W[id]-under-vmap form (indices (id, start), nothing collapsed) with FILL_OR_DROP drops the whole
    row when the start on the other axis is not 0 (its gradient is then zero for an id in range): refused;
    the same gather in CLIP mode (which clamps the start to 0) is a lookup."""
    dn = lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0, 1))
    starts = jnp.stack([IDS, jnp.ones_like(IDS)], 1)
    sites, reasons = _sites(lambda w: lax.gather(w, starts, dn, (1, 3), mode=mode).sum(), jnp.zeros((5, 3)))
    if mode == "fill":
        assert (sites, reasons) == ({}, {"w": LOOKUP_REFUSED})
    else:
        assert reasons == {} and sites["w"].lookup and sites["w"].clip


def test_a_weight_handed_back_by_a_nested_call_is_refused_as_returned():
    """jax.jit(lambda v: v.T)(w) then a matmul: the jit's output is not followed, and the reason says so
    (not "not used by the loss")."""
    x = jnp.ones((4, 5))
    got = _sites(lambda w: (x @ jax.jit(lambda v: v.T)(w).T).sum(), jnp.zeros((5, 3)))
    assert got == ({}, {"w": "returned by a nested call"})
