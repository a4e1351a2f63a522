"""JAX adapter: per-example gradients of any JAX loss over a params pytree, for TracIn.

    def loss_fn(params, x, y):                      # per-example losses, shape (batch,): no .mean()
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y)

    checkpoints = [(params_10, 0.1), (params_20, 0.1)]  # (params, learning rate in force there)
    train = tracin.jax.export_gradients(loss_fn, checkpoints, (x_train, y_train))
    test = tracin.jax.export_gradients(loss_fn, checkpoints, (x_test, y_test))
    helpful, harmful = tracin.top_k(test, train, k=10, side="both")  # proponents, opponents
    suspects = tracin.self_influence(train).argsort()[::-1]         # likely mislabelled first

params: nested dicts, Flax linen variables, an NNX State (a copy per checkpoint), an Equinox module, or
the path of an orbax checkpoint folder / Flax msgpack file; load a pickle or an eqx.tree_serialise_leaves
file yourself and pass the pytree. Adam-trained: (params, lr, optax state) per checkpoint and
preconditioner="adam". A dict batch (tfds, Hugging Face) goes in as (batch, None), loss_fn reading the
labels from it. help(tracin.jax.export_gradients) has the rest.
"""

try:
    import jax as _jax  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "jax":
        raise
    raise ModuleNotFoundError("tracin.jax needs JAX: pip install 'tracin[jax]'", name="jax") from e

from .export import PARAM_ORDER, export_gradients

__all__ = ["PARAM_ORDER", "export_gradients"]
