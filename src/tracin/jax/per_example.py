"""Compiled per-example gradients: jax.vmap(jax.grad(loss of one example)), jit-compiled once per
batch shape (BatchPlan pads the last batch, so one compilation serves a whole export).

Each export compiles its own functions (nothing is shared between export_gradients calls): a loss
reading Python state (a global setting, a closure) is traced again by every export, as jax.grad is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .batches import Batch
from .params import ParamLayout, layout_of

LossFn = Callable[[Any, Any, Any], Any]


def _one_example_loss(loss_fn: LossFn, layout: ParamLayout) -> Callable:
    """(selected leaves, other array leaves, one input, one target) -> scalar loss: loss_fn on a
    batch of one, which vmap then maps over the batch."""

    def loss(selected, arrays, x, y):
        params = layout.merge(selected, arrays)
        batch_of_one = jax.tree_util.tree_map(lambda a: a[None], (x, y))
        return loss_fn(params, *batch_of_one)[0]

    return loss


def check_per_example(loss_fn: LossFn, layout: ParamLayout, selected: list, arrays: list, batch: Batch) -> None:
    """Raises ValueError unless loss_fn returns one loss per example (shape (batch,)), traced
    abstractly (nothing is computed)."""
    size = jax.tree_util.tree_leaves(batch.inputs)[0].shape[0]
    try:
        out = jax.eval_shape(
            lambda s, a, x, y: loss_fn(layout.merge(s, a), x, y), selected, arrays, batch.inputs, batch.targets
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"loss_fn(params, inputs, targets) failed on a batch of {size}: {err}") from err
    shape = getattr(out, "shape", None)
    if shape != (size,):
        hint = " (a mean or sum over the batch?)" if shape == () else ""
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({size},) for a batch of {size}, "
            f"got {shape if shape is not None else type(out).__name__}{hint}; return the "
            f"unreduced losses, e.g. optax.softmax_cross_entropy_with_integer_labels(...) without .mean()"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn must return floating-point losses, got dtype {out.dtype}")


class FullRows:
    """Per-example gradient rows (batch, d) of the selected parameters, in layout order.

    __call__ returns a device array of `dtype`; rows past batch.count are padding.
    """

    def __init__(self, loss_fn: LossFn, layout: ParamLayout, dtype: Any):
        per_example = jax.vmap(jax.grad(_one_example_loss(loss_fn, layout)), in_axes=(None, None, 0, 0))

        def rows(selected, arrays, inputs, targets):
            grads = per_example(selected, arrays, inputs, targets)
            flat = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in grads]
            return jnp.concatenate(flat, axis=1).astype(dtype)

        self._rows = jax.jit(rows)  # this export's own: traced on its first batch

    def __call__(self, selected: list, arrays: list, batch: Batch) -> jax.Array:
        return self._rows(selected, arrays, batch.inputs, batch.targets)


class LastLayer:
    """Factored gradients of a final dense layer y = x K + b (or K x + b): per example the left
    factor dL/dy (p,) and the right factor [x, 1] (q + 1,), whose outer product is the gradient of
    (K, b) as one (p, q + 1) block.

    dL/dy is the per-example gradient of the bias; x comes from layer_input(params, inputs) -> (batch, q).
    """

    def __init__(self, loss_fn: LossFn, layer_input: Callable, params: Any, layers: Any):
        matched = layout_of(params, layers)
        shapes = {i: matched.shapes[i] for i in matched.selected}
        biases = [i for i, s in shapes.items() if len(s) == 1]
        kernels = [i for i, s in shapes.items() if len(s) == 2]
        if len(shapes) != 2 or len(biases) != 1 or len(kernels) != 1:
            found = [f"{matched.paths[i]} {list(s)}" for i, s in shapes.items()]
            raise ValueError(
                "mode='last_layer': layers must name one dense layer, i.e. match exactly one "
                f"2-D kernel and one 1-D bias, got {found}"
            )
        self.bias_path, self.kernel_path = matched.paths[biases[0]], matched.paths[kernels[0]]
        p = shapes[biases[0]][0]
        if p not in shapes[kernels[0]]:
            raise ValueError(
                f"mode='last_layer': kernel {self.kernel_path} {list(shapes[kernels[0]])} does not "
                f"fit bias {self.bias_path} ({p},)"
            )
        self.kernel_shape = rows, cols = shapes[kernels[0]]
        self.p, self.q = p, (cols if rows == p else rows)  # kernel (p, q) as in torch/Equinox, or (q, p) as in Flax
        self.layout = layout_of(params, [self.bias_path])
        self._kernel_layout = layout_of(params, [self.kernel_path])
        self._loss_fn = loss_fn
        self._layer_input = layer_input
        layout = self.layout

        delta = jax.vmap(jax.grad(_one_example_loss(loss_fn, layout)), in_axes=(None, None, 0, 0))

        def factors(selected, arrays, inputs, targets):
            left = delta(selected, arrays, inputs, targets)[0]
            x = layer_input(layout.merge(selected, arrays), inputs)
            right = jnp.concatenate([x.astype(jnp.float32), jnp.ones((x.shape[0], 1), jnp.float32)], axis=1)
            return left.astype(jnp.float32), right

        self._factors = jax.jit(factors)

    def __call__(self, selected: list, arrays: list, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return self._factors(selected, arrays, batch.inputs, batch.targets)

    def check_layer_input(self, params: Any, batch: Batch, rows: int = 4) -> None:
        """Raises ValueError unless layer_input gives the layer's input: on a few examples, the kernel
        gradient must equal dL/dy (x) x. Run once per export, on its first batch."""
        sel, arrs = self.layout.split(params)
        try:
            x = jax.eval_shape(lambda s, a, i: self._layer_input(self.layout.merge(s, a), i), sel, arrs, batch.inputs)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument named
            raise ValueError(f"layer_input(params, inputs) failed: {err}") from err
        size = jax.tree_util.tree_leaves(batch.inputs)[0].shape[0]
        if getattr(x, "shape", None) != (size, self.q):
            raise ValueError(
                f"layer_input(params, inputs) must return the (batch, {self.q}) input of "
                f"{self.kernel_path}, got shape {getattr(x, 'shape', type(x).__name__)}"
            )
        head = Batch(0, rows, *jax.tree_util.tree_map(lambda a: a[:rows], (batch.inputs, batch.targets)))
        left, right = (np.asarray(f, np.float64) for f in self(sel, arrs, head))
        ksel, karrs = self._kernel_layout.split(params)
        grad = np.asarray(FullRows(self._loss_fn, self._kernel_layout, jnp.float32)(ksel, karrs, head), np.float64)
        outer_px = np.einsum("np,nq->npq", left, right[:, :-1]).reshape(len(left), -1)
        outer_xp = np.einsum("nq,np->nqp", right[:, :-1], left).reshape(len(left), -1)
        scale = np.linalg.norm(grad, axis=1) + 1e-30
        fits = [
            np.all(np.linalg.norm(grad - o, axis=1) <= 1e-4 * scale + 1e-6 * np.linalg.norm(o, axis=1))
            for o in (outer_px, outer_xp)
        ]
        if not any(fits):
            raise ValueError(
                f"layer_input(params, inputs) does not return the input of {self.kernel_path}: "
                "its per-example gradient is not dL/d(output) (x) input"
            )
