"""Fingerprints of JAX objects a loss or a params pytree holds: typed PRNG keys, and static fields
holding sets (whose repr depends on PYTHONHASHSEED), digested the same way in every process."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracin
from interrupts import FailingBatches, Killed
from tracin._export.fingerprint import callable_identity
from tracin.jax import export_gradients


def _noisy_loss(key):
    def loss(p, x, y):
        return (x @ (p["w"] + 0.01 * jax.random.normal(key, (4,))) - y) ** 2

    return loss


def _keyed_loss(p, x, y, key):
    return (x @ (p["w"] + 0.01 * jax.random.normal(key, (4,))) - y) ** 2


def test_a_typed_prng_key_in_a_loss_closure_or_partial_is_digested_by_its_key_data(tmp_path):
    """jax.random.key arrays cannot become NumPy arrays: their raw key data is digested instead (a
    raw TypeError from every export before)."""
    k0, k1 = jax.random.key(0), jax.random.key(1)
    assert callable_identity(_noisy_loss(k0)) == callable_identity(_noisy_loss(jax.random.key(0)))
    assert callable_identity(_noisy_loss(k0)) != callable_identity(_noisy_loss(k1))
    partial = functools.partial(_keyed_loss, key=k0)
    assert callable_identity(partial) != callable_identity(functools.partial(_keyed_loss, key=k1))
    x, y = np.ones((6, 4), np.float32), np.zeros(6, np.float32)
    for loss in (_noisy_loss(k0), partial):
        rows = export_gradients(loss, [({"w": jnp.ones(4)}, 1.0)], (x, y), progress=False)
        assert rows.n_rows == 6 and rows.dims == (4,)
    export_gradients(partial, [({"w": jnp.ones(4)}, 1.0)], (x, y), progress=False, store=tmp_path / "s")


_DIGESTS = """
import functools, equinox as eqx, jax, jax.numpy as jnp
from tracin._export.fingerprint import callable_identity
from tracin.jax.checkpoints import state_digest

class WithSet(eqx.Module):
    w: jax.Array
    names: frozenset = eqx.field(static=True)
    groups: tuple = eqx.field(static=True)

def loss(out, y, ignore):
    return out

names = frozenset({"alpha", "beta", "gamma", "delta", "epsilon"})
model = WithSet(jnp.ones(2), names, ({"x", "y", "z"}, [frozenset({"p", "q", "r"})]))
print(state_digest(model), state_digest({"w": jnp.ones(2), "tags": ("a", {"u", "v", "w"})}))
print(callable_identity(functools.partial(loss, ignore={"pad", "unk", "bos", "eos"})))
"""


def test_static_sets_digest_the_same_in_processes_with_other_hash_seeds():
    """A frozenset static field of an Equinox module (in the treedef), a set leaf's repr and a set
    given to functools.partial print in string-hash order: a store could not be resumed, or scored
    against test gradients, from another process (PYTHONHASHSEED differs)."""
    outputs = [_run(_DIGESTS, seed) for seed in (1, 2)]
    assert len(set(outputs)) == 1, outputs
    assert "{'bos', 'eos', 'pad', 'unk'}" in outputs[0]


def _run(script: str, hash_seed: int) -> str:
    """The output of `script` run by a new Python process with PYTHONHASHSEED=hash_seed."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


class _Scale(nn.Module):
    factor: float

    @nn.compact
    def __call__(self, x):
        return x * self.factor


def _flax_loss(module):
    """A loss closing over an unbound Flax linen module (its fields, not arrays, are what it is)."""

    def loss(p, x, y):
        out = module.apply({}, x @ p["w"], deterministic=True) if isinstance(module, nn.Dropout) else None
        out = module.apply({}, x @ p["w"]) if out is None else out
        return (out - y) ** 2

    return loss


@pytest.mark.parametrize("first, second", [(nn.Dropout(0.1), nn.Dropout(0.5)), (_Scale(1.0), _Scale(3.0))])
def test_a_store_resumed_with_a_loss_closing_over_another_flax_module_is_refused(tmp_path, first, second):
    """A loss closing over nn.Dropout(0.1) and one over nn.Dropout(0.5) (or any Flax module of other field
    values) had one identity: an export resumed with the other finished silently, mixing their rows."""
    r = np.random.default_rng(0)
    x, y = r.normal(size=(12, 4)).astype(np.float32), r.normal(size=12).astype(np.float32)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    ckpts = [({"w": jnp.asarray(r.normal(size=4), jnp.float32)}, 1.0)]
    assert callable_identity(_flax_loss(first)) == callable_identity(_flax_loss(first.clone()))
    assert callable_identity(_flax_loss(first)) != callable_identity(_flax_loss(second))
    with pytest.raises(Killed):
        export_gradients(_flax_loss(first), ckpts, FailingBatches(batches, on=2, after=1), store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"the loss function differs .*a value its closure holds changed \(module\)"):
        export_gradients(_flax_loss(second), ckpts, batches, store=tmp_path / "s", progress=False)
    resumed = export_gradients(_flax_loss(first), ckpts, batches, store=tmp_path / "s", progress=False)
    memory = export_gradients(_flax_loss(first), ckpts, batches, progress=False)
    np.testing.assert_allclose(tracin.self_influence(resumed), tracin.self_influence(memory), rtol=1e-6)
