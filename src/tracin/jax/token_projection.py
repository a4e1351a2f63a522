"""Per-example gradients projected per token by Kronecker products (tracin.Projection(..., kronecker=True)).

A weight W whose one use in the per-example loss is a dot_general with an activation over T tokens
contracting its first or its last axes (W seen as a (rows, cols) matrix of those axes by the others,
row-major: a Flax DenseGeneral kernel (in, heads, head_dim) is in x (heads * head_dim)), or a lookup of
the rows of a 2-D W by T token ids (an embedding), has the per-example gradient
G = sum_t u_t v_t^T (u, v: the token's activation, or the one-hot of its id, and its output gradient, on
the sides of W they meet). Its segment of the projected row is

    P_rows G P_cols^T = sum_t (P_rows u_t) (P_cols v_t)^T        (k_rows x k_cols, row-major)

computed from the activations and output gradients of the jaxpr run with taps (jaxpr_taps), so G is
never formed: O(T (rows k_rows + cols k_cols + k_rows k_cols)) per example (a lookup gathers columns of
P_rows instead of multiplying by a one-hot). A token whose output gradient is zero (padding the loss
masks) adds nothing. The layout is one segment per chosen leaf in PARAM_ORDER: LayerMatrix(rows, cols)
in the leaf's own orientation for each mapped weight (a Flax kernel (in, out) is in x out, a
torch-layout (out, in) weight out x in), its plain width for every other leaf, whose full per-example
gradient is computed and projected flat: biases (1-D, or of more axes only added to activations), norms,
and the leaves of two or more axes that cannot be mapped (used twice, reshaped, scaled or added to another
value before their matmul, a convolution kernel, inside scan / while / cond or a custom_jvp / custom_vjp
function, whose rule is kept; one warning names them and says why). The result equals Projection.apply
on the full rows with that layout. The weights are found by tracing the loss of one example of the first
batch; batches of other shapes are traced again and must map the same weights.

preconditioner="adam" (as tracin.torch): a mapped weight uses the rank-one factorisation of v
(tracin._export.rank_one): the columns of P_rows scaled by sqrt(s / r) and those of P_cols by 1 / sqrt(c),
once per checkpoint; the other leaves are preconditioned exactly, g / (sqrt(v_hat) + eps), before their
projection.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._export.checkpoints import Checkpoint
from .._export.kronecker_share import check_balanced
from .._export.preconditioner import Preconditioned
from .._export.projection import keeping_nonfinite
from .._export.rank_one import _scales
from .._export.transforms import Recorded
from ..projection import LayerMatrix, Projection
from .batches import Batch
from .jaxpr_taps import Site, find_sites, run_tapped
from .params import ParamLayout
from .per_example import LossWatch, _one_example_loss, check_per_example, shared_jit

# the factorisation is of v_hat + eps^2; the recorded text keeps "v" as earlier versions wrote it (resume and
# scoring compare metadata["preconditioner"]: stores exported before would otherwise be refused)
_FACTORED_ADAM = (
    "mapped weights: rank-one r c^T / sum(r) of v + eps^2 (exact for Adafactor, approximate for Adam); "
    "other parameters: g / (sqrt(v_hat) + eps)"
)


def _avals(tree: Any, strip: int = 0) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[strip:], a.dtype), tree)


def trace_sites(loss_fn: Callable, layout: ParamLayout, selected: Any, arrays: Any, example: Any) -> tuple:
    """(closed jaxpr of one example's loss, sites, reasons) for avals of the selected leaves, the other
    array leaves and one (input, target) example; the candidates are the selected leaves of two or more axes
    (by index)."""
    closed = jax.make_jaxpr(_one_example_loss(loss_fn, layout))(selected, arrays, *example)
    candidates = {k: k for k, leaf in enumerate(selected) if len(leaf.shape) >= 2}
    return (closed, *find_sites(closed, candidates))


class KroneckerRows:
    """(batch, projection.dim) float32 rows of the selected leaves' per-example gradients, projected
    segment by segment, the mapped weights per token. `prepare` (on the first batch) fixes the layout."""

    def __init__(
        self,
        loss_fn: Callable,
        layout: ParamLayout,
        projection: Projection,
        params: Any,
        checkpoints: Sequence[Checkpoint],
        adam: Mapping[str, float] | None,
    ):
        """checkpoints: the parsed checkpoints (their optimizer states, with `adam`); adam: Adam's b1, b2, eps
        for preconditioner="adam", None for plain gradients."""
        self.loss_fn, self.layout, self.projection = loss_fn, layout, projection
        self.checkpoints, self.adam = checkpoints, adam
        self._checkpoint = 0  # the checkpoint being exported
        self._built: tuple[int | None, list] = (None, [])  # (checkpoint, its factors) of _factors
        self._warned: set[int] = set()  # checkpoints whose factors have been built (and zero v warned about)
        selected, arrays = layout.split(params)
        self._avals = _avals(selected), _avals(arrays)
        self.dtype = jnp.float64 if jnp.result_type(*selected) == jnp.float64 else jnp.float32
        self.dims = projection.segment_dims(len(selected))
        self.starts = np.concatenate([[0], np.cumsum(self.dims)]).tolist()
        self.sites: dict[int, Site] | None = None
        self.watch: LossWatch | None = None  # given each batch's per-example losses, if set (the export's)

    # --- the layout, fixed by the first batch ---

    def prepare(self, batch: Batch, note: str = "") -> None:
        """Traces one example of `batch`, maps the weights it can, warns about the weights it cannot,
        and compiles the rows function. note: how the data was read, for loss_fn errors."""
        if self.sites is not None:
            return
        check_per_example(self.loss_fn, self.layout, *self._avals, batch, note)  # its errors before the tracer's
        example = _avals((batch.inputs, batch.targets), strip=1)
        _, self.sites, reasons = trace_sites(self.loss_fn, self.layout, *self._avals, example)
        if reasons:
            paths = self.layout.describe()
            why = "; ".join(f"{paths[k][0]!r}: {r}" for k, r in sorted(reasons.items()))
            warnings.warn(
                "projection with kronecker=True: these weights are not used once by a dot_general or a lookup "
                f"by ids the per-token projection can follow ({why}); their gradients are computed in full and "
                "projected as plain segments",
                UserWarning,
                stacklevel=2,
            )
        self.mapped = tuple(sorted(self.sites))
        shapes = [s.shape for s in self._avals[0]]
        self.layers = {k: _matrix(shapes[k], self.sites[k].split) for k in self.mapped}
        self.plain = [k for k in range(len(shapes)) if k not in self.sites]
        self.widths = {k: int(np.prod(shapes[k], dtype=np.int64)) for k in self.plain}
        self._check_balanced()
        plain_params = [self.layout.describe()[k] for k in self.plain]
        self._plain_adam = (
            Preconditioned(
                "adam",
                lambda c: self.checkpoints[c].optimizer.moments(plain_params),
                {},
                [path for path, _ in plain_params],
                [shape for _, shape in plain_params],
            )
            if self.adam is not None and self.plain
            else None
        )
        splits = tuple(self.sites[k].split for k in self.mapped)
        layout, mapped, key = self.layout, self.mapped, ("kronecker_rows", self.layout, self.mapped, splits)
        self._rows = shared_jit((self.loss_fn,), key, lambda loss: rows_function(loss, layout, mapped, splits))

    def _check_balanced(self) -> None:
        """ValueError when a mapped weight's share of dim factors badly (a prime share p gives p x 1: every
        token's side projected to one number), with a dim that factors well on every mapped weight
        (tracin._export.kronecker_share, as tracin.torch)."""
        paths = self.layout.describe()
        shares = [(f"weight {paths[k][0]!r}", self.dims[k], layer) for k, layer in self.layers.items()]
        check_balanced(self.projection.dim, shares, len(self.dims))

    def spec(self) -> dict:
        """metadata["projection"]: the Projection's spec and the layout (Projection.apply's segments=)."""
        if self.sites is None:
            raise RuntimeError("the layout is fixed by the first batch: no batch has been seen")
        segments = [self.layers[k].to_dict() if k in self.sites else self.widths[k] for k in range(len(self.dims))]
        return {**self.projection.to_dict(), "segments": segments}

    def recorded(self) -> list[Recorded]:
        """The row transforms the metadata records: the preconditioner (if any), then the projection."""
        if self.adam is None:
            return [_Layout(self)]
        spec = {"kind": "adam", "factored": _FACTORED_ADAM, **self.adam}
        return [Recorded("preconditioner", spec, self.projection.dim), _Layout(self)]

    # --- per checkpoint and per batch ---

    def begin(self, checkpoint: int) -> None:
        """The rows that follow are of checkpoint `checkpoint` (whose optimizer state scales the factors)."""
        self._checkpoint = checkpoint

    def _factors(self) -> list[tuple[Any, Any]]:
        """Per mapped weight (P_rows, P_cols) in the compute dtype, scaled with "adam" (built once per checkpoint)."""
        key = self._checkpoint if self.adam is not None else 0
        if self._built[0] != key:
            paths = self.layout.describe()
            moments = self.checkpoints[key].optimizer.moments([paths[k] for k in self.mapped]) if self.adam else None
            warn = key not in self._warned  # one zero-v warning per weight per checkpoint
            self._warned.add(key)
            factors = []
            for j, k in enumerate(self.mapped):
                layer = self.layers[k]
                p_rows, p_cols = (
                    np.asarray(p, np.float64) for p in self.projection.layer_factors(k, layer, self.dims[k])
                )
                if moments is not None:
                    left, right = _scales(moments, j, False, layer.rows, repr(paths[k][0]), key, warn)
                    p_rows, p_cols = p_rows * left, p_cols * right
                factors.append((jnp.asarray(p_rows, self.dtype), jnp.asarray(p_cols, self.dtype)))
            self._built = (key, factors)
        return self._built[1]

    def __call__(self, selected: list, arrays: list, batch: Batch) -> tuple[list, Any]:
        """(per mapped weight its (batch, k_rows * k_cols) block, (batch, plain width) full rows), on the device."""
        mapped = [selected[k] for k in self.mapped]
        plain = [selected[k] for k in self.plain]
        blocks, rows, losses = self._rows(mapped, plain, arrays, self._factors(), batch.inputs, batch.targets)
        if self.watch is not None:
            self.watch(losses, batch)
        return blocks, rows

    def to_host(self, computed: tuple[list, Any], count: int) -> np.ndarray:
        """The (count, dim) float32 rows: the mapped blocks in place, the plain leaves projected flat. An
        example whose plain gradients hold NaN or Inf gets NaN in their segments (keeping_nonfinite), as
        its mapped blocks get NaN: its row is stored, for scoring to name, as without a projection."""
        blocks, plain = computed
        out = np.zeros((count, self.projection.dim), np.float32)
        for k, block in zip(self.mapped, blocks, strict=True):
            block = np.asarray(block)[:count]
            out[:, self.starts[k] : self.starts[k] + block.shape[1]] = block
        plain = np.asarray(plain)[:count]
        if self._plain_adam is not None:
            plain = self._plain_adam.apply(plain, self._checkpoint, 0)
        for k, part in zip(self.plain, keeping_nonfinite(self._project_plain, plain), strict=True):
            out[:, self.starts[k] : self.starts[k + 1]] = part
        return out

    def _project_plain(self, plain: np.ndarray) -> list[np.ndarray]:
        """Each plain leaf's columns of `plain` (rows, total plain width) projected flat: (rows, its dim)."""
        parts, col = [], 0
        for k in self.plain:
            part = np.ascontiguousarray(plain[:, col : col + self.widths[k]])
            parts.append(self.projection.project_segment(part, k, self.widths[k], self.dims[k]))
            col += self.widths[k]
        return parts


class _Layout(Recorded):
    """The projection as the metadata records it, its layout read once the first batch has fixed it."""

    def __init__(self, rows: KroneckerRows):
        super().__init__("projection", {}, rows.projection.dim)
        self._rows = rows

    def to_dict(self) -> dict:
        return self._rows.spec()


def rows_function(loss_fn: Callable, layout: ParamLayout, mapped: tuple[int, ...], splits: tuple[int, ...]) -> Callable:
    """rows(mapped leaves, plain leaves, other arrays, factors, inputs, targets) -> (blocks, plain rows,
    per-example losses) for the weights `mapped` (selected leaf indices) seen as matrices of their first
    `splits` axes by the rest: per example the jaxpr of its loss run with taps (traced for the batch's
    shapes), differentiated w.r.t. the taps and the plain leaves only, the taps projected token by token
    in the factors' dtype."""

    def rows(mapped_leaves, plain_leaves, arrays, factors, inputs, targets):
        selected = _merge(mapped, mapped_leaves, plain_leaves)
        example = _avals((inputs, targets), strip=1)
        closed, sites, _ = trace_sites(loss_fn, layout, _avals(selected), _avals(arrays), example)
        found, fixed = {(k, site.split) for k, site in sites.items()}, set(zip(mapped, splits, strict=True))
        if found != fixed:  # a weight mapped as another matrix is named once
            paths = [layout.describe()[k][0] for k in sorted({k for k, _ in found ^ fixed})]
            raise ValueError(
                f"projection with kronecker=True: a batch of input shapes {jax.tree_util.tree_leaves(example)} "
                f"maps other weights per token than the first batch did ({paths}): give every batch the same shapes"
            )

        def one(x, y):
            def loss(perturb, plain):
                args = jax.tree_util.tree_leaves((_merge(mapped, mapped_leaves, plain), arrays, x, y))
                outs, acts = run_tapped(closed, sites, args, perturb)
                return outs[0], acts

            zeros = {k: jnp.zeros(s.out_shape, s.out_dtype) for k, s in sites.items()}
            (value, acts), (grads, plain_grads) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
                zeros, plain_leaves
            )
            blocks = [
                _token_sum(sites[k], acts[k], grads[k], p_rows, p_cols).reshape(-1).astype(jnp.float32)
                for k, (p_rows, p_cols) in zip(mapped, factors, strict=True)
            ]
            flat = [g.reshape(-1).astype(jnp.float32) for g in plain_grads]
            return blocks, jnp.concatenate(flat) if flat else jnp.zeros((0,), jnp.float32), value

        return jax.vmap(one)(inputs, targets)

    return rows


def _token_sum(site: Site, act: Any, grad: Any, p_rows: Any, p_cols: Any) -> Any:
    """sum_t (P_rows u_t)(P_cols v_t)^T (k_rows, k_cols) of one example: per token its activation (or the
    one-hot of its id) on the matrix side `site.contract`, its output gradient on the other."""
    p_act, p_out = (p_rows, p_cols) if site.contract == 0 else (p_cols, p_rows)
    projected_out = _tokens_by(grad, site.out_axes).astype(p_out.dtype) @ p_out.T
    if site.lookup:  # P e_id is column id of P; an id out of range takes no gradient, or the clamped row's
        ids, size = act[..., 0].reshape(-1), p_act.shape[1]
        kept = jnp.ones(ids.shape, p_act.dtype) if site.clip else ((ids >= 0) & (ids < size)).astype(p_act.dtype)
        projected_act = p_act.T[jnp.clip(ids, 0, size - 1)] * kept[:, None]
    else:
        projected_act = _tokens_by(act, site.act_axes).astype(p_act.dtype) @ p_act.T
    left, right = (projected_act, projected_out) if site.contract == 0 else (projected_out, projected_act)
    return left.T @ right


def _tokens_by(x: Any, axes: tuple[int, ...]) -> Any:
    """x as (tokens, features): `axes` moved last (in that order) and flattened, the other axes the tokens."""
    x = jnp.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    return x.reshape(-1, int(np.prod(x.shape[x.ndim - len(axes) :], dtype=np.int64)))


def _matrix(shape: tuple[int, ...], split: int) -> LayerMatrix:
    """The leaf of `shape` as a matrix: its first `split` axes the rows, the others the columns."""
    return LayerMatrix(int(np.prod(shape[:split], dtype=np.int64)), int(np.prod(shape[split:], dtype=np.int64)))


def _merge(mapped: tuple[int, ...], mapped_leaves: list, plain_leaves: list) -> list:
    """The selected leaves in order from the mapped ones (at indices `mapped`) and the others."""
    mapped_at, plain = dict(zip(mapped, mapped_leaves, strict=True)), iter(plain_leaves)
    return [mapped_at[k] if k in mapped_at else next(plain) for k in range(len(mapped_leaves) + len(plain_leaves))]
