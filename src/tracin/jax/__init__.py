"""JAX adapter: per-example gradients of any JAX loss over a params pytree, for TracIn.

grads = tracin.jax.export_gradients(loss_fn, [(params, lr), ...], (inputs, targets))
"""

from .export import PARAM_ORDER, export_gradients

__all__ = ["PARAM_ORDER", "export_gradients"]
