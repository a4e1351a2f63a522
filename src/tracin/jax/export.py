"""export_gradients: per-example gradients of a JAX loss at each checkpoint, into a gradient set."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..gradients import FactoredGradients, Gradients
from .batches import BatchPlan
from .checkpoints import describe, parse_checkpoints, restore
from .params import as_patterns, layout_of
from .per_example import FullRows, LastLayer, check_per_example
from .sinks import MemorySink, StoreSink

DTYPES = ("float32", "float16", "bfloat16")
PARAM_ORDER = ("jax.tree_util flatten order of the params pytree (dict keys sorted, module fields in "
               "declaration order); each leaf flattened row-major; paths are keys joined by '/'")


def _dtype_name(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _check_projection(projection: Any, mode: str) -> None:
    need = "apply_factored" if mode == "last_layer" else "apply"
    if projection is not None and not (callable(getattr(projection, need, None))
                                       and callable(getattr(projection, "to_dict", None))):
        raise TypeError(f"projection must be a tracin.Projection (with .{need} and .to_dict), "
                        f"got {type(projection).__name__}")


def export_gradients(
    loss_fn: Callable[[Any, Any, Any], Any],
    checkpoints: Sequence[tuple[Any, float]],
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    mode: str = "full",
    layer_input: Callable[[Any, Any], Any] | None = None,
    projection: Any = None,
    dtype: Any = "float32",
    store: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> Gradients | FactoredGradients | Any:
    """Per-example loss gradients at each checkpoint, as TracIn gradients weighted by learning rate.

    loss_fn(params, inputs, targets) -> per-example losses, shape (batch,) (a reduced scalar is
        refused). It is differentiated one example at a time (jax.vmap of jax.grad over a batch of one).
    checkpoints: [(params, learning_rate)], params any pytree (nested dicts, Flax linen variables, NNX
        state, an Equinox module or its eqx.partition'ed arrays), or the path of an orbax checkpoint
        directory / Flax msgpack file. Every checkpoint must have the first one's structure.
    data: (inputs, targets) arrays with a leading row dimension, or an iterable of such batches
        (re-iterable when there are several checkpoints); inputs / targets may be pytrees of arrays.
    layers: path patterns choosing the parameters ("l2", "params/Dense_1/*"); default all floating
        leaves. Rows concatenate the chosen leaves in PARAM_ORDER, recorded in metadata["params"].
    mode: "full" -> Gradients, rows (n, d); "last_layer" -> FactoredGradients of the dense layer that
        `layers` names (one 2-D kernel, one 1-D bias): left dL/d(output) (n, p), right [input, 1]
        (n, q + 1), where layer_input(params, inputs) -> (batch, q) gives the layer's input.
    projection: a tracin.Projection applied to each batch of rows (segments = parameter widths).
    dtype: "float32" | "float16" | "bfloat16" of the stored rows.
    store: a directory: rows go to a tracin.GradientStore there as they are computed; an export
        killed part-way resumes where it stopped when run again with the same arguments.
    batch_size: rows per compiled call (default 64, or the first batch's size for an iterable);
        shorter batches are padded to it, so the per-example function compiles once.
    progress: show a tqdm progress bar (examples/s).

    Returns Gradients / FactoredGradients (metadata: parameter paths and shapes, layers, dtype,
    projection, ...), or the finalized GradientStore when store is given.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, inputs, targets), got {type(loss_fn).__name__}")
    if mode not in ("full", "last_layer"):
        raise ValueError(f"mode must be 'full' or 'last_layer', got {mode!r}")
    if mode == "last_layer" and (layers is None or layer_input is None):
        raise ValueError("mode='last_layer' needs layers=[path of the final dense layer] and "
                         "layer_input=fn(params, inputs) -> that layer's input, shape (batch, in_features)")
    if mode == "full" and layer_input is not None:
        raise ValueError("layer_input is only used with mode='last_layer'")
    if layer_input is not None and not callable(layer_input):
        raise TypeError(f"layer_input must be callable, got {type(layer_input).__name__}")
    _check_projection(projection, mode)
    dtype = _dtype_name(dtype)
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a directory path or None, got {type(store).__name__}")
    layers = as_patterns(layers) if layers is not None else None
    entries = parse_checkpoints(checkpoints)
    weights = [lr for _, lr in entries]
    plan = BatchPlan(data, batch_size)
    if plan.one_shot and len(entries) > 1:
        raise ValueError("data is a one-shot iterator but there are several checkpoints: pass (inputs, targets) "
                         "arrays or a re-iterable sequence of batches (e.g. a list)")
    if store is not None and plan.n_rows is None:
        raise ValueError("store= needs data of known size: (inputs, targets) arrays or a list of batches")

    first = restore(entries[0][0], "checkpoints[0]")
    factored = mode == "last_layer"
    if factored:
        compute = LastLayer(loss_fn, layer_input, first, layers)
        layout = compute.layout
        dims: tuple = (compute.p, compute.q + 1)
        params_meta = [{"path": compute.kernel_path, "shape": list(compute.kernel_shape)},
                       {"path": compute.bias_path, "shape": [compute.p]}]
    else:
        layout = layout_of(first, layers)
        compute = FullRows(loss_fn, layout, jnp.float32 if projection is not None or dtype == "float32"
                           else jnp.dtype(dtype))
        dims = (layout.dim,)
        params_meta = layout.describe()
    if projection is not None:
        dims = _projected_dims(projection, dims, layout.widths, factored)

    metadata = {
        "framework": "jax",
        "mode": mode,
        "layers": layers,
        "params": params_meta,
        "param_order": PARAM_ORDER,
        "dtype": dtype,
        "projection": projection.to_dict() if projection is not None else None,
        "checkpoints": [describe(source) for source, _ in entries],
    }
    if factored:
        metadata["last_layer"] = {"kernel": compute.kernel_path, "bias": compute.bias_path,
                                  "left": "dL/d(output)", "right": "layer input with 1 appended (bias)"}
    store_dims = [dims if factored else dims[0]] * len(entries)
    sink = (StoreSink(store, plan.n_rows, store_dims, weights, dtype, factored, metadata) if store is not None
            else MemorySink(len(entries), factored, plan.n_rows))

    bar = _progress_bar(plan.n_rows * len(entries) if plan.n_rows is not None else None, progress)
    checked = False
    try:
        for c, (source, _) in enumerate(entries):
            done = sink.rows_done(c)
            if plan.n_rows is not None and done >= plan.n_rows:
                bar.update(plan.n_rows)
                continue
            params = first if c == 0 else restore(source, f"checkpoints[{c}]")
            layout.check_same(layout_of(params, None), f"checkpoints[{c}]")
            selected, arrays = layout.split(params)
            for batch in plan:
                stop = batch.start + batch.count
                if stop <= done:
                    bar.update(batch.count)
                    continue
                if not checked:
                    check_per_example(loss_fn, layout, selected, arrays, batch)
                    if factored:
                        compute.check_layer_input(params, batch)
                    checked = True
                skip = max(0, done - batch.start)
                sink.write(c, batch.start + skip, _rows(_finish_block(compute(selected, arrays, batch), batch.count,
                                                                      projection, layout.widths, dtype), skip))
                bar.update(batch.count)
            first = None
    except BaseException:
        sink.close()
        raise
    finally:
        bar.close()
    return sink.finish(weights, metadata)


def _rows(block: Any, start: int) -> Any:
    return tuple(b[start:] for b in block) if isinstance(block, tuple) else block[start:]


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return x if x.dtype.name == dtype else x.astype(jnp.dtype(dtype))


def _finish_block(block: Any, count: int, projection: Any, widths: list[int], dtype: str) -> Any:
    """Host arrays of the real rows of a computed block, projected and cast to dtype."""
    if isinstance(block, tuple):
        left, right = (np.asarray(b)[:count] for b in block)  # host views, no device-side slice copy
        if projection is not None:
            left, right = projection.apply_factored(left, right)
        return _cast(np.asarray(left), dtype), _cast(np.asarray(right), dtype)
    rows = np.asarray(block)[:count]
    if projection is not None:
        rows = np.asarray(projection.apply(rows, segments=widths))
    return _cast(rows, dtype)


def _projected_dims(projection: Any, dims: tuple, widths: list[int], factored: bool) -> tuple:
    """Output widths of the projection, found by projecting one zero row."""
    if factored:
        left, right = projection.apply_factored(np.zeros((1, dims[0]), np.float32), np.zeros((1, dims[1]), np.float32))
        return (np.shape(left)[1], np.shape(right)[1])
    return (np.shape(projection.apply(np.zeros((1, dims[0]), np.float32), segments=widths))[1],)


def _progress_bar(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", unit_scale=True, desc="tracin.jax export", disable=not enabled)
