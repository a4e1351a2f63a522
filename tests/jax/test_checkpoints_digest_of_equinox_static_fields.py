"""The fingerprint of an in-memory Equinox module holds its static fields (eqx.field(static=True), kept in the
treedef) even when it has no other non-array leaf: two modules of the same arrays and another static setting
are other checkpoints to a resume. (A pytree of arrays alone digests by its leaf paths and arrays.)"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")

from tracin._export.fingerprint import digest_arrays  # noqa: E402
from tracin.jax.checkpoints import state_digest  # noqa: E402


class _Shifted(eqx.Module):
    w: jax.Array
    shift: float = eqx.field(static=True, default=0.0)


def test_a_static_field_alone_changes_the_digest_of_an_equinox_module():
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    digests = {state_digest(_Shifted(w, shift)) for shift in (0.0, 2.0)}
    assert len(digests) == 2  # mutant r362 C3 digested the arrays alone: one digest for both
    assert state_digest(_Shifted(w, 2.0)) == state_digest(_Shifted(w.copy(), 2.0))
    assert state_digest(_Shifted(w, 2.0), static=False) == digest_arrays([np.frombuffer(b"w", np.uint8), w])
