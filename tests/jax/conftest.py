"""A small tanh MLP (5 -> 8 -> 3, softmax cross-entropy) shared by the JAX adapter tests, with a float64
NumPy reference of its per-example gradients (hand-written backprop, independent of JAX)."""

from __future__ import annotations

from operator import itemgetter
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

IN, HIDDEN, OUT = 5, 8, 3


def mlp_weights(seed: int) -> dict[str, np.ndarray]:
    """Torch-layout weights: w1 (HIDDEN, IN), b1, w2 (OUT, HIDDEN), b2 (float32)."""
    r = np.random.default_rng(seed)
    return {
        "w1": r.normal(0, 0.6, (HIDDEN, IN)),
        "b1": r.normal(0, 0.3, HIDDEN),
        "w2": r.normal(0, 0.6, (OUT, HIDDEN)),
        "b2": r.normal(0, 0.3, OUT),
    }


def as_params(w: dict) -> dict:
    """Nested-dict JAX params, kernels (in, out) as in Flax."""
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {"l1": {"kernel": f(w["w1"].T), "bias": f(w["b1"])}, "l2": {"kernel": f(w["w2"].T), "bias": f(w["b2"])}}


def hidden(params, x):
    return jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])


def cross_entropy(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def loss_fn(params, x, y):
    return cross_entropy(hidden(params, x) @ params["l2"]["kernel"] + params["l2"]["bias"], y)


def reference_grads(w: dict, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """float64 per-example gradients, keyed like the torch layout: (n, *shape) each."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    x = np.asarray(x, np.float64)
    h = np.tanh(x @ w["w1"].T + w["b1"])
    z = h @ w["w2"].T + w["b2"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d2 = p - np.eye(OUT)[y]  # dL/dz (n, OUT)
    d1 = (d2 @ w["w2"]) * (1 - h**2)  # dL/d(pre-activation) (n, HIDDEN)
    return {"w2": np.einsum("no,nh->noh", d2, h), "b2": d2, "w1": np.einsum("nh,ni->nhi", d1, x), "b1": d1, "hidden": h}


def reference_rows(ref: dict, names: list[str], transpose: set[str] = frozenset()) -> np.ndarray:
    """(n, d) float64 rows: the named reference gradients flattened and concatenated in order;
    names in `transpose` are flattened transposed ((in, out) kernels)."""
    parts = [np.swapaxes(ref[k], 1, 2) if k in transpose else ref[k] for k in names]
    return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)


@pytest.fixture
def data():
    r = np.random.default_rng(7)
    x = r.normal(size=(70, IN)).astype(np.float32)
    y = r.integers(0, OUT, 70)
    return x, y


@pytest.fixture
def mlp():
    weights = [mlp_weights(1), mlp_weights(2)]
    return SimpleNamespace(
        weights=weights,
        params=[as_params(w) for w in weights],
        lrs=[0.5, 0.125],
        loss_fn=loss_fn,
        hidden=hidden,
        cross_entropy=cross_entropy,
        as_params=as_params,
        reference_grads=reference_grads,
        reference_rows=reference_rows,
        trained=trained,
    )


def trained(x: np.ndarray, y: np.ndarray, opt, steps: tuple[int, ...] = (2, 3)) -> list[tuple]:
    """[(params, lr, optax state)] after each phase of mean-loss training with the optax `opt` from the first
    checkpoint's params (mlp.params[0]): phase i has steps[i] updates, its checkpoint lr 0.05 then 0.02."""
    import optax  # the "test" extra

    params = as_params(mlp_weights(1))
    state = opt.init(params)
    mean_loss = jax.jit(jax.grad(lambda p: loss_fn(p, x, y).mean()))
    checkpoints = []
    for lr, n in zip((0.05, 0.02), steps, strict=False):
        for _ in range(n):
            updates, state = opt.update(mean_loss(params), state, params)
            params = optax.apply_updates(params, updates)
        checkpoints.append((params, lr, state))
    return checkpoints


def jax_grad_rows(loss, params, inputs, targets) -> np.ndarray:
    """Oracle: jax.grad of each example's loss on its own (a Python loop over rows, no vmap), its gradient
    leaves flattened in jax.tree_util order and concatenated, float64. inputs / targets: pytrees of arrays
    with a leading row dimension (targets may be None)."""
    grad = jax.grad(lambda p, xi, yi: loss(p, xi, yi)[0])
    n = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    rows = []
    for i in range(n):
        g = grad(params, *jax.tree_util.tree_map(itemgetter(slice(i, i + 1)), (inputs, targets)))
        rows.append(np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree_util.tree_leaves(g)]))
    return np.stack(rows)


@pytest.fixture
def per_example_jax_grad():
    return jax_grad_rows
