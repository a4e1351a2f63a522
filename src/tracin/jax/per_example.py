"""Compiled per-example gradients: jax.vmap(jax.grad(loss of one example)), jit-compiled once per
batch shape (BatchPlan pads every batch to one row count, so data of one input shape compiles once;
each other shape of the other axes, a new sequence length, compiles again; a data set smaller than the
batch size compiles once for its row count).

The compiled functions are shared by later exports with the same loss_fn object (shared_jit): like
jax.jit, a loss is traced once, so one reading a Python setting must be passed as a new function
(functools.partial(loss, temperature=4.0)) when the setting changes."""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, jaxprs_in_params

from .._export.loss_watch import LossWatch as SharedLossWatch
from ..projection import NonFiniteRowError
from .batches import Batch
from .params import ParamLayout, bundle_hint, layout_of

LossFn = Callable[[Any, Any, Any], Any]

_CACHE_SIZE = 8
_shared: OrderedDict[tuple, Callable] = OrderedDict()


class _Held:
    """A function held weakly and compared by identity: weakref.ref and WeakMethod compare their
    referents with ==, which would let two equal but distinct losses (a dataclass's bound methods)
    share a compilation. A bound method is held by its object and function, as it is made anew on
    each attribute access."""

    __slots__ = ("ref", "ident")

    def __init__(self, fn: Callable, on_death: Callable):
        self.ref = weakref.WeakMethod(fn, on_death) if _bound(fn) else weakref.ref(fn, on_death)
        self.ident = _ident(fn)

    def __hash__(self) -> int:
        return hash(self.ident)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Held) and self.ident == other.ident


def _bound(fn: Callable) -> bool:
    return hasattr(fn, "__self__") and hasattr(fn, "__func__")


def _ident(fn: Callable) -> tuple[int, ...]:
    return (id(fn.__self__), id(fn.__func__)) if _bound(fn) else (id(fn),)


def _drop(dead: weakref.ref) -> None:
    """Removes the entries of a collected function (so the cache never keeps a loss or its closure
    alive, and an id reused by a later object never meets an old entry)."""
    for key in [k for k in list(_shared) if any(h.ref is dead for h in k[0])]:
        _shared.pop(key, None)


def _calling(ref: weakref.ref) -> Callable:
    def call(*args: Any) -> Any:
        fn = ref()
        if fn is None:  # cannot happen while an export holds it: entries go with their functions
            raise RuntimeError("a function compiled by tracin.jax was collected while in use")
        return fn(*args)

    return call


def shared_jit(fns: tuple[Callable, ...], key: tuple, build: Callable[..., Callable]) -> Callable:
    """jax.jit(build(*fns)), shared by later exports with the same function objects `fns` (loss_fn,
    layer_input) and an equal `key` (mode, ParamLayout, dtype...: whatever else shapes the traced
    function; batch shapes and dtypes are jax.jit's own cache key), so exporting train and test sets
    traces once. `fns` are compared by identity and held weakly (build gets callers through weak
    references; an entry goes when one of its functions is collected) and the last _CACHE_SIZE entries
    are kept. Functions that cannot be weakly referenced, or an unhashable key (a static params leaf),
    compile for this export only."""
    try:
        held = tuple(_Held(fn, _drop) for fn in fns)
        full = (held, key)
        hash(full)
    except TypeError:
        return jax.jit(build(*fns))
    if full not in _shared:
        _shared[full] = jax.jit(build(*(_calling(h.ref) for h in held)))
        while len(_shared) > _CACHE_SIZE:
            _shared.popitem(last=False)
    _shared.move_to_end(full)
    return _shared[full]


def _one_example_loss(loss_fn: LossFn, layout: ParamLayout) -> Callable:
    """(selected leaves, other array leaves, one input, one target) -> scalar loss: loss_fn on a
    batch of one, which vmap then maps over the batch."""

    def loss(selected, arrays, x, y):
        params = layout.merge(selected, arrays)
        batch_of_one = jax.tree_util.tree_map(lambda a: a[None], (x, y))
        return loss_fn(params, *batch_of_one)[0]

    return loss


def check_per_example(
    loss_fn: LossFn,
    layout: ParamLayout,
    selected: list,
    arrays: list,
    batch: Batch,
    note: str = "",
    where: str = "",
) -> float:
    """Raises ValueError unless loss_fn returns one loss per example (shape (batch,)), traced
    abstractly (nothing is computed); returns the eps it computes to (compute_eps), which the checks
    on concrete values allow for. note: appended to the errors (how the data was read); where: which
    batch, put after its size ("rows 4 to 7 of the data, ...")."""
    size = jax.tree_util.tree_leaves(batch.inputs)[0].shape[0]
    padded = f", {batch.count} rows padded to {size}" if batch.count < size else ""
    padded = f" ({where}{padded})" if where else f" ({padded[2:]})" if padded else ""
    try:
        closed, out = jax.make_jaxpr(lambda s, a, x, y: loss_fn(layout.merge(s, a), x, y), return_shape=True)(
            selected, arrays, batch.inputs, batch.targets
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(
            f"loss_fn(params, inputs, targets) failed on a batch of {size}{padded}: {type(err).__name__}: {err}"
            # a TrainState, or a whole training checkpoint's dict: not another model version
            f"{_container_hint(err, layout) or bundle_hint(layout) or _lookup_hint(err, layout)}{note}"
        ) from err
    shape = getattr(out, "shape", None)
    if isinstance(out, (tuple, list)):  # the (loss, aux) of jax.value_and_grad(..., has_aux=True)
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({size},) for a batch of {size}{padded}, got a "
            f"{type(out).__name__} of {len(out)} (a (losses, aux) pair, as for has_aux=True?); tracin takes no aux "
            f"output: return the per-example losses alone{note}"
        )
    if shape != (size,):
        hint = " (a mean or sum over the batch?)" if shape == () else ""
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({size},) for a batch of {size}{padded}, "
            f"got {shape if shape is not None else type(out).__name__}{hint}; return the "
            f"unreduced losses, e.g. optax.softmax_cross_entropy_with_integer_labels(...) without .mean(){note}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn must return floating-point losses, got dtype {out.dtype}")
    return compute_eps(closed)


def _lookup_hint(err: Exception, layout: ParamLayout) -> str:
    """For a failed lookup in loss_fn (a KeyError, AttributeError or IndexError, a TypeError indexing a
    container: "list indices must be integers or slices, not str", "'NoneType' object is not subscriptable",
    JAX's "does not support string indexing" for an array where the loss expects a dict),
    the params' top-level paths (the first 8), so a checkpoint of another model version ('W' where the loss
    reads p["w"]) is recognised; "" for other errors. Not given with _container_hint's (the loss read a
    TrainState as the params: not another model version)."""
    indexing = isinstance(err, TypeError) and any(
        words in str(err) for words in ("not subscriptable", "indices must be integers", "string indexing")
    )
    if not indexing and not isinstance(err, (KeyError, AttributeError, IndexError)):
        return ""
    top = [name for name in dict.fromkeys(path.split("/")[0] for path in layout.paths) if name]
    if not top:
        return ""
    shown = ", ".join(repr(name) for name in top[:8]) + (f", ... ({len(top)} in all)" if len(top) > 8 else "")
    return f"; the params' top-level paths are {shown} (a checkpoint of another model version than the loss reads?)"


def _container_hint(err: Exception, layout: ParamLayout) -> str:
    """For a loss that fails on the very object passed as a checkpoint (a Flax TrainState, another dataclass
    or registered node, named in the error: "argument of type 'TrainState' is not iterable"): that loss_fn
    gets each checkpoint as given, and how to reach its parameters; "" for other errors and plain containers."""
    node = layout.treedef.node_data() if layout.treedef.num_nodes > 1 else None
    kind = node[0] if node else None
    if kind is None or not isinstance(kind, type) or issubclass(kind, (Mapping, list)) or kind is tuple:
        return ""  # plain containers, an OrderedDict or a FrozenDict included
    if any("__call__" in vars(c) for c in kind.__mro__[:-1]):
        return ""  # a model called inside loss_fn (an Equinox or NNX module): it is the parameters
    if kind.__name__ not in str(err) or not isinstance(err, (TypeError, AttributeError, KeyError)):
        return ""
    names = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else set()
    fields = " (state.params for a Flax TrainState, or state.apply_fn(...))" if "params" in names else ""
    return (
        f"; loss_fn gets each checkpoint as given, here a {kind.__name__}: read its parameters inside loss_fn"
        f"{fields}, or pass the parameters alone as the checkpoint"
    )


def compute_eps(closed: ClosedJaxpr) -> float:
    """The machine epsilon of the coarsest floating dtype a traced function computes in: that of the
    values its operations produce (nested jaxprs included), so a float32 model running
    nn.Dense(dtype=bfloat16) counts as bfloat16. The function's inputs and casts to a finer dtype round
    nothing and do not count (float16 inputs cast to float32, an unused bfloat16 leaf in params). A
    float32 matrix product at JAX's default precision counts as TF32 on a GPU (eps 2**-10) and bfloat16
    on a TPU, which round its inputs so (unless the product, or jax_default_matmul_precision, asks for
    'highest' / 'float32')."""
    eps = [float(jnp.finfo(jnp.float32).eps)]

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                eps.append(_product_eps(eqn))
            outs = [_eps_of(v) for v in eqn.outvars]
            if eqn.primitive.name == "convert_element_type" and outs[0] <= _eps_of(eqn.invars[0]):
                outs = []  # exact: a cast to a finer (or the same) dtype
            eps.extend(outs)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    return max(eps)


def _eps_of(var: Any) -> float:
    """The eps of a jaxpr value's floating dtype; 0 for other dtypes (integers, keys, tokens)."""
    dtype = getattr(getattr(var, "aval", None), "dtype", None)
    try:
        return float(jnp.finfo(dtype).eps) if dtype is not None and jnp.issubdtype(dtype, jnp.floating) else 0.0
    except TypeError:  # extended dtypes (PRNG keys)
        return 0.0


_ROUNDED_PRODUCTS = {"gpu": 2.0**-10, "tpu": float(jnp.finfo(jnp.bfloat16).eps)}  # TF32, bfloat16


def _product_eps(eqn: Any) -> float:
    """The eps a matrix product or convolution `eqn` rounds its float32 inputs to: that of TF32 / bfloat16
    on GPU / TPU at the default precision, else 0."""
    exact = ("highest", "float32")
    precision = eqn.params.get("precision")
    asked = [str(p).lower() for p in (precision if isinstance(precision, tuple) else (precision,)) if p is not None]
    if any(a.endswith("highest") for a in asked) or jax.config.jax_default_matmul_precision in exact:
        return 0.0
    if not all(getattr(v.aval, "dtype", None) == jnp.float32 for v in eqn.invars):
        return 0.0
    return _ROUNDED_PRODUCTS.get(jax.default_backend(), 0.0)


_CHECK_ROWS = 4  # examples of the first batch check_uncoupled runs on


def check_uncoupled(
    loss_fn: LossFn,
    layout: ParamLayout,
    selected: list,
    arrays: list,
    batch: Batch,
    eps: float,
    note: str = "",
) -> None:
    """After check_per_example, on concrete params: raises ValueError when the losses of the batch's
    first examples change with the batch they are in: loss_fn on its first _CHECK_ROWS real examples
    against loss_fn on the first half of them (run eagerly). Each example is differentiated alone, so
    a loss using the batch (a batch mean, batch norm in training mode, in-batch negatives) would give
    rows of another loss. Tolerance (uncoupled_rtol) relative to the largest finite loss.

    The loss sees what the compiled functions give it: the array leaves of params (`selected`,
    `arrays`, split by `layout`) and of the batch as JAX arrays, never the NumPy arrays of a NumPy
    pytree or a Flax msgpack checkpoint (a loss may use JAX-only behaviour: E.at[0].set(0.0), a
    gather clamping an id past the table). A loss failing here is a ValueError naming loss_fn."""
    m = min(_CHECK_ROWS, batch.count)
    if m < 2:
        return
    params = layout.merge([jnp.asarray(a) for a in selected], [jnp.asarray(a) for a in arrays])
    losses = []
    for k in (m, m // 2):
        try:
            head = jax.tree_util.tree_map(lambda a, k=k: jnp.asarray(a[:k]), (batch.inputs, batch.targets))
            losses.append(loss_fn(params, *head))
        except Exception as err:  # noqa: BLE001 - re-raised with the argument named
            raise ValueError(
                f"loss_fn(params, inputs, targets) failed on the first {k} examples of the data, run eagerly "
                f"on the checkpoint's params as JAX arrays: {err}{note}"
            ) from err
    for k, out in zip((m, m // 2), losses, strict=True):
        shape = getattr(out, "shape", None)
        if shape != (k,):  # e.g. a reduction over the batch axis whose other axis happens to equal the batch size
            raise ValueError(
                f"loss_fn must return per-example losses of shape ({k},) for a batch of {k}, got "
                f"{shape if shape is not None else type(out).__name__} (run eagerly on the first {k} examples of "
                f"the data: the batch of {jax.tree_util.tree_leaves(batch.inputs)[0].shape[0]} gave the right "
                "shape only by coincidence; a mean or sum over the batch axis instead of another one?); return "
                f"the unreduced losses, one per example (e.g. token losses reduced over the sequence axis){note}"
            )
    whole, half = (np.asarray(a, np.float64) for a in losses)
    rtol = uncoupled_rtol(eps, losses[0].dtype)
    scale = np.max(np.abs(whole[np.isfinite(whole)]), initial=0.0)  # an inf loss (say float16's) sets no scale
    if not np.allclose(half, whole[: m // 2], rtol=rtol, atol=rtol * scale, equal_nan=True):
        raise ValueError(
            f"loss_fn couples the examples of a batch: the losses of the first {m // 2} examples are "
            f"{half.tolist()} in a batch of {m // 2} and {whole[: m // 2].tolist()} in a batch of {m}. "
            "tracin differentiates each example alone (a batch of one), so its rows would be gradients of "
            "another loss: make each example's loss depend on that example only (no batch mean or batch "
            f"statistics, no in-batch negatives, no random draws shaped by the batch){note}"
        )


def uncoupled_rtol(eps: float, loss_dtype: Any) -> float:
    """check_uncoupled's relative tolerance. On a CPU, batches of 4 and 2 rows round alike: 1e-4, or 8
    eps of the losses' dtype. On a GPU or TPU they may run other kernels (summing in another order, TF32
    or bfloat16 products): 1e-3 or 8 `eps` (the coarsest dtype the loss computes in, compute_eps).
    Never above 8 eps of bfloat16 (0.0625), so a float8 value cannot switch the check off: coupling is
    O(1)."""
    own = 8 * float(jnp.finfo(loss_dtype).eps)
    if jax.default_backend() in _ROUNDED_PRODUCTS:
        return min(max(1e-3, 8 * eps, own), _RTOL_CAP)
    return min(max(1e-4, own), _RTOL_CAP)


_RTOL_CAP = 8 * float(jnp.finfo(jnp.bfloat16).eps)


def _float32_rows(blocks: list) -> tuple[list, Any]:
    """(blocks as float32, per row whether a finite value of a wider block (float64: x64 params) became
    inf in float32, or None when no block is wider); inside the compiled functions."""
    narrowed = [b.astype(jnp.float32) for b in blocks]
    wide = [(b, n) for b, n in zip(blocks, narrowed, strict=True) if jnp.dtype(b.dtype).itemsize > 4]
    if not wide:
        return narrowed, None
    return narrowed, jnp.stack([jnp.any(jnp.isfinite(b) & ~jnp.isfinite(n), axis=1) for b, n in wide]).any(axis=0)


def _check_float32_range(beyond: Any, count: int) -> None:
    """Raises NonFiniteRowError (a ValueError naming the first such row of the block; the export names it as
    the data's row) when one of the `count` real rows holds a float64 value beyond float32's range: tracin
    keeps rows in float32 at most, so it would be stored as inf (and refused by scoring as a NaN loss)."""
    if beyond is None:
        return
    flags = np.asarray(beyond)[:count]
    if flags.any():
        raise NonFiniteRowError(
            "row {} holds float64 gradient values beyond the float32 range (|x| > "
            f"{float(np.finfo(np.float32).max):g}), the first such row: tracin keeps rows in float32 at most; "
            "scale the loss down (its gradients and every score scale with it)",
            int(np.argmax(flags)),
        )


class LossWatch(SharedLossWatch):
    """_export.loss_watch.LossWatch in jax.grad's words, from the per-example losses the compiled functions
    give with their gradients (jax.value_and_grad): an out-of-range label read with jnp.take_along_axis (the
    -100 'ignore' label of Hugging Face data, or label == classes) gives a NaN loss and a gradient of 0."""

    def __init__(self) -> None:
        super().__init__(
            "jax.grad",
            "a label outside [0, classes) read with take_along_axis or optax's integer-label cross entropy, "
            "such as the -100 'ignore' label",
        )


def _watch(watch: LossWatch | None, losses: Any, batch: Batch) -> None:
    if watch is not None:
        watch(losses, batch)


class FullRows:
    """Per-example gradient rows (batch, d) of the selected parameters, in layout order.

    __call__ returns a device array of `dtype`; rows past batch.count are padding.
    watch: given the per-example losses of each batch (LossWatch), if not None.
    """

    def __init__(self, loss_fn: LossFn, layout: ParamLayout, dtype: Any, watch: LossWatch | None = None):
        def build(loss: LossFn) -> Callable:
            one = jax.value_and_grad(_one_example_loss(loss, layout))
            per_example = jax.vmap(one, in_axes=(None, None, 0, 0))

            def rows(selected, arrays, inputs, targets):
                losses, grads = per_example(selected, arrays, inputs, targets)
                flat = [g.reshape(g.shape[0], -1) for g in grads]
                narrowed, beyond = _float32_rows(flat)
                return jnp.concatenate(narrowed, axis=1).astype(dtype), beyond, losses

            return rows

        self._rows = shared_jit((loss_fn,), ("rows", layout, jnp.dtype(dtype).name), build)
        self.watch = watch

    def __call__(self, selected: list, arrays: list, batch: Batch) -> jax.Array:
        """The rows; a ValueError (naming the row of the block, which the export renumbers as the data's)
        when a float64 gradient (x64 params) of a real row is finite but beyond float32's range, as the
        rows are float32 from here on (rather than stored as inf and refused by scoring as a NaN loss)."""
        rows, beyond, losses = self._rows(selected, arrays, batch.inputs, batch.targets)
        _check_float32_range(beyond, batch.count)
        _watch(self.watch, losses, batch)
        return rows


class LastLayer:
    """Factored gradients of a final dense layer y = x K + b (or K x + b), or of a bias-free one y = x K:
    per example the left factor dL/dy (p,) and the right factor [x, 1] (q + 1,) (x (q,) without a bias),
    whose outer product is the gradient of (K, b) as one (p, q + 1) block (of K, (p, q)), as tracin.torch
    factors an nn.Linear with or without a bias.

    dL/dy is the per-example gradient of the bias; without one, the gradient of a zero added to the output
    of the kernel's one dot_general (the loss's jaxpr run with a tap there, jaxpr_taps), traced for each
    batch shape: exact, with no kernel gradient formed. x comes from layer_input(params, inputs) ->
    (batch, q). A bias-free layer's p and q (which side of the kernel meets x) are read off that
    dot_general by `orient`, on the first batch.
    """

    def __init__(
        self, loss_fn: LossFn, layer_input: Callable, params: Any, layers: Any, watch: LossWatch | None = None
    ):
        self.watch = watch
        matched = layout_of(params, layers)
        shapes = {i: matched.shapes[i] for i in matched.selected}
        biases = [i for i, s in shapes.items() if len(s) == 1]
        kernels = [i for i, s in shapes.items() if len(s) == 2]
        if len(kernels) != 1 or len(biases) > 1 or len(shapes) != len(kernels) + len(biases):
            found = [f"{matched.paths[i]} {list(s)}" for i, s in shapes.items()]
            raise ValueError(
                "mode='last_layer': layers must name one dense layer, i.e. match exactly one "
                f"2-D kernel and at most one 1-D bias (none for a bias-free layer), got {found}"
            )
        self.kernel_path = matched.paths[kernels[0]]
        self.bias_path = matched.paths[biases[0]] if biases else None
        self.kernel_shape = rows, cols = shapes[kernels[0]]
        self.p: int | None = None
        self.q: int | None = None
        self.contract: int | None = None  # the kernel axis x meets (0: x K as in Flax, 1: K x as in torch), if known
        if self.bias_path is not None:
            p = shapes[biases[0]][0]
            if p not in self.kernel_shape:
                raise ValueError(
                    f"mode='last_layer': kernel {self.kernel_path} {list(self.kernel_shape)} does not "
                    f"fit bias {self.bias_path} ({p},)"
                )
            self.p, self.q = p, (cols if rows == p else rows)  # kernel (p, q) as in torch/Equinox, or (q, p) as in Flax
        self.layout = layout_of(params, [self.bias_path if self.bias_path is not None else self.kernel_path])
        self._kernel_layout = layout_of(params, [self.kernel_path])
        self._loss_fn = loss_fn
        self._layer_input = layer_input
        self._avals = tuple(_avals(part) for part in self.layout.split(params))
        self._factors: Callable | None = None
        self._rtol: float | None = None  # the layer_input check's tolerance (check_layer_input), once known
        self.checkpoint = 0  # the checkpoint computed, named by the layer_input check (set by the export)
        self._tapped = self.bias_path is None  # layer_input checked on every row at the kernel's tap (__call__)
        self._probed_at: int | None = None  # with a bias, the checkpoint whose kernel gradient was checked
        if self.bias_path is not None:
            # the kernel (p, q) as in torch / Equinox, (q, p) as in Flax; a square one either way
            sides = ("px", "xp") if rows == cols else ("px",) if rows == self.p else ("xp",)
            kernel_pos = self.layout.arrays.index(self._kernel_layout.selected[0])
            build = _bias_factors(self.layout, self._kernel_layout, kernel_pos, self.q, sides)
            key = ("last_layer", self.layout, self._kernel_layout)
            self._factors = shared_jit((loss_fn, layer_input), key, build)

    @property
    def dims(self) -> tuple[int, int] | None:
        """(p, q + 1), (p, q) without a bias; None for a bias-free layer not yet oriented."""
        if self.p is None:
            return None
        return (self.p, self.q + (self.bias_path is not None))

    def orient(self, batch: Batch, note: str = "") -> None:
        """A bias-free layer: reads p, q and the kernel's orientation off the one dot_general that uses
        the kernel in the loss of one example of `batch` (ValueError when there is no such product), and
        compiles the factors for it. Nothing for a layer with a bias. note: how the data was read."""
        if self._factors is not None:
            return
        check_per_example(self._loss_fn, self.layout, *self._avals, batch, note)  # its errors before the tracer's
        example = _avals((batch.inputs, batch.targets), strip=1)
        _, site = _kernel_site(self._loss_fn, self.layout, *self._avals, example, self.kernel_path, self.kernel_shape)
        rows, cols = self.kernel_shape
        self.contract = site.contract
        self.p, self.q = (cols, rows) if site.contract == 0 else (rows, cols)
        key = ("last_layer", self.layout, "bias-free", self.contract)
        build = _tapped_factors(self.layout, self.kernel_path, self.kernel_shape, self.contract)
        self._factors = shared_jit((self._loss_fn, self._layer_input), key, build)

    def __call__(self, selected: list, arrays: list, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """The (left, right) factors; a ValueError naming the row, as FullRows', for float64 values beyond
        float32's range, and a LayerInputError when layer_input is not the layer's input (once check_layer_input
        has set the tolerance): on any row, layer_input is not the input tapped at the kernel's dot_general
        (_tap_check), or the bias gradient is not dL/d(output) there; with a bias, on the first and last rows
        of the checkpoint's first batch (of every batch when the kernel has no tap), the kernel's gradient is
        not dL/dy (x) layer_input (_probe_check). The factors are compiled for `batch` first (orient) if they
        were not yet."""
        self.orient(batch)
        probe = np.array([0, batch.count - 1], np.int32)
        rtol = np.inf if self._rtol is None else self._rtol
        probing = self.bias_path is not None and self._rtol is not None and self._probed_at != self.checkpoint
        factors, beyond, losses, checks = self._factors(
            selected, arrays, batch.inputs, batch.targets, probe, rtol, np.bool_(probing)
        )
        _check_float32_range(beyond, batch.count)
        _watch(self.watch, losses, batch)
        checks = np.asarray(checks, np.float64)  # one transfer: [fits, tapped, each row's error, norms]
        self._tapped = bool(checks[1])
        n = jax.tree_util.tree_leaves(batch.inputs)[0].shape[0]
        rel, brel, norms = checks[2 : 2 + n], checks[2 + n : 2 + 2 * n], checks[2 + 2 * n :]
        fits = checks[0]
        if not fits and (rel > self._rtol).any():
            row = int(np.argmax(rel > self._rtol))
            self._refuse(batch, row, rel[row], "differs from the input its dot_general gets by", "every row is")
        brtol = _bias_rtol(self._rtol, selected[0].dtype) if self._rtol is not None else 0.0
        if not fits and (brel > brtol).any():  # the bias's own dtype's tolerance, as in _bias_factors
            row = int(np.argmax(brel > brtol))
            what = "gives the bias gradient as the kernel's dL/d(output), which differs from it by"
            self._refuse(batch, row, brel[row], what, "every row is", tapped=False, allowed=brtol)
        if not fits:
            self._refuse_probed(norms.reshape(-1, len(probe)), batch, probe, brtol)
        if probing:
            self._probed_at = self.checkpoint
        return factors

    def check_layer_input(self, params: Any, batch: Batch, eps: float) -> None:
        """Raises ValueError unless layer_input runs on `batch` and returns floating (batch, q) values, and sets
        the tolerance to which every batch's factors are then checked (__call__, in their compiled call), at
        every checkpoint: on every row, layer_input must equal the input the kernel's dot_general gets; with a
        bias, on the first and last rows of each checkpoint's first batch (of every batch when the kernel has
        no such tap), the kernel's per-example gradient must equal dL/dy (x) layer_input; to 1e-4 relative or
        8 eps of the coarsest dtype the loss computes in (`eps`, check_per_example: bfloat16 / float16
        compute, TF32 products), the kernel or bias is stored in or layer_input returns. Run once per export, on its
        first batch."""
        self.orient(batch)
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
        if not jnp.issubdtype(x.dtype, jnp.floating):  # an integer / bool / complex input has no eps to check to
            raise ValueError(
                f"layer_input(params, inputs) must return floating-point values, the input of {self.kernel_path}, "
                f"got {x.dtype}"
            )
        # rounding of the coarsest dtype the loss computes in (a float32 model running
        # nn.Dense(dtype=bfloat16), TF32 products), the layer's kernel is stored in (bfloat16 / float16
        # params) or layer_input returns: a fraction of its eps. The kernel only: an unused bfloat16 leaf
        # elsewhere in params would loosen the check to 0.0625, and a bias stored coarser than the kernel
        # widens only the checks its gradient (the left factor) enters (_bias_rtol), not layer_input's
        layer = self._kernel_layout.split(params)[0]
        stored = [float(jnp.finfo(a.dtype).eps) for a in layer if jnp.issubdtype(a.dtype, jnp.floating)]
        self._rtol = min(max(1e-4, 8 * max(eps, float(jnp.finfo(x.dtype).eps), *stored)), _RTOL_CAP)

    def _refuse_probed(self, norms: np.ndarray, batch: Batch, probe: np.ndarray, rtol: float) -> None:
        """_refuse naming the first probed row whose kernel gradient differs from dL/dy (x) layer_input by
        more than the tolerance in every orientation the kernel may have. norms: _probed's (2 +
        orientations, probed rows)."""
        gnorm, onorm, residuals = norms[0], norms[1], norms[2:]
        with np.errstate(invalid="ignore", divide="ignore"):
            bound = rtol * (gnorm + 1e-30) + 1e-6 * onorm
            finite = np.isfinite(gnorm) & np.isfinite(onorm) & np.isfinite(residuals).all(axis=0)
            rel = residuals.min(axis=0) / (gnorm + 1e-30)
        bad = np.flatnonzero(finite & (residuals.min(axis=0) > bound))
        worst = int(bad[0]) if bad.size else 0  # else each row fits another orientation of a square kernel
        what = "gives dL/d(output) (x) layer_input, which differs from the kernel's per-example gradient by"
        checked = (
            "the kernel's gradient is on the first and last rows of each checkpoint's first batch, layer_input on "
            "every row at the kernel's dot_general"
            if self._tapped
            else "the first and last rows of every batch are"
        )
        self._refuse(batch, int(probe[worst]), rel[worst], what, checked, tapped=False, allowed=rtol)

    def _refuse(
        self, batch: Batch, row: int, rel: float, what: str, checked: str, tapped: bool = True, allowed: Any = None
    ) -> None:
        """Raises LayerInputError naming the checkpoint, the data's row (`row` of `batch`), which rows are
        `checked` and the relative difference `rel` (`what` says of what); tapped: layer_input differs from the
        input tapped at the kernel's dot_general (else the kernel's gradient from the factors' product)."""
        where = (
            f"at checkpoint {self.checkpoint}, row {batch.start + row} of the data ({checked} checked; this "
            f"batch holds rows {batch.start} to {batch.start + batch.count - 1})"
        )
        allowed = self._rtol if allowed is None else allowed
        differs = f"layer_input {what} {rel:.3g} of its norm (allowed: {allowed:.3g})"
        hint = (
            "; layer_input must compute from its params argument (not a checkpoint's params it closes over) and "
            "treat every row as the loss does (the same padding mask)"
        )
        if self.bias_path is None or tapped:
            raise LayerInputError(
                f"layer_input(params, inputs) does not return the input of {self.kernel_path} {where}: {differs}{hint}"
            )
        raise LayerInputError(
            f"layer_input(params, inputs) does not return the input of {self.kernel_path} {where}, or the loss uses "
            f"{self.kernel_path} or {self.bias_path} outside y = x K + b (weight decay or another penalty on "
            f"them, tied weights): {differs}{hint}"
        )


def _bias_rtol(rtol: Any, dtype: Any) -> Any:
    """LastLayer's tolerance `rtol` (a float, or traced) widened to 8 eps of the bias's `dtype`: for the checks its
    gradient, the left factor, enters (a bfloat16 bias of a float32 kernel)."""
    eps = 8 * float(jnp.finfo(dtype).eps)
    return max(rtol, eps) if isinstance(rtol, float) else jnp.maximum(rtol, eps)


class LayerInputError(ValueError):
    """layer_input's values are not the last layer's input on a checked row (LastLayer._refuse)."""


def _avals(tree: Any, strip: int = 0) -> Any:
    """The pytree's arrays as ShapeDtypeStructs, without their first `strip` axes."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[strip:], a.dtype), tree)


def _bias_factors(
    layout: ParamLayout, kernel: ParamLayout, kernel_pos: int, q: int, sides: tuple
) -> Callable[..., Callable]:
    """shared_jit's build of a layer with a bias (layout: the bias; kernel: the kernel's layout, the kernel
    arrays[kernel_pos], met by x (q,)): left = the per-example bias gradient, right = [layer_input, 1], and
    the checks of layer_input. Where the kernel has a tap (_bias_site, per batch shape), the bias gradient
    is computed in the pass that taps the input of the kernel's dot_general, against which layer_input is
    checked on every real row (_tap_check), as the bias gradient is against dL/d(output) of that dot_general
    (y = x K + b: else dL/db (x) layer_input is not the kernel's gradient; a bias scaled or used again), and,
    when `probing` (a checkpoint's first batch), the kernel's gradient on the rows `probe` (_probe_check,
    under lax.cond). Without a tap, the kernel's gradient on the rows `probe` of every batch. The last
    value is [fits, tapped (1.0 or 0.0), then _tap_check's per row values of layer_input, then of the bias
    gradient (0.0 without a tap), then _probe_check's norms (1.0 when not probed)]."""
    from .jaxpr_taps import run_tapped

    def build(loss: LossFn, inputs_of: Callable) -> Callable:
        check = _probe_check(loss, layout, kernel, sides)
        delta = jax.vmap(jax.value_and_grad(_one_example_loss(loss, layout)), in_axes=(None, None, 0, 0))

        def factors(selected, arrays, inputs, targets, probe, rtol, probing):
            example = _avals((inputs, targets), strip=1)
            closed, site = _bias_site(loss, layout, _avals(selected), _avals(arrays), example, kernel_pos, q)

            def one(x, y):
                def loss_at(bias, zero):
                    args = jax.tree_util.tree_leaves((bias, arrays, x, y))
                    outs, acts = run_tapped(closed, {0: site}, args, {0: zero})
                    return outs[0], acts[0]

                zero = jnp.zeros(site.out_shape, site.out_dtype)
                (value, tapped), (grad, dy) = jax.value_and_grad(loss_at, (0, 1), has_aux=True)(selected, zero)
                return value, grad, tapped.reshape(-1), dy.reshape(-1)

            x = inputs_of(layout.merge(selected, arrays), inputs)
            wide = jnp.result_type(jnp.float32, x.dtype, arrays[kernel_pos].dtype)
            if site is not None:
                losses, grads, tapped, dy = jax.vmap(one)(inputs, targets)
                fits, rel = _tap_check(x, tapped, probe, rtol)
                # y = x K + b: the bias gradient (the left factor) must be dL/dy at the kernel's dot_general
                db = grads[0].reshape(dy.shape)
                # db in the bias dtype, dy in the product's output dtype (float16, a float32 bias added after it)
                sub = max(float(jnp.finfo(t.dtype).smallest_subnormal) for t in (db, dy)) * dy.shape[1] ** 0.5
                brtol = _bias_rtol(rtol, db.dtype)  # a bias stored coarser than the kernel
                bfits, brel = _tap_check(db, dy, probe, brtol, floor=4 * sub)
                fits = jnp.minimum(fits, bfits)
            else:
                losses, grads = delta(selected, arrays, inputs, targets)
                fits, rel = jnp.ones((), wide), jnp.zeros(x.shape[0], wide)
                brel = rel
            (left, x), beyond = _float32_rows([grads[0], x])
            right = _with_ones(x)
            # the kernel's gradient against dL/dy (x) layer_input: dL/dy is the bias gradient, in the bias dtype
            args = (selected, arrays, inputs, targets, left, right, probe, _bias_rtol(rtol, grads[0].dtype))
            out_sub = _coarsest_subnormal(closed)  # dL/dy may be rounded in a coarser dtype than the kernel's
            if site is None:
                probe_fits, norms = check(*args, out_sub)
            else:
                passed = jnp.ones((), wide), jnp.ones((2 + len(sides)) * probe.shape[0], wide)
                checked = lambda: tuple(a.astype(wide) for a in check(*args, out_sub))  # noqa: E731
                probe_fits, norms = jax.lax.cond(probing, checked, lambda: passed)
            fits = jnp.minimum(fits.astype(wide), probe_fits.astype(wide))
            head = jnp.stack([fits, jnp.asarray(site is not None, wide)])
            return (
                (left, right),
                beyond,
                losses,
                jnp.concatenate([head, rel.astype(wide), brel.astype(wide), norms.astype(wide)]),
            )

        return factors

    return build


def _coarsest_subnormal(closed: ClosedJaxpr) -> float:
    """The smallest subnormal of the coarsest floating dtype the values of a traced function have (nested jaxprs
    included): the step a float16 product (dL/dy of a confident example) rounds tiny values to."""
    subs = [0.0]

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                dtype = getattr(getattr(v, "aval", None), "dtype", None)
                if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
                    subs.append(float(jnp.finfo(dtype).smallest_subnormal))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    return max(subs)


def _with_ones(x: jax.Array) -> jax.Array:
    """[x, 1]: the right factor (batch, q + 1) of a layer with a bias, from float32 x (batch, q)."""
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), jnp.float32)], axis=1)


def _probe_check(loss: LossFn, layout: ParamLayout, kernel: ParamLayout, sides: tuple) -> Callable:
    """(selected, arrays, inputs, targets, left, right, probe, rtol) -> (fits, norms), traced in the factors'
    compiled call: the kernel's (`kernel`: its layout) per-example gradient on the rows `probe` (indices into
    the batch) against the outer product of the factors (left, right; of `layout`) in each orientation
    `sides` ("px": a (p, q) kernel, "xp": (q, p)). norms: those of the gradient, of the outer product and of
    their difference per orientation, row-major (2 + len(sides), rows); fits: 1.0 when in one orientation
    every probed row's difference is within `rtol` of the gradient's norm (+ 1e-6 of the product's), or not
    finite (left to the checks of non-finite rows), else 0.0."""
    kernel_grad = jax.vmap(jax.grad(_one_example_loss(loss, kernel)), in_axes=(None, None, 0, 0))

    def check(selected, arrays, inputs, targets, left, right, probe, rtol, out_sub=0.0):
        rows = jax.tree_util.tree_map(lambda a: a[probe], (inputs, targets))
        grad = kernel_grad(*kernel.split(layout.merge(selected, arrays)), *rows)[0]
        # a 16-bit gradient's entries below its smallest normal (dL/dy of a confident example) are rounded to
        # multiples of its smallest subnormal, not to a fraction of themselves: a few of those per entry allowed
        sub = float(jnp.finfo(grad.dtype).smallest_subnormal) if jnp.issubdtype(grad.dtype, jnp.floating) else 0.0
        sub = max(sub, out_sub)  # dL/dy rounded in a coarser output dtype (a float16 product) than the kernel's
        wide = jnp.result_type(jnp.float32, grad.dtype)
        grad = grad.reshape(probe.shape[0], -1).astype(wide)
        d, x = left[probe].astype(wide), right[probe][:, : grad.shape[1] // left.shape[1]].astype(wide)
        outer = {"px": lambda: d[:, :, None] * x[:, None, :], "xp": lambda: x[:, :, None] * d[:, None, :]}
        residuals = jnp.stack([jnp.linalg.norm(grad - outer[s]().reshape(grad.shape), axis=1) for s in sides])
        gnorm, onorm = jnp.linalg.norm(grad, axis=1), jnp.linalg.norm(d, axis=1) * jnp.linalg.norm(x, axis=1)
        finite = jnp.isfinite(gnorm) & jnp.isfinite(onorm) & jnp.isfinite(residuals).all(axis=0)
        floor = 4 * sub * (grad.shape[1] ** 0.5 + jnp.linalg.norm(x, axis=1) * d.shape[1] ** 0.5)
        within = (residuals <= rtol * (gnorm + 1e-30) + 1e-6 * onorm + floor) | ~finite
        return within.all(axis=1).any().astype(wide), jnp.concatenate([gnorm, onorm, residuals.reshape(-1)])

    return check


def _tap_check(
    x: jax.Array, tapped: jax.Array, probe: jax.Array, rtol: Any, floor: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(fits, per row |x - tapped| / |tapped|): layer_input's values x (batch, q) against the input `tapped`
    (batch, q) the kernel's dot_general got, on the batch's real rows (up to probe[1], its last; 0 on the
    padding); fits 1.0 when every finite one is within `rtol`, else 0.0."""
    wide = jnp.result_type(jnp.float32, x.dtype, tapped.dtype)
    norm = jnp.linalg.norm(tapped.astype(wide), axis=1)
    rel = jnp.linalg.norm(x.astype(wide) - tapped.astype(wide), axis=1) / (norm + 1e-30 + floor / rtol)
    real = jnp.arange(rel.shape[0]) <= probe[1]
    fits = jnp.all((rel <= rtol) | ~jnp.isfinite(rel) | ~real).astype(wide)
    return fits, jnp.where(real, rel, 0.0)


def _bias_site(
    loss_fn: LossFn, layout: ParamLayout, selected: Any, arrays: Any, example: Any, kernel_pos: int, q: int
) -> tuple[Any, Any]:
    """(closed jaxpr of one example's loss, for the avals of the bias (`layout`'s one selected leaf), the other
    array leaves and one (input, target) example; the Site of the kernel, arrays[kernel_pos], or None): the
    kernel's one dot_general, met by x (q,) on its side of size q and giving one output row per example,
    where its input is tapped; None when the kernel is used otherwise (twice: weight decay, tied weights;
    inside scan; per token)."""
    from .jaxpr_taps import find_sites

    closed = jax.make_jaxpr(_one_example_loss(loss_fn, layout))(selected, arrays, *example)
    site = find_sites(closed, {len(selected) + kernel_pos: 0})[0].get(0)
    if site is None or site.lookup:
        return closed, None
    p = int(np.prod([site.out_shape[a] for a in site.out_axes], dtype=np.int64))
    if int(np.prod(site.out_shape, dtype=np.int64)) != p or arrays[kernel_pos].shape[site.contract] != q:
        return closed, None
    return closed, site


def _kernel_site(
    loss_fn: LossFn, layout: ParamLayout, selected: Any, arrays: Any, example: Any, path: str, shape: tuple
) -> Any:
    """(closed jaxpr of one example's loss, for the avals of the kernel (`layout`'s one selected leaf), the
    other array leaves and one (input, target) example; the Site of the kernel's one dot_general), or a
    ValueError saying why the kernel of a bias-free last layer has no such product giving one output row
    per example."""
    from .jaxpr_taps import find_sites

    closed = jax.make_jaxpr(_one_example_loss(loss_fn, layout))(selected, arrays, *example)
    sites, reasons = find_sites(closed, {0: 0})
    site = sites.get(0)
    if site is None or site.lookup:
        why = "looked up by ids (an embedding)" if site is not None else reasons.get(0, "only added to other values")
        raise ValueError(
            f"mode='last_layer': {path} {list(shape)} is named without a bias, so dL/d(output) is read at the one "
            "dot_general that uses it (x @ K, x @ K.T, an einsum; not inside scan / while / cond or a custom_jvp / "
            f"custom_vjp function), but it is {why}: use mode='full' with layers=[{path!r}] (or name the layer's "
            "bias too, if it has one)"
        )
    p = int(np.prod([site.out_shape[a] for a in site.out_axes], dtype=np.int64))
    outputs = int(np.prod(site.out_shape, dtype=np.int64)) // max(p, 1)
    if outputs != 1:
        raise ValueError(
            f"mode='last_layer': {path} {list(shape)} gives {outputs} output rows of {p} per example (tokens, "
            f"output shape {list(site.out_shape)} for a batch of one), not one: its per-example gradient is a sum "
            f"of outer products, not one (a sequence model's head: use mode='full' with layers=[{path!r}] and a "
            "kronecker=True projection)"
        )
    return closed, site


def _tapped_factors(layout: ParamLayout, path: str, shape: tuple, contract: int) -> Callable[..., Callable]:
    """shared_jit's build of a bias-free layer (layout: the kernel, met by x on its axis `contract`): left =
    the gradient of a zero added to the output of the kernel's dot_general, per example (the jaxpr traced
    for the batch's shapes), right = layer_input, and layer_input checked on every real row against the input
    of the kernel's dot_general read at that tap (_tap_check): the vector [fits, then per row
    |layer_input - x| / |x|] after [fits, 1.0] (tapped, as _bias_factors'). `probing` is ignored."""
    from .jaxpr_taps import run_tapped

    def build(loss: LossFn, inputs_of: Callable) -> Callable:
        def factors(selected, arrays, inputs, targets, probe, rtol, probing):
            example = _avals((inputs, targets), strip=1)
            closed, site = _kernel_site(loss, layout, _avals(selected), _avals(arrays), example, path, shape)
            if site.contract != contract:
                raise ValueError(
                    f"mode='last_layer': a batch of input shapes {jax.tree_util.tree_leaves(example)} uses "
                    f"{path} {list(shape)} on its other side than the first batch did: give every batch the same shapes"
                )

            def one(x, y):
                def loss_at(perturb):
                    args = jax.tree_util.tree_leaves((selected, arrays, x, y))
                    outs, acts = run_tapped(closed, {0: site}, args, {0: perturb})
                    return outs[0], acts[0]

                zero = jnp.zeros(site.out_shape, site.out_dtype)
                (value, tapped), grad = jax.value_and_grad(loss_at, has_aux=True)(zero)
                return value, grad.reshape(-1), tapped.reshape(-1)

            losses, left, tapped = jax.vmap(one)(inputs, targets)
            x = inputs_of(layout.merge(selected, arrays), inputs)
            fits, rel = _tap_check(x, tapped, probe, rtol)
            (left, x), beyond = _float32_rows([left, x])
            return (
                (left, x),
                beyond,
                losses,
                jnp.concatenate([jnp.stack([fits, jnp.ones_like(fits)]), rel, jnp.zeros_like(rel)]),
            )

        return factors

    return build
