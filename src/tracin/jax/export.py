"""export_gradients: per-example gradients of a JAX loss at each checkpoint, into a gradient set."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._export.fingerprint import DataFingerprint
from .._export.metadata import export_metadata, last_layer_entry
from .._progress import progress_bar
from .._export.projection import check_projection, project, projected_dims
from .._export.sinks import MemorySink, StoreSink, need_row_count
from ..gradients import FactoredGradients, Gradients
from .batches import BatchPlan
from .checkpoints import checkpoint_digest, parse_checkpoints, restore
from .params import as_patterns, layout_of
from .per_example import FullRows, LastLayer, check_per_example

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
        Every checkpoint must see the same targets in the same order (checked by fingerprints).
    layers: path patterns choosing the parameters ("l2", "params/Dense_1/*"); default all floating
        leaves. Rows concatenate the chosen leaves in PARAM_ORDER, recorded in metadata["params"].
    mode: "full" -> Gradients, rows (n, d); "last_layer" -> FactoredGradients of the dense layer that
        `layers` names (one 2-D kernel, one 1-D bias): left dL/d(output) (n, p), right [input, 1]
        (n, q + 1), where layer_input(params, inputs) -> (batch, q) gives the layer's input.
    projection: a tracin.Projection applied to each batch of rows (segments = parameter widths).
    dtype: "float32" | "float16" | "bfloat16" of the stored rows.
    store: a directory: rows go to a tracin.GradientStore there as they are computed; an export
        killed part-way resumes where it stopped when run again with the same arguments. Its
        metadata (compared on resume) holds fingerprints of all the data (read once more, up front)
        and of every checkpoint, so other data or checkpoints are refused rather than mixed in.
    batch_size: rows per compiled call (default 64, or the first batch's size for an iterable);
        shorter batches are padded to it, so the per-example function compiles once.
    progress: show a tqdm progress bar (examples/s).

    Returns Gradients / FactoredGradients (metadata: the schema of tracin._export.metadata, framework
    "jax", parameter names are the leaf paths), or the finalized GradientStore when store is given.
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
    factored = mode == "last_layer"
    check_projection(projection, factored)
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
    if store is not None:
        need_row_count(plan.n_rows)
    digests = [checkpoint_digest(source, f"checkpoints[{c}]") for c, (source, _) in enumerate(entries)]

    first = restore(entries[0][0], "checkpoints[0]")
    last = None
    if factored:
        compute: Any = LastLayer(loss_fn, layer_input, first, layers)
        layout = compute.layout
        raw_dims: Any = (compute.p, compute.q + 1)
        segments = None
        params_meta = [(compute.kernel_path, compute.kernel_shape), (compute.bias_path, (compute.p,))]
        last = last_layer_entry(compute.kernel_path.rpartition("/")[0], compute.kernel_path, compute.bias_path)
    else:
        layout = layout_of(first, layers)
        compute = FullRows(loss_fn, layout, jnp.float32)  # cast by the sink, which checks the range
        raw_dims = layout.dim
        segments = layout.widths
        params_meta = layout.describe()
    dims = projected_dims(projection, raw_dims, segments)
    metadata = export_metadata("jax", mode, params_meta, layers, dtype, projection, last_layer=last,
                               checkpoints=digests, data=None)
    fingerprint = DataFingerprint()
    if store is not None:
        fingerprint.begin("data")
        for batch in plan:
            fingerprint.batch(_host_leaves(batch.targets, batch.count), _host_leaves(batch.inputs, batch.count))
        fingerprint.end()
        metadata["fingerprints"]["data"] = fingerprint.data
        sink: Any = StoreSink(store, plan.n_rows, [dims] * len(entries), dtype, factored, weights, metadata)
    else:
        sink = MemorySink(plan.n_rows, len(entries), dtype, factored, weights, wrap=_as_array)

    bar = progress_bar(plan.n_rows * len(entries) if plan.n_rows is not None else None, progress,
                       "tracin.jax export")
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
            fingerprint.begin(f"checkpoint {c}")
            for batch in plan:
                fingerprint.batch(_host_leaves(batch.targets, batch.count),
                                  _host_leaves(batch.inputs, batch.count) if fingerprint.recording else ())
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
                block = _host_rows(compute(selected, arrays, batch), batch.count)
                if projection is not None:
                    block = project(projection, block, segments)
                sink.write(c, batch.start + skip, _rows(block, skip))
                bar.update(batch.count)
            fingerprint.end()
            first = None
        metadata["fingerprints"]["data"] = fingerprint.data
        return sink.finish(metadata)
    except BaseException:
        sink.close()
        raise
    finally:
        bar.close()


def _host_leaves(tree: Any, count: int) -> list[np.ndarray]:
    """The real rows of every array of a padded batch's pytree, on the host (for fingerprints)."""
    return [np.asarray(leaf)[:count] for leaf in jax.tree_util.tree_leaves(tree)]


def _host_rows(block: Any, count: int) -> Any:
    """Host views of the real rows of a computed block (no device-side slice copy)."""
    if isinstance(block, tuple):
        return tuple(np.asarray(b)[:count] for b in block)
    return np.asarray(block)[:count]


def _rows(block: Any, start: int) -> Any:
    return tuple(b[start:] for b in block) if isinstance(block, tuple) else block[start:]


def _as_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array as NumPy in its dtype (bfloat16 bits viewed as ml_dtypes' bfloat16, no copy)."""
    return array.view(jnp.bfloat16) if dtype == "bfloat16" else array
