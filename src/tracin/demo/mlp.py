"""The demo's two-layer MLP (64 -> hidden -> ReLU -> 10) in NumPy: initial weights, forward pass,
per-example cross-entropy, batch gradients for training and exact per-example gradients as factors.

Parameters are a dict of float32 arrays: w1 (64, hidden), b1 (hidden,), w2 (hidden, 10), b2 (10,).
Every framework of the demo starts from init_params, so they all train the same network.
"""

from __future__ import annotations

import numpy as np

Params = dict[str, np.ndarray]
LAYERS = (("w1", "b1"), ("w2", "b2"))  # (weight, bias) of each dense layer, in forward order


def init_params(n_in: int, hidden: int, n_out: int, seed: int) -> Params:
    """Weights and biases uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear default), float32."""
    rng = np.random.default_rng(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return {
        "w1": uniform((n_in, hidden), n_in),
        "b1": uniform((hidden,), n_in),
        "w2": uniform((hidden, n_out), hidden),
        "b2": uniform((n_out,), hidden),
    }


def forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (n, 64) -> (hidden activations (n, hidden), logits (n, 10)), float32."""
    h = np.maximum(x @ params["w1"] + params["b1"], 0.0)
    return h, h @ params["w2"] + params["b2"]


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example loss (n,) float64 of logits (n, classes) against integer labels y (n,)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(y)), y]


def _output_delta(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d(loss)/d(logits) per example: softmax - one_hot(y), float32 (n, 10)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p.astype(np.float32)


def _with_ones(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.ones((len(a), 1), dtype=np.float32)], axis=1)


def per_example_factors(params: Params, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact per-example gradients of the loss, one (left, right) pair per layer in LAYERS order:
    left = d(loss)/d(layer output) (n, out), right = [layer input, 1] (n, in + 1). The gradient of
    example i with respect to the layer's [weight; bias] is the outer product right[i] x left[i]."""
    h, logits = forward(params, x)
    delta2 = _output_delta(logits, y)
    delta1 = (delta2 @ params["w2"].T) * (h > 0)
    return [(delta1, _with_ones(x)), (delta2, _with_ones(h))]


def batch_gradient(params: Params, x: np.ndarray, y: np.ndarray) -> Params:
    """Gradient of the mean loss over the batch, one array per parameter (float32)."""
    grads = {}
    for (weight, bias), (left, right) in zip(LAYERS, per_example_factors(params, x, y), strict=True):
        full = right.T @ left / len(x)  # (in + 1, out): the weight's rows, then the bias
        grads[weight], grads[bias] = full[:-1], full[-1]
    return grads
