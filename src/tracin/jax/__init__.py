"""JAX adapter: per-example gradients of any JAX loss over a params pytree, for TracIn.

grads = tracin.jax.export_gradients(loss_fn, [(params, lr), ...], (inputs, targets))
"""

try:
    import jax as _jax  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "jax":
        raise
    raise ModuleNotFoundError("tracin.jax needs JAX: pip install 'tracin[jax]'", name="jax") from e

from .export import PARAM_ORDER, export_gradients

__all__ = ["PARAM_ORDER", "export_gradients"]
