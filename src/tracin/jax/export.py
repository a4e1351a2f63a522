"""export_gradients: per-example gradients of a JAX loss at each checkpoint, into a gradient set."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._caller import user_stacklevel
from .._export.checkpoints import warn_unused_states
from .._export.driver import Options, check_store, export, kronecker_projection
from .._export.fingerprint import callable_identity
from .._export.metadata import last_layer_entry
from .._export.preconditioner import adam_settings, check_preconditioner
from .._export.projection import check_projection, refuse_empty_parameters, warn_widening
from .._export.transforms import row_transforms
from .._progress import check_progress
from .._retyped import retyped
from ..gradients import FactoredGradients, Gradients
from ..projection import NonFiniteRowError
from .batches import Batch, BatchPlan
from .checkpoints import parse_checkpoints, refuse_train_state_without_optimizer, restore, state_digest
from .params import (
    LINEN_STATE,
    as_patterns,
    host_array,
    layout_of,
    leaf_path,
    linen_collections,
    nnx_variables,
    step_as_array,
    train_state_entries,
)
from .per_example import FullRows, LastLayer, LayerInputError, LossWatch, check_per_example, check_uncoupled

DTYPES = ("float32", "float16", "bfloat16")
KRONECKER_JAX = "0.10.0"  # jax.extend.core.jaxprs_in_params, Primitive.get_bind_params giving the params dict
PARAM_ORDER = (
    "jax.tree_util flatten order of the params pytree (dict keys sorted, module fields in "
    "declaration order); each leaf flattened row-major; paths are keys joined by '/'"
)


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
    progress: bool | None = None,
    preconditioner: str | None = None,
    preconditioner_options: dict[str, float] | None = None,
) -> Gradients | FactoredGradients | Any:
    """Per-example loss gradients at each checkpoint, as TracIn gradients weighted by learning rate.

    loss_fn(params, inputs, targets) -> per-example losses, shape (batch,) (a reduced scalar is
        refused). It is differentiated one example at a time (jax.vmap of jax.grad over a batch of one).
        As with jax.jit, it is traced once and the compiled function is reused by later exports with
        the same function object (and params structure, mode, layers): a loss reading a Python setting
        (a global, a dict) keeps the value it had when traced, so pass a new function when the setting
        changes, e.g. functools.partial(loss, temperature=4.0). The cache holds loss_fn weakly.
    checkpoints: [(params, learning_rate)], params any pytree (nested dicts, Flax linen variables, NNX
        state, an Equinox module or its eqx.partition'ed arrays), or the path of an orbax checkpoint
        directory / Flax msgpack file. Every checkpoint must have the first one's structure. Over several
        checkpoints, a Flax TrainState's Python-int step is read as an array (their steps differ), so a loss
        branching on it in Python fails (an error notes this): branch with jnp.where or jax.lax.cond. An entry
        may be (params, learning_rate, optax optimizer state) for a preconditioner (with
        preconditioner=None the state is unused: a UserWarning says so). A learning rate must not be
        negative (ValueError); a zero one is taken with a UserWarning (it adds nothing to any score).
    data: (inputs, targets) arrays with a leading row dimension, or an iterable of such batches
        (anything iter() takes, a loader with only __len__ / __getitem__ too; re-iterable when there
        are several checkpoints); inputs / targets may be pytrees of arrays,
        targets None for a loss that takes none (loss_fn gets None). A tuple or list of two is one
        (inputs, targets) dataset when all its leaves are arrays, unless both its items are pairs
        themselves (then it is two batches): tracin.jax.batches.PAIR_RULE. Every leaf needs a leading
        row dimension: a scalar or other non-array leaf (a setting such as a temperature) is a
        ValueError naming its path (inputs['temperature']); pass settings shared by every example with
        functools.partial(loss_fn, temperature=...). Every checkpoint must see the same inputs and
        targets in the same order (checked by fingerprints).
    layers: path patterns choosing the parameters ("l2", "params/Dense_1/*"); default all floating leaves, but
        for an NNX State (nnx.split(model)): its nnx.Param leaves alone, with a UserWarning naming the
        floating leaves of other Variable types left out (BatchNorm's BatchStat); for Flax linen variables
        holding collections besides "params" (BatchNorm's "batch_stats", a "cache"): the "params" collection
        alone, as no gradient step trains the others (name them in layers to export them too; a UserWarning
        names those left out that are not a linen state collection, tracin.jax.params.LINEN_STATE: a plain
        dict's trained entries); so for a Flax TrainState, restored as a dict ({"step", "params",
        "opt_state"}) or not, with a UserWarning naming the entries holding floating leaves left out. Rows
        concatenate the chosen leaves in PARAM_ORDER, recorded in metadata["params"]. An optax state
        initialised on variables["params"] (a TrainState's) is matched under "params/".
    mode: "full" -> Gradients, rows (n, d); "last_layer" -> FactoredGradients of the dense layer that
        `layers` names (one 2-D kernel, one 1-D bias): left dL/d(output) (n, p), right [input, 1]
        (n, q + 1), where layer_input(params, inputs) -> (batch, q) gives the layer's input. A bias-free
        layer (nn.Dense(use_bias=False), x @ W, or a kernel named without its bias): right = input (n, q),
        as tracin.torch factors a bias-free nn.Linear; its dL/d(output) is read exactly at the one
        dot_general using the kernel (x @ K, x @ K.T: which side x meets gives p and q), one output row
        per example; a kernel used otherwise (twice, inside scan / while / cond, per token) is a ValueError
        saying how. layer_input is checked at every checkpoint, with the factors, on every row against
        the input the kernel's dot_general gets (read in the same pass, with or without a bias); with a
        bias, every row's bias gradient against that dot_general's dL/d(output), and the kernel's
        per-example gradient must also be dL/d(output) (x) layer_input (the bias enters
        as y = x K + b) on the first and last rows of each checkpoint's first batch, and on those of every
        batch where the kernel is used otherwise than in one such dot_general (twice, in scan, per token:
        rows between them are then not checked); to 1e-4 relative, or 8 eps of a coarser dtype computed
        in, else a ValueError names the checkpoint, the row and the relative difference (a layer_input
        ignoring the padding mask the loss applies, or closing over one checkpoint's params instead of its
        argument). With a bias, the check adds 2-12% of an export's CPU time (README, JAX quick start).
    projection: a tracin.Projection applied to each batch of rows (segments = parameter widths).
        Projection(dim, seed, kind, per_layer=True, kronecker=True) (mode="full"; language models):
        every chosen weight whose one use in the loss is a dot_general (x @ W, W @ x, einsum, Flax
        DenseGeneral kernels contracted on their first or last axes) or a lookup of the rows of a 2-D
        leaf by ids (W[ids], jnp.take, flax Embed, eqx.nn.Embedding under vmap), through transposes,
        dtype casts and nested jit / remat calls, is projected per token, sum_t (P_rows u_t)(P_cols
        v_t)^T, from the loss's jaxpr run with taps, never forming its per-example gradient; the other
        chosen leaves (biases, norms; with one warning naming them, every leaf of two or more axes used
        otherwise: twice, reshaped, scaled or added to another value before its matmul, a conv kernel,
        inside scan / while / cond or a custom_jvp / custom_vjp function) are computed in full and
        projected flat.
        metadata["projection"]["segments"] is the layout (LayerMatrix(rows, cols) in the leaf's own
        orientation), and Projection.apply(full rows, segments=that layout) gives the same rows up to
        float32 rounding (not the same bits: the products run in another order; measured 9.9e-8 relative).
        tracin.jax.token_projection says more; it needs JAX >= KRONECKER_JAX (an ImportError names it;
        `import tracin.jax` works on older JAX).
    dtype: "float32" | "float16" | "bfloat16" of the stored rows. float16 keeps its precision only for
        |x| >= 2**-14 ~ 6.1e-5: rows whose values are all smaller (examples fit with a loss near 0) keep
        fewer bits or become zero (a RuntimeWarning once per export, at the first batch holding any: it
        counts and names that batch's rows, and later rows are not checked); bfloat16 has nearly float32's range.
    store: a directory: rows go to a tracin.GradientStore there as they are computed; an export
        killed part-way resumes where it stopped when run again with the same arguments. Its
        metadata (compared on resume) holds fingerprints of all the data (read once more, up front),
        of every checkpoint and of loss_fn / layer_input (by qualified name), so a resume with any of
        them changed is a ValueError naming what changed rather than rows mixed from two exports; a
        store that records no rows yet (an export that failed at its first batch) is made again for
        this call's inputs.
    batch_size: rows per compiled call (default 64, or the first batch's size for an iterable);
        shorter batches are padded to it (longer ones split), so the row count never compiles the
        per-example function again. Arrays of fewer rows n than batch_size run as one batch of n rows
        (memory and compute scale with n), compiled once for n rows, also after an export of the same
        loss at batch_size (a train export before this test export): XLA's code for n rows and for
        batch_size rows can differ in the last bits, so the batch shape follows from the data and
        batch_size alone and an export gives the same bytes whatever the process ran before
        (tracin.distributed's fresh workers included). Its other axes do compile: once per distinct
        input shape (each new sequence length of variable-length batches is a new trace and XLA
        compile, seconds or more for a large model). To bound the compiles, pad sequences to a few
        fixed lengths (e.g. multiples of 64, or one max length) and mask the padding in loss_fn.
    progress: True, False or None: a tqdm bar over the examples of each checkpoint (None: only once
        the export has taken a couple of seconds, if tqdm is installed).
    preconditioner: None (plain gradients, SGD as in the TracIn paper), "adam" (g / (sqrt(v_hat) + eps)
        on both sides: attribution) or "adam_update" (train rows only, the next Adam step's direction;
        score against test rows exported with None: LESS-style data selection); mode="full" only
        (tracin.torch also takes "adam" factored). "adam" also works with a kronecker=True projection
        through a rank-one factorisation of v for the weights projected per token (exact for a
        rank-one v, an approximation for Adam). Where v is exactly 0 (embedding rows of tokens the
        training never held) the two part ways: full rows divide the gradient there by eps, so it
        dominates its row, while the factorisation scales the rows and columns of v that are all 0
        by 0, so they add nothing; both warn (RuntimeWarning, once per leaf and checkpoint, with
        counts; full rows only when an exported row has gradient there). Every checkpoint then
        carries its optax state holding one ScaleByAdamState, or several over disjoint leaves (an
        optax.partition / multi_transform split, merged per leaf when their counts agree; see
        tracin._export.preconditioner and
        tracin.jax.checkpoints.OptimizerState: optax.amsgrad / adabelief states are refused, and so
        are adamax / adamaxw / yogi / radam / contrib.adopt states made with inject_hyperparams; optax's nadam
        and lamb, and adamax, adamaxw, yogi, radam and contrib.adopt without it, keep a ScaleByAdamState
        that cannot be told from Adam's).
    preconditioner_options: {"b1", "b2", "eps", "eps_root"} the optimizer used (default optax.adam's
        0.9, 0.999, 1e-8, 0; eps_root as optax adds it under the square root: g / (sqrt(v_hat +
        eps_root) + eps), left out of the rank-one factorisation as eps is); recorded in
        metadata["preconditioner"] (eps_root only when not 0). A state made with
        optax.inject_hyperparams that records other values is refused, naming them. Unused with
        preconditioner=None: a UserWarning says so (as for an optimizer state).

    Returns Gradients / FactoredGradients (metadata: the schema of tracin._export.metadata, framework
    "jax", parameter names are the leaf paths), or the finalized GradientStore when store is given.
    Errors shared with tracin.torch (tracin._export.driver): a one-shot iterator with several
    checkpoints, data with no rows or rows changing between checkpoints are ValueError; a missing
    checkpoint file is FileNotFoundError, an empty or damaged one a ValueError naming it (a pickle or
    .npz file says to load it and pass the pytree). An example whose gradient holds NaN or Inf is not
    an export error: its row is stored as it is (projected: a row of NaN) and scoring refuses the set,
    naming the rows. An example whose loss is NaN or Inf gets a RuntimeWarning naming its row (one warning
    per checkpoint holding such rows, at the end of its pass, counting them and naming the first 10; a
    row named at one checkpoint is not counted again at later ones): its gradient may be NaN (refused by
    scoring, as above) or exactly 0 (a label outside [0, classes) read with take_along_axis, such as the
    -100 'ignore' label: a zero row, which scoring takes as no influence; drop such examples); a finite
    gradient whose projection overflows float32 is a ValueError naming the row (kronecker=True stores it: scoring
    names it), as is a finite float64 gradient (x64 params) beyond float32's range (rows are float32
    at most; mode="full" and "last_layer").
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, inputs, targets), got {type(loss_fn).__name__}")
    if mode not in ("full", "last_layer"):
        raise ValueError(f"mode must be 'full' or 'last_layer', got {mode!r}")
    if mode == "last_layer" and (layers is None or layer_input is None):
        raise ValueError(
            "mode='last_layer' needs layers=[path of the final dense layer] and "
            "layer_input=fn(params, inputs) -> that layer's input, shape (batch, in_features)"
        )
    if mode == "full" and layer_input is not None:
        raise ValueError("layer_input is only used with mode='last_layer'")
    if layer_input is not None and not callable(layer_input):
        raise TypeError(f"layer_input must be callable, got {type(layer_input).__name__}")
    if preconditioner is not None and mode != "full":
        raise ValueError(f"preconditioner={preconditioner!r} needs mode='full' in tracin.jax (mode={mode!r})")
    progress = check_progress(progress)
    check_projection(projection, mode == "last_layer")
    dtype = _dtype_name(dtype)
    check_store(store)
    layers = as_patterns(layers) if layers is not None else None
    adam = adam_settings(preconditioner_options)
    entries = parse_checkpoints(checkpoints, adam)
    warn_unused_states(entries, preconditioner)
    if preconditioner is not None:  # a known kind first, then a TrainState's own opt_state named as the third item
        check_preconditioner(preconditioner, mode)
        refuse_train_state_without_optimizer(entries, preconditioner)
    if preconditioner is None and preconditioner_options is not None:  # as an unused optimizer state: a warning
        warnings.warn(
            "preconditioner_options is given, but preconditioner=None ignores it: the rows are plain SGD gradients "
            '(metadata["preconditioner"] None). Pass preconditioner="adam" or "adam_update" for Adam-preconditioned '
            'rows; plain rows are right for test rows scored against preconditioner="adam_update" train rows: drop '
            "preconditioner_options to say so",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    kronecker = kronecker_projection(projection, mode, preconditioner, entries)
    plan = BatchPlan(data, batch_size)
    kron = (projection, entries, adam if preconditioner else None) if kronecker else None
    framework = _JaxExport(loss_fn, layer_input, layers, mode, plan, entries[0].source, kron, len(entries) > 1)
    refuse_empty_parameters(projection, framework.params)  # per_layer: a segment per parameter
    if preconditioner is not None:
        framework.check_states(entries)
    if kronecker:  # taken per token by the adapter, the preconditioner folded into it
        warn_widening(projection, projection.dim, framework.layout.dim)
        options = Options(mode, layers, dtype, store, progress)
        with _noting_array_step(framework):
            return export(framework, entries, options, framework.compute_rows.recorded())
    options = Options(mode, layers, dtype, store, progress, preconditioner, adam if preconditioner else None)
    with _noting_array_step(framework):
        return export(framework, entries, options, row_transforms(projection, framework.segments))


_ARRAY_STEP_NOTE = (
    "if loss_fn branches in Python on a TrainState's step (if state.step > k): tracin reads the TrainStates' "
    "Python-int step as an array over several checkpoints (jax.jit holds a non-array leaf static, the same at "
    "every call, while the steps of checkpoints differ), so that branch fails there, while one checkpoint keeps "
    "the int: branch with jnp.where or jax.lax.cond"
)


@contextlib.contextmanager
def _noting_array_step(framework: _JaxExport) -> Iterator[None]:
    """A jax.errors.ConcretizationTypeError (TracerBoolConversionError: Python's `if` on a traced value), or an
    error it caused (check_per_example's ValueError), raised while the checkpoint loaded last had its
    TrainState's int step read as an array, raised again adding _ARRAY_STEP_NOTE: of its type where that
    type is built from a message, a ValueError otherwise."""
    try:
        yield
    except Exception as e:
        if not framework.step_read_as_array or not _caused_by_concretization(e):
            raise
        raise retyped(e, f"{e}\n({_ARRAY_STEP_NOTE})") from e


def _caused_by_concretization(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is a ConcretizationTypeError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, jax.errors.ConcretizationTypeError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class _JaxExport:
    """The JAX side of one export (see tracin._export.driver.Framework): the params layout of the
    first checkpoint, the compiled per-example function of the mode, the data as padded batches."""

    name = "jax"
    inplace_width = None
    countable_data = "(inputs, targets) arrays or a re-iterable of batches (a list, a Sequence, a loader)"

    def __init__(
        self,
        loss_fn: Callable,
        layer_input: Callable | None,
        layers: list[str] | None,
        mode: str,
        plan: BatchPlan,
        first: Any,
        kronecker: Any = None,
        several: bool = False,
    ):
        self.loss_fn, self.plan = loss_fn, plan
        self.n_rows, self.one_shot = plan.n_rows, plan.one_shot
        self._several = several
        self._first, self._first_step_read = self._restore(first, "checkpoints[0]")
        self.step_read_as_array = self._first_step_read  # that of the checkpoint in use (loaded last)
        self.last_layer = None
        self.kronecker: Any = None  # the KroneckerRows computing the rows, if kronecker=True
        self.fingerprints = {"loss": callable_identity(loss_fn)}
        self._pending: Iterator[Batch] | None = None  # the batches after one read ahead (slot_dims), if any
        self._index = 0  # the checkpoint loaded last (load), named by compute's errors
        self.watch = LossWatch()  # warns about examples whose loss is NaN or infinite
        if mode == "last_layer":
            self.compute_rows: Any = LastLayer(loss_fn, layer_input, self._first, layers, self.watch)
            self.layout = self.compute_rows.layout
            c = self.compute_rows
            self._slot_dims: list | None = [c.dims] if c.dims is not None else None  # bias-free: the first batch's
            self.segments: list[int] | None = None
            self.params = [(c.kernel_path, c.kernel_shape)] + ([(c.bias_path, (c.p,))] if c.bias_path else [])
            layer = c.kernel_path.rpartition("/")[0] or c.kernel_path  # a bare leaf (x @ W) names itself
            self.last_layer = last_layer_entry(layer, c.kernel_path, c.bias_path)
            self.fingerprints["layer_input"] = callable_identity(layer_input)
        else:
            default = _linen_default(self._first) if layers is None else None
            if layers is None:  # a file, or an NNX State restored by orbax without a target (dicts)
                _warn_saved_nnx(self._first, first)
            self.layout = layout_of(self._first, layers if layers is not None else default)
            if kronecker is not None:  # (projection, checkpoints, Adam's settings or None), taken per token
                projection, entries, adam = kronecker
                rows = _kronecker_rows()(loss_fn, self.layout, projection, self._first, entries, adam)
                self.compute_rows = self.kronecker = rows
                rows.watch = self.watch
                self._slot_dims, self.segments = [projection.dim], None
                if adam is not None:
                    self.fingerprints["optimizer_states"] = [entry.optimizer.digest() for entry in entries]
            else:
                self.compute_rows = FullRows(
                    loss_fn, self.layout, jnp.float32, watch=self.watch
                )  # float64 beyond float32: an error
                self._slot_dims, self.segments = [self.layout.dim], self.layout.widths
            self.params = self.layout.describe()

    def _restore(self, source: Any, name: str) -> tuple[Any, bool]:
        """(params of checkpoint `source`, whether its TrainState's Python-int step was read as an array).
        Several checkpoints: that step (one per checkpoint) is read as an array, as a jitted step holds it;
        one checkpoint keeps it as it is (a loss may branch on it in Python)."""
        params = restore(source, name)
        if not self._several:
            return params, False
        read = step_as_array(params)
        return read, read is not params

    @property
    def slot_dims(self) -> list:
        """Per checkpoint the row width (full rows, a projection) or (p, q [+ 1]) of the factors. A bias-free
        last layer's (p, q) are read off the loss's use of its kernel on the first batch, read here once,
        ahead (the first pass of batches() goes on from it: a one-shot iterator is read once)."""
        if self._slot_dims is None:
            batches = iter(self.plan)
            first = next(batches, None)
            if first is None:
                raise ValueError("data has no rows")
            self.compute_rows.orient(first, self.plan.note)
            self._pending = itertools.chain([first], batches)
            self._slot_dims = [self.compute_rows.dims]
        return self._slot_dims

    def check_states(self, entries: Sequence[Any]) -> None:
        """ValueError when an optimizer state's Adam moments hold leaves the params do not
        (OptimizerState.check_leaves, against the first checkpoint's pytree)."""
        for entry in entries:
            if entry.optimizer is not None:
                entry.optimizer.check_leaves(self._first)

    def batches(self) -> Iterator[Batch]:
        """The data's batches, once per pass; at the end of a pass, the one warning about the rows whose loss
        was not finite in it (LossWatch.flush)."""
        pending, self._pending = self._pending, None
        with self.watch.flushed():  # an interrupted pass too, raising its own error
            for batch in pending if pending is not None else self.plan:
                if self.kronecker is not None:
                    self.kronecker.prepare(batch, self.plan.note)  # the first batch fixes the layout
                yield batch

    def fingerprint_arrays(self, batch: Batch) -> tuple[list[np.ndarray] | None, list[np.ndarray]]:
        """(targets, inputs) for the fingerprint; targets None when they hold no arrays (DataFingerprint
        then compares the inputs alone, which it digests once)."""
        targets = _host_leaves(batch.targets, batch.count) if jax.tree_util.tree_leaves(batch.targets) else None
        return targets, _host_leaves(batch.inputs, batch.count)

    def state_digest(self, source: Any, index: int) -> str:
        return state_digest(source)

    def array_state_digest(self, source: Any, index: int) -> str:
        return state_digest(source, static=False)

    def load(self, source: Any, index: int) -> tuple[list, list, Any]:
        """(selected leaves, other array leaves, params) of checkpoint `index`."""
        self._index = self.watch.checkpoint = index
        if isinstance(self.compute_rows, LastLayer):
            self.compute_rows.checkpoint = index  # named by its layer_input check
        if index == 0:
            params, self.step_read_as_array = self._first, self._first_step_read
        else:
            params, self.step_read_as_array = self._restore(source, f"checkpoints[{index}]")
        self._first = None  # checkpoint 0 is loaded once
        self.layout.check_same(layout_of(params, None), f"checkpoints[{index}]")
        if self.kronecker is not None:
            self.kronecker.begin(index)
        return (*self.layout.split(params), params)

    def check(self, state: tuple[list, list, Any], batch: Batch) -> None:
        selected, arrays, params = state
        eps = check_per_example(self.loss_fn, self.layout, selected, arrays, batch, self.plan.note)
        check_uncoupled(self.loss_fn, self.layout, selected, arrays, batch, eps, self.plan.note)
        if isinstance(self.compute_rows, LastLayer):
            self.compute_rows.check_layer_input(params, batch, eps)

    def compute(self, state: tuple[list, list, Any], batch: Batch) -> Any:
        """The batch's rows. A batch of shapes or dtypes not run before (only the first batch is checked)
        is traced anew by jax.jit: when that fails, the error is check_per_example's ValueError naming the
        batch's rows, as the first batch's (a batch of shapes already run is not traced again)."""
        try:
            return self.compute_rows(state[0], state[1], batch)
        except (NonFiniteRowError, LayerInputError):
            raise
        except Exception as err:
            where = f"rows {batch.start} to {batch.start + batch.count - 1} of the data, at checkpoint {self._index}"
            try:  # traced abstractly, only on this error path: it raises if loss_fn cannot run on this batch
                check_per_example(self.loss_fn, self.layout, state[0], state[1], batch, self.plan.note, where)
            except ValueError as explained:
                raise explained from err
            raise

    def to_host(self, computed: Any, count: int, float32: bool) -> list[Any]:
        """Host views of the real rows of the computed block (no device-side slice copy); the
        compiled functions already give float32."""
        if self.kronecker is not None:
            return [self.kronecker.to_host(computed, count)]
        if isinstance(computed, tuple):
            return [tuple(np.asarray(b)[:count] for b in computed)]
        return [np.asarray(computed)[:count]]

    @staticmethod
    def wrap(array: np.ndarray, dtype: str) -> np.ndarray:
        """A stored array as NumPy in its dtype (bfloat16 bits viewed as ml_dtypes' bfloat16, no copy): how
        Gradients, which keeps and returns bfloat16 as its uint16 bits (Gradients.matrices), learns the dtype."""
        return array.view(jnp.bfloat16) if dtype == "bfloat16" else array


def _linen_default(params: Any) -> list[str] | None:
    """layers=None for a Flax NNX State or Module: the paths of its nnx.Param leaves, with a UserWarning naming the
    other floating Variables left out (BatchStat), if any (nnx_variables). For Flax linen variables holding
    collections besides "params": ["params"] (None for other
    params), with a UserWarning naming the collections left out when some are not LINEN_STATE's (a plain
    dict with a "params" entry and other trainable entries would otherwise lose them without a word). A Flax
    TrainState (restored as a dict, {"step", "params", "opt_state"}, or not) whose opt_state holds floating
    leaves gives ["params"] too, with a UserWarning naming the entries left out (its optimizer moments would
    triple the row width with zero columns)."""
    nnx = nnx_variables(params)
    if nnx is not None:
        chosen, others = nnx
        if not others:
            return None
        left_out = "; ".join(
            f"{kind} ({', '.join(paths[:4])}{f', ... ({len(paths)} leaves)' if len(paths) > 4 else ''})"
            for kind, paths in others.items()
        )
        warnings.warn(
            f"params are a Flax NNX {'State' if type(params).__name__ == 'State' else 'Module'}: only its "
            "nnx.Param variables are exported by default, leaving out the "
            f"floating leaves of {left_out}, taken as not trained by gradient steps (as BatchNorm's running "
            "statistics are); if they are (a Variable type of your own holding weights, not a subclass of "
            "nnx.Param), name them in layers= to export them too (layers=['*'] exports every floating leaf); to "
            "say the Params alone are meant, pass the State of nnx.split(model, nnx.Param, ...)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return chosen
    state = train_state_entries(params)
    if state:
        warnings.warn(
            f"params look like a Flax TrainState (a 'params' and an 'opt_state' entry): only "
            f"'params' is exported by default, leaving out {state}; to export other leaves, name them in layers= "
            "(layers=['*'] exports every floating leaf), or pass the TrainState's params alone",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return ["params"]
    others = linen_collections(params)
    if not others:
        return None
    unknown = [name for name in others if name not in LINEN_STATE]
    if unknown:
        warnings.warn(
            f"params were read as Flax linen variables (a 'params' collection and {others}): only the 'params' "
            f"collection is exported by default, leaving out {unknown}; if those are trained parameters, pass "
            "layers=['*'] (or name them in layers=)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return ["params"]


def _warn_saved_nnx(params: Any, source: Any) -> None:
    """A UserWarning when the first checkpoint (`source`: its path, or the params themselves) looks like a Flax NNX
    State saved to a file (every leaf at a 'value' key, as orbax / flax.serialization save nnx.split(model)'s State)
    and restored as dicts, by tracin from the path or by orbax without a target: the dicts have lost the Variable
    types, so every floating leaf is exported by default, BatchNorm's running statistics (BatchStat) too if the
    file holds them, which the State would leave out. Not for a real NNX State or Module; any layers= silences it."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(params, tuple(vars(nnx).get(k, ()) for k in ("State", "Module"))):
        return  # its leaves sit at 'value' too, but its Variable types are kept
    paths = [leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not paths or not all(path == "value" or path.endswith("/value") for path in paths):
        return
    named = f"checkpoint {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else "checkpoints[0] (params)"
    warnings.warn(
        f"{named} looks like a Flax NNX State saved to a file (every leaf at a 'value' key); restored from the "
        "file (by tracin from its path, or by orbax without a target) it has lost its Variable types, so every "
        "floating leaf is exported. If it "
        "holds more than nnx.Param variables (BatchNorm's running statistics, BatchStat), those are exported too: "
        "restore it yourself with the abstract State as target (ocp.StandardCheckpointer().restore(path, "
        "nnx.state(abstract_model))) and pass that State, or name the trained leaves in layers=. If it holds "
        "nnx.Param variables alone (the State of nnx.split(model, nnx.Param, ...)), every leaf is meant: pass "
        "layers=['*'] to say so, which silences this warning",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _kronecker_rows() -> type:
    """tracin.jax.token_projection.KroneckerRows, imported only for a kronecker=True projection (its jaxpr
    interpreter needs a recent JAX; `import tracin.jax` does not); ImportError naming the JAX it needs when
    this one lacks jax.extend.core.jaxprs_in_params (any other error of the import is raised as it is)."""
    try:
        from jax.extend import core
    except ImportError:  # a JAX without jax.extend.core
        core = None
    if not hasattr(core, "jaxprs_in_params"):
        raise ImportError(
            f"projection with kronecker=True needs JAX >= {KRONECKER_JAX}, found JAX {jax.__version__} (no "
            "jax.extend.core.jaxprs_in_params): upgrade JAX, or use a projection without kronecker"
        )
    from .token_projection import KroneckerRows

    return KroneckerRows


def _host_leaves(tree: Any, count: int) -> list[np.ndarray]:
    """The real rows of every array of a padded batch's pytree, on the host (for fingerprints)."""
    return [host_array(leaf)[:count] for leaf in jax.tree_util.tree_leaves(tree)]
