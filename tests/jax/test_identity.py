"""Fingerprints of JAX objects a loss or a params pytree holds: typed PRNG keys, and static fields
holding sets (whose repr depends on PYTHONHASHSEED), digested the same way in every process."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import typing

import equinox as eqx
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


class _Net(nn.Module):
    """A Flax linen module whose setup() (run on first use of a bound module) adds its submodules."""

    rate: float = 0.1

    def setup(self):
        self.dense = nn.Dense(3)
        self.drop = nn.Dropout(self.rate, deterministic=True)

    def __call__(self, x):
        return self.drop(self.dense(x))

    def loss(self, p, x, y):
        out = _Net(self.drop.rate, parent=None).apply(p, x)  # self.drop: runs setup() on a bound module
        return ((out - y) ** 2).sum(1)


def test_a_bound_flax_modules_loss_resumes_its_store_after_its_setup_ran(tmp_path):
    """The identity read a bound Flax module's __dict__, which setup() grows once the loss has run: the
    same b.loss was refused ('the loss function differs') resuming its own store."""
    r = np.random.default_rng(0)
    x, y = r.normal(size=(20, 2)).astype(np.float32), r.normal(size=(20, 3)).astype(np.float32)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)]
    v = _Net().init(jax.random.key(0), x[:1])
    bound = _Net().bind(v)
    before = callable_identity(bound.loss)
    assert "self{'name': None, 'rate': 0.1}" in before
    with pytest.raises(Killed):
        export_gradients(bound.loss, [(v, 1.0)], FailingBatches(batches, on=2, after=2), store=tmp_path / "s")
    assert "dense" in bound.__dict__ and callable_identity(bound.loss) == before  # setup() ran: the same loss
    with pytest.raises(ValueError, match=r"the loss function differs .*'rate': 0.5"):
        export_gradients(_Net(0.5).bind(v).loss, [(v, 1.0)], batches, store=tmp_path / "s", progress=False)
    resumed = export_gradients(bound.loss, [(v, 1.0)], batches, store=tmp_path / "s", progress=False)
    # float64 NumPy reference: the gradient of |x K + b - y|^2 is (x, 1) outer 2 (x K + b - y)
    kernel, bias = (np.asarray(v["params"]["dense"][k], np.float64) for k in ("kernel", "bias"))
    residual = 2 * (x.astype(np.float64) @ kernel + bias - y)
    expected = ((x.astype(np.float64) ** 2).sum(1) + 1) * (residual**2).sum(1)
    np.testing.assert_allclose(tracin.self_influence(resumed), expected, rtol=1e-4)


class _EqxScale(eqx.Module):
    s: float


class _EqxHead(eqx.Module):
    """An Equinox module keeping its layers in a tuple, with its activation as a field."""

    layers: tuple
    act: typing.Callable = jax.nn.relu

    def loss(self, p, x, y):
        z = x @ p["K"]
        for layer in self.layers:
            z = z * layer.s
        return ((self.act(z) - y) ** 2).sum(1)


def test_an_equinox_loss_method_is_identified_by_its_tuple_of_layers_and_its_activation(tmp_path):
    """The object of a bound method was not read for its tuples of submodules nor its functions:
    Head((Scale(1.0),)).loss resumed with Head((Scale(100.0),)).loss finished silently, mixing rows."""
    r = np.random.default_rng(1)
    x, y = r.normal(size=(16, 2)).astype(np.float32), r.normal(size=(16, 3)).astype(np.float32)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    ckpts = [({"K": jnp.asarray(r.normal(size=(2, 3)), jnp.float32)}, 1.0)]
    first = _EqxHead((_EqxScale(1.0),))
    assert callable_identity(first.loss) == callable_identity(_EqxHead((_EqxScale(1.0),)).loss)
    assert callable_identity(first.loss) != callable_identity(_EqxHead((_EqxScale(1.0),), jax.nn.gelu).loss)
    with pytest.raises(Killed):
        export_gradients(first.loss, ckpts, FailingBatches(batches, on=2, after=2), store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"the loss function differs .*_EqxScale\(s=100.0\)"):
        export_gradients(_EqxHead((_EqxScale(100.0),)).loss, ckpts, batches, store=tmp_path / "s", progress=False)
    resumed = export_gradients(first.loss, ckpts, batches, store=tmp_path / "s", progress=False)
    memory = export_gradients(first.loss, ckpts, batches, progress=False)
    np.testing.assert_allclose(tracin.self_influence(resumed), tracin.self_influence(memory), rtol=1e-6)


_ACTIVATIONS = """
import equinox as eqx, flax.linen as nn, jax
from tracin._export.fingerprint import callable_identity

class Net(nn.Module):
    act: object = nn.relu

    @nn.compact
    def __call__(self, x):
        return self.act(nn.Dense(3)(x))

    def loss(self, p, x, y):
        return self.apply(p, x).sum(1)

def closing(m):
    def loss(p, x, y):
        return m(x)
    return loss

mlps = [eqx.nn.MLP(2, 2, 4, 1, activation=a, key=jax.random.key(0)) for a in (jax.nn.relu, jax.nn.tanh)]
losses = [closing(Net(nn.relu)), closing(Net(nn.gelu)), Net(nn.relu).loss, Net(nn.gelu).loss]
for loss in losses + [closing(m) for m in mlps] + [m.__call__ for m in mlps]:
    print(callable_identity(loss))
"""


def test_activation_functions_flax_and_equinox_modules_hold_are_their_identity_in_every_process():
    """Net(act=nn.relu) and Net(act=nn.gelu), an Equinox MLP with relu and one with tanh, had one identity."""
    outputs = [_run(_ACTIVATIONS, seed) for seed in (1, 2)]
    assert outputs[0] == outputs[1]
    lines = outputs[0].splitlines()
    assert len(lines) == len(set(lines)) == 8
    assert "'act': 'relu'" in lines[2] and "'act': 'gelu'" in lines[3]


_SETTINGS = """
import equinox as eqx, flax.linen as nn, jax, jax.numpy as jnp
from tracin._export.fingerprint import callable_identity

class Net(nn.Module):
    heads: dict

    def loss(self, p, x, y):
        return x.sum(1)

class Scale(eqx.Module):
    s: float

class Head(eqx.Module):
    layers: dict

    def loss(self, p, x, y):
        return x.sum(1)

def closing(m):
    def loss(p, x, y):
        return m.apply(p, x).sum(1)
    return loss

P = jax.lax.Precision
losses = [
    Net({"b": nn.Dense(3), "a": nn.Dropout(0.1)}).loss,
    Net({"a": nn.Dropout(0.1), "b": nn.Dense(3)}).loss,
    Net({"a": nn.Dropout(0.9), "b": nn.Dense(3)}).loss,
    Head({"a": Scale(1.0)}).loss,
    Head({"a": Scale(100.0)}).loss,
    closing(nn.Dense(3, precision=P.HIGHEST)),
    closing(nn.Dense(3, precision=P.DEFAULT)),
    closing(nn.Dense(3, dtype=jnp.bfloat16)),
    closing(nn.Dense(3, dtype=jnp.float32)),
]
for loss in losses:
    print(callable_identity(loss))
"""


def test_dicts_of_submodules_precisions_and_dtypes_are_the_identity_in_every_process():
    """Net(heads={"a": nn.Dropout(0.1)}) and 0.9, Dense(precision=HIGHEST) and DEFAULT, Dense(dtype=bfloat16)
    and float32, an Equinox Head({"a": Scale(1.0)}) and Scale(100.0) had one identity each."""
    outputs = [_run(_SETTINGS, seed) for seed in (1, 2)]
    assert outputs[0] == outputs[1]
    lines = outputs[0].splitlines()
    assert len(lines) == 9 and lines[0] == lines[1] and len(set(lines)) == 8
    assert "'heads': 'dict digest=" in lines[0] and "'layers': \"{'a': Scale(s=1.0)}\"" in lines[3]


class _EqxDictHead(eqx.Module):
    layers: dict

    def loss(self, p, x, y):
        z = x @ p["K"]
        for layer in self.layers.values():
            z = z * layer.s
        return ((z - y) ** 2).sum(1)


def test_an_equinox_loss_holding_a_dict_of_submodules_is_refused_resuming_with_other_ones(tmp_path):
    """Head({"a": Scale(1.0)}).loss killed and resumed with Scale(100.0) finished silently, mixing rows."""
    r = np.random.default_rng(2)
    x, y = r.normal(size=(16, 2)).astype(np.float32), r.normal(size=(16, 3)).astype(np.float32)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    ckpts = [({"K": jnp.asarray(r.normal(size=(2, 3)), jnp.float32)}, 1.0)]
    first = _EqxDictHead({"a": _EqxScale(1.0)})
    with pytest.raises(Killed):
        export_gradients(first.loss, ckpts, FailingBatches(batches, on=2, after=2), store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"the loss function differs .*_EqxScale\(s=100.0\)"):
        export_gradients(_EqxDictHead({"a": _EqxScale(100.0)}).loss, ckpts, batches, store=tmp_path / "s")
    resumed = export_gradients(first.loss, ckpts, batches, store=tmp_path / "s", progress=False)
    memory = export_gradients(first.loss, ckpts, batches, progress=False)
    np.testing.assert_allclose(tracin.self_influence(resumed), tracin.self_influence(memory), rtol=1e-6)


class _Rates(nn.Module):
    """The Flax docs' idiom: Sequence fields given as lists (dropout rates change no parameter's shape)."""

    features: typing.Sequence[int]
    rates: typing.Sequence[float]

    @nn.compact
    def __call__(self, x, train=False):
        for f, r in zip(self.features, self.rates, strict=True):
            x = nn.Dropout(r, deterministic=not train)(nn.relu(nn.Dense(f)(x)))
        return x

    def loss(self, x, y):
        return ((self(x) - y) ** 2).sum(1)


class _FlaxHeads(nn.Module):
    heads: dict

    def loss(self, x, y):
        return x.sum(1)


class _EqxListHead(eqx.Module):
    scales: list

    def loss(self, p, x, y):
        z = x @ p["K"]
        for s in self.scales:
            z = z * s
        return ((z - y) ** 2).sum(1)


def test_list_fields_of_flax_and_equinox_modules_count_with_their_plain_values(tmp_path):
    """Flax MLP(rates=[0.1, 0.1]) and [0.5, 0.9], Equinox Head(scales=[1.0]) and [100.0] had one identity
    each: Head([1.0]).loss killed and resumed with Head([100.0]).loss finished silently, mixing rows. A bound
    Flax module's dict fields (FrozenDicts) were left out."""
    a, b = _Rates([4, 2], [0.1, 0.1]), _Rates([4, 2], [0.5, 0.9])
    assert callable_identity(_flax_loss(a)) != callable_identity(_flax_loss(b))
    before = callable_identity(a.loss)
    assert before != callable_identity(b.loss) and "'rates': '(0.1, 0.1)'" in before
    x = jnp.ones((1, 3))
    bound = a.bind(a.init(jax.random.PRNGKey(0), x))
    bound.loss(x, jnp.ones((1, 2)))
    assert callable_identity(bound.loss) == before  # the same after init, bind (lists made tuples) and a call
    # a dict field, which binding makes a FrozenDict, counts too
    heads = [_FlaxHeads({"a": nn.Dropout(r), "b": 1.0}) for r in (0.1, 0.9)]
    bound_heads = [m.bind({}) for m in heads]
    assert callable_identity(bound_heads[0].loss) != callable_identity(bound_heads[1].loss)
    assert callable_identity(heads[0].loss) != callable_identity(heads[1].loss)
    r = np.random.default_rng(3)
    x, y = r.normal(size=(16, 2)).astype(np.float32), r.normal(size=(16, 3)).astype(np.float32)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    ckpts = [({"K": jnp.asarray(r.normal(size=(2, 3)), jnp.float32)}, 1.0)]
    first = _EqxListHead([1.0])
    with pytest.raises(Killed):
        export_gradients(first.loss, ckpts, FailingBatches(batches, on=2, after=2), store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"the loss function differs .*'scales': '\(100.0\)'"):
        export_gradients(_EqxListHead([100.0]).loss, ckpts, batches, store=tmp_path / "s", progress=False)
    resumed = export_gradients(first.loss, ckpts, batches, store=tmp_path / "s", progress=False)
    memory = export_gradients(first.loss, ckpts, batches, progress=False)
    np.testing.assert_allclose(tracin.self_influence(resumed), tracin.self_influence(memory), rtol=1e-6)
