"""find_sites on jaxprs that public jax APIs compile to: which uses of a weight matrix are mapped to a
per-token site, and the reason given for those that are not."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from tracin.jax.jaxpr_taps import find_sites  # noqa: E402

LOOKUP_REFUSED = "used in a gather that is not a lookup of whole rows of a matrix by ids"


@pytest.mark.parametrize("mode", ["clip", "promise_in_bounds", "one_hot"])
def test_a_row_lookup_is_mapped_unless_its_gather_is_one_hot(mode):
    """W.at[ids].get(mode=...) compiles to one gather of whole rows; a ONE_HOT gather (which this jax traces
    but cannot evaluate) is refused with the reason, the other modes are a lookup site on the table's axis 0."""
    ids = jnp.asarray(np.array([3, 0, 4], np.int32))
    closed = jax.make_jaxpr(lambda table: table.at[ids].get(mode=mode))(jnp.zeros((5, 3), jnp.float32))
    (gather,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "gather"]
    assert gather.params["mode"].name == mode.upper()
    sites, reasons = find_sites(closed, {0: "table"})
    if mode == "one_hot":
        assert (sites, reasons) == ({}, {"table": LOOKUP_REFUSED})
    else:
        assert reasons == {}
        assert sites["table"].lookup and sites["table"].clip == (mode == "clip")


def test_a_weight_reshaped_twice_is_refused_naming_the_first_reshape():
    """W.reshape(-1, 1).squeeze(1) before a dot_general: the reason names the reshape that lost the leaf's
    axes, not the squeeze after it."""
    vector = jnp.ones(12, jnp.float32)
    closed = jax.make_jaxpr(lambda w: jnp.dot(w.reshape(-1, 1).squeeze(1), vector))(jnp.zeros((4, 3), jnp.float32))
    assert [e.primitive.name for e in closed.jaxpr.eqns] == ["reshape", "squeeze", "dot_general"]
    assert find_sites(closed, {0: "w"}) == ({}, {"w": "passed through reshape before a dot_general"})


def test_a_weight_contracted_on_every_axis_is_refused():
    """einsum("ij,bij->b"): one dot_general contracting both of the weight's axes leaves it no output axis
    to map: refused, not taken as a matrix whose rows are all of it."""
    acts = jnp.ones((5, 4, 3), jnp.float32)
    closed = jax.make_jaxpr(lambda w: jnp.einsum("ij,bij->b", w, acts))(jnp.zeros((4, 3), jnp.float32))
    (dot,) = closed.jaxpr.eqns
    assert dot.primitive.name == "dot_general" and len(dot.params["dimension_numbers"][0][0]) == 2
    reason = "used in a dot_general contracting other axes than its first or its last ones"
    assert find_sites(closed, {0: "w"}) == ({}, {"w": reason})
