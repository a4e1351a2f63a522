"""Where a loss uses its weights, read off its jaxpr, and the jaxpr run again with taps there.

`find_sites` follows each candidate weight (an input of the jaxpr) through the views that keep it the
same matrix (transpose, convert_element_type, copy) and through nested calls (jit, closed_call, remat),
and maps it when its one use is
- a `dot_general` contracting its first or its last axes with the other operand (the activation, its
  other axes "tokens") with no batch dimensions, or
- a `gather` of whole rows (or columns) by integer ids, an embedding lookup (`W[ids]`, `jnp.take`, a
  scalar `W[id]` under `jax.vmap` as in `eqx.nn.Embedding`).
Any other use is a reason it is not mapped (used twice, reshaped, scaled or added to another value before
its matmul, a convolution, inside scan / while / cond...), except a bias's: additions (after reshapes and
broadcasts) whose sums, followed through views, reshapes, further additions and calls, reach no dot_general,
gather or convolution as a value of the leaf's size (a leaf broadcast over the tokens is a bias).
`run_tapped` evaluates the jaxpr with a perturbation added to the output of each mapped eqn and returns
the activations (ids for a lookup) it saw: the gradient w.r.t. a zero perturbation is the output gradient
of every token, so a weight's gradient is sum_t a_t b_t^T without being formed. Calls holding a mapped
site are evaluated inline; everything else is bound unchanged. A weight passed to a custom_jvp /
custom_vjp function is never mapped: inlining the function would bypass its rule, for the gradients of
every input (an upstream weight's too), so the function is bound whole and its rule kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var, jaxprs_in_params
from jax.lax import GatherScatterMode

_VIEWS = ("transpose", "convert_element_type", "copy", "copy_p")
_RESHAPES = ("reshape", "broadcast_in_dim", "squeeze")
_ADDS = ("add", "sub", "add_any")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint")
_CUSTOM = ("custom_jvp_call", "custom_vjp_call")
_FACTORS = ("dot_general", "gather", "conv_general_dilated")
_TWO_WEIGHTS = "multiplied by another chosen weight in one dot_general"


@dataclass(frozen=True)
class Site:
    """A weight's one mapped use, the weight seen as a matrix: its first `split` axes are the rows, the
    others the columns (a leaf (in, heads, head_dim) contracted on its first axis is in x (heads * head_dim),
    row-major as the leaf is flattened). path: eqn indices through the nested jaxprs; lookup: a gather of
    rows (or columns) by ids, else a dot_general; weight_operand: 0 (lhs) or 1 (rhs); contract: the
    matrix side, 0 (rows) or 1 (columns), met by the activation (or indexed by the ids); act_axes: the
    activation's axes on that side, in the leaf's axis order (() for ids); out_axes: the output's axes
    on the weight's other side, in the leaf's axis order; out_shape / out_dtype: the output; clip:
    out-of-range ids are clamped (else they take no gradient)."""

    path: tuple[int, ...]
    lookup: bool
    weight_operand: int
    split: int
    contract: int
    act_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    clip: bool


def inner_jaxpr(eqn: Any) -> tuple[Jaxpr, Sequence[Any]] | None:
    """(jaxpr, consts) of a call eqn whose inputs and outputs map one to one onto its jaxpr's, else None."""
    name = eqn.primitive.name
    if name not in _CALLS:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    jaxpr, consts = (inner.jaxpr, inner.consts) if isinstance(inner, ClosedJaxpr) else (inner, ())
    if not isinstance(jaxpr, Jaxpr) or len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts


def find_sites(closed: ClosedJaxpr, candidates: Mapping[int, Any]) -> tuple[dict[Any, Site], dict[Any, str]]:
    """(sites, reasons): per candidate key its Site when mapped, else why not, except for a bias: a
    candidate whose every use is an addition (after views, reshapes, broadcasts) whose sum reaches no
    dot_general, gather or convolution at the leaf's size, its gradient a sum of output gradients with no
    per-token outer product to factor, is in neither. candidates maps the
    positions of inputs of `closed` with two or more axes to keys (the caller's leaf ids)."""
    jaxpr = closed.jaxpr
    origin = {jaxpr.invars[i]: (key, tuple(range(jaxpr.invars[i].aval.ndim)), "") for i, key in candidates.items()}
    uses: dict[Any, list[Site | _Bad]] = {key: [] for key in candidates.values()}
    _walk(jaxpr, origin, (), uses, {key: jaxpr.invars[i].aval.size for i, key in candidates.items()})
    sites, reasons = {}, {}
    for key, found in uses.items():
        bad = [u for u in found if isinstance(u, _Bad) and not u.bias]
        if not found:
            reasons[key] = "not used by the loss"
        elif all(isinstance(u, _Bad) for u in found) and not bad:
            continue
        elif len(found) == 1 and not bad:
            sites[key] = found[0]
        else:
            reasons[key] = bad[0].reason if bad else f"used {len(found)} times"
    return sites, reasons


@dataclass(frozen=True)
class _Bad:
    """A use that cannot be mapped; bias: an addition to another value (after views, reshapes, broadcasts)."""

    reason: str
    bias: bool = False


@dataclass(frozen=True)
class _Sum:
    """A sum of chosen leaves (keys) and other values, followed through views, reshapes, broadcasts, further
    additions and nested calls to see whether it reaches a dot_general, gather or convolution."""

    keys: frozenset


def _walk(jaxpr: Jaxpr, origin: dict, prefix: tuple[int, ...], uses: dict, sizes: Mapping) -> list[_Sum | None]:
    """Records in `uses` every use of a var in `origin` (var -> (key, leaf axis of each of its axes or None
    once reshaped, the first reshaping primitive or ""), or a _Sum) within `jaxpr`; returns the _Sum of each
    of its outputs that is one, else None. sizes: each key's number of elements. A sum is followed for the
    leaves of its size only: a leaf broadcast over more elements (tokens) is a bias, added to activations."""
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [(k, origin[v]) for k, v in enumerate(eqn.invars) if isinstance(v, Var) and v in origin]
        if not ins:
            continue
        name, path = eqn.primitive.name, (*prefix, i)
        inner = inner_jaxpr(eqn)
        added = frozenset().union(*(o.keys for _, o in ins if isinstance(o, _Sum)))
        views = [(k, o) for k, o in ins if not isinstance(o, _Sum)]
        if inner is not None:
            sub, _ = inner
            sums = _walk(sub, {sub.invars[k]: o for k, o in ins}, path, uses, sizes)
            origin.update((v, s) for v, s in zip(eqn.outvars, sums, strict=True) if s is not None)
        elif name in _ADDS:
            for _, (key, _, _) in views:
                uses[key].append(_Bad(f"added by {name}", bias=True))
            _follow(eqn.outvars[0], added.union(key for _, (key, _, _) in views), origin, sizes)
        elif added and name in _VIEWS + _RESHAPES and len(eqn.outvars) == 1:
            _follow(eqn.outvars[0], added, origin, sizes)
        else:  # a sum used otherwise ends here: a bias's (tanh, mul, a norm...)
            for key in added if name in _FACTORS else ():
                uses[key].append(_Bad(f"added to another value before a {name}"))
            _use(eqn, name, path, views, origin, uses)
    for v in jaxpr.outvars:
        if isinstance(v, Var) and v in origin and not isinstance(origin[v], _Sum):
            uses[origin[v][0]].append(_Bad("returned by a nested call" if prefix else "returned by the loss"))
    return [origin[v] if isinstance(v, Var) and isinstance(origin.get(v), _Sum) else None for v in jaxpr.outvars]


def _follow(out: Var, keys: frozenset, origin: dict, sizes: Mapping) -> None:
    """Makes `out` a _Sum of those of `keys` whose leaves have its number of elements, if any."""
    same = frozenset(key for key in keys if sizes[key] == out.aval.size)
    if same:
        origin[out] = _Sum(same)


def _use(eqn: Any, name: str, path: tuple[int, ...], ins: list, origin: dict, uses: dict) -> None:
    """Records the use by `eqn` (neither a call nor an addition) of the weight views `ins`, [(operand, origin)]."""
    if not ins:
        return
    if name in _VIEWS + _RESHAPES and len(eqn.outvars) == 1:
        key, axes, via = ins[0][1]
        if name in _RESHAPES:
            axes, via = None, via or name
        elif axes is not None:
            axes = tuple(axes[a] for a in eqn.params.get("permutation", range(len(axes))))
        origin[eqn.outvars[0]] = (key, axes, via)
    elif name in ("dot_general", "gather") and any(axes is None for _, (_, axes, _) in ins):
        other = _TWO_WEIGHTS if name == "dot_general" else f"used with another chosen weight in one {name}"
        for _, (key, axes, via) in ins:
            uses[key].append(_Bad(f"passed through {via} before a {name}" if axes is None else other))
    elif name == "dot_general":
        for k, (key, axes, _) in ins:
            uses[key].append(_loud(_dot_site(eqn, k, axes, len(ins), path)))
    elif name == "gather" and [k for k, _ in ins] == [0]:
        key, axes, _ = ins[0][1]
        uses[key].append(_loud(_lookup_site(eqn, axes, path)))
    elif name in _CUSTOM:
        for _, (key, _, _) in ins:
            uses[key].append(_Bad(f"used inside a {name.split('_call')[0]} function, whose rule is kept"))
    else:
        where = "inside" if any(True for _ in jaxprs_in_params(eqn.params)) else "by"  # scan, while, cond
        for _, (key, _, _) in ins:
            uses[key].append(_Bad(f"used {where} {name}"))


def _loud(site: Site | str) -> Site | _Bad:
    return site if isinstance(site, Site) else _Bad(site)


def _dot_site(eqn: Any, k: int, axes: tuple[int, ...], n_weights: int, path: tuple) -> Site | str:
    """The Site of a dot_general whose operand k is a weight view (its axes are the leaf's `axes`), or why
    it cannot be mapped: the contracted leaf axes must be its first or its last ones."""
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if n_weights > 1:
        return _TWO_WEIGHTS
    if batch_l or batch_r:
        return "used in a dot_general with batch dimensions"
    mine, other = (contract_l, contract_r) if k == 0 else (contract_r, contract_l)
    leaf_contract = sorted(axes[a] for a in mine)
    n = len(axes)
    if not mine or len(mine) == n or leaf_contract not in (list(range(len(mine))), list(range(n - len(mine), n))):
        return "used in a dot_general contracting other axes than its first or its last ones"
    act_axes = tuple(a for _, a in sorted((axes[w], int(a)) for w, a in zip(mine, other, strict=True)))
    out = eqn.outvars[0].aval
    free = [a for a in range(n) if a not in mine]  # in the output: lhs free axes, then rhs free axes
    first = 0 if k == 0 else len(out.shape) - len(free)
    out_axes = tuple(first + j for _, j in sorted((axes[a], j) for j, a in enumerate(free)))
    contract = 0 if leaf_contract[0] == 0 else 1
    split = len(mine) if contract == 0 else n - len(mine)
    return Site(path, False, k, split, contract, act_axes, out_axes, out.shape, out.dtype, False)


def _lookup_site(eqn: Any, axes: tuple[int, ...], path: tuple) -> Site | str:
    """The Site of a gather of whole rows (or columns) of a 2-D weight view by ids, or why it is not one.

    Two forms: W[ids] (jnp.take, flax Embed): indices (..., 1), the looked-up axis collapsed; and a scalar
    W[id] under jax.vmap (eqx.nn.Embedding): indices (..., 2) = (id, start on the other axis), nothing
    collapsed, a slice of 1 x the whole other axis. That start can only be 0, which CLIP clamps it to
    and PROMISE_IN_BOUNDS promises; FILL_OR_DROP would drop the row for another start, so that mode of
    this form is not taken. The ids are the indices' first component (start_index_map begins with the
    looked-up axis)."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape, ids = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    mode, starts = eqn.params["mode"], tuple(dn.start_index_map)
    if len(dn.collapsed_slice_dims) == 1:  # W[ids]
        axis = dn.collapsed_slice_dims[0]
        form = starts == (axis,) and len(dn.offset_dims) == 1 and ids[-1:] == (1,)
        out_axis = dn.offset_dims[0] if form else -1
    else:  # W[id] under vmap: offset_dims[a] is the output axis of operand axis a
        axis = starts[0] if len(starts) == 2 else -1
        form = (
            not dn.collapsed_slice_dims
            and sorted(starts) == [0, 1]
            and len(dn.offset_dims) == 2
            and ids[-1:] == (2,)
            and mode in (GatherScatterMode.CLIP, GatherScatterMode.PROMISE_IN_BOUNDS)
        )
        out_axis = dn.offset_dims[1 - axis] if form else -1
    if (
        not form
        or len(shape) != 2
        or dn.operand_batching_dims
        or sizes[axis] != 1
        or sizes[1 - axis] != shape[1 - axis]
        or mode == GatherScatterMode.ONE_HOT
    ):
        return "used in a gather that is not a lookup of whole rows of a matrix by ids"
    out = eqn.outvars[0].aval
    clip = mode == GatherScatterMode.CLIP  # only CLIP's gradient clamps: jax.grad drops other out-of-range ids
    return Site(path, True, 0, 1, axes[axis], (), (out_axis,), out.shape, out.dtype, clip)


def run_tapped(
    closed: ClosedJaxpr, sites: Mapping[Any, Site], args: Sequence[Any], perturb: Mapping[Any, Any]
) -> tuple[list[Any], dict[Any, Any]]:
    """(outputs of `closed` on args, {key: activation, or ids for a lookup}) with perturb[key] added to the
    output of each site's eqn."""
    by_path = {site.path: key for key, site in sites.items()}
    prefixes = {site.path[:n] for site in sites.values() for n in range(1, len(site.path))}
    acts: dict[Any, Any] = {}

    def run(jaxpr: Jaxpr, consts: Sequence[Any], values: Sequence[Any], prefix: tuple[int, ...]) -> list[Any]:
        env: dict[Var, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, values, strict=True))

        def read(v: Any) -> Any:
            return v.val if isinstance(v, Literal) else env[v]

        for i, eqn in enumerate(jaxpr.eqns):
            path, invals = (*prefix, i), [read(v) for v in eqn.invars]
            if path in prefixes:
                sub, sub_consts = inner_jaxpr(eqn)
                outs = run(sub, sub_consts, invals, path)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
                if path in by_path:
                    key = by_path[path]
                    acts[key] = invals[1 - sites[key].weight_operand]
                    outs = [outs[0] + perturb[key]]
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    return run(closed.jaxpr, closed.consts, args, ()), acts
