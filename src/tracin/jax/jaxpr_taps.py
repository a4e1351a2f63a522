"""Where a loss uses its 2-D weights, read off its jaxpr, and the jaxpr run again with taps there.

`find_sites` follows each candidate weight (an input of the jaxpr) through the views that keep it the
same matrix (transpose, convert_element_type, copy) and through nested calls (jit, closed_call, remat,
custom_jvp_call, custom_vjp_call), and maps it when its one use is a `dot_general` contracting one of
its axes with the other operand (the activation, any other axes "tokens") with no batch dimensions.
`run_tapped` evaluates the jaxpr with a perturbation added to the output of each mapped dot_general
and returns the activations it saw: the gradient w.r.t. a zero perturbation is the output gradient
of every token, so a weight's gradient is sum_t a_t b_t^T without being formed. Calls holding a mapped
site are evaluated inline (the derivative of a custom_jvp / custom_vjp function holding one is then
the derivative of its primal: `Site.custom` says so); everything else is bound unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

_VIEWS = ("transpose", "convert_element_type", "copy", "copy_p")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint")
_CUSTOM = ("custom_jvp_call", "custom_vjp_call")


@dataclass(frozen=True)
class Site:
    """A weight's one dot_general. path: eqn indices through the nested jaxprs; weight_operand: 0 (lhs)
    or 1 (rhs); contract: the weight axis contracted, in the leaf's own (rows, cols) orientation;
    act_contract: the activation's contracted axis; out_shape / out_dtype: the dot_general's output;
    custom: inside a custom_jvp / custom_vjp call (its rule is bypassed)."""

    path: tuple[int, ...]
    weight_operand: int
    contract: int
    act_contract: int
    out_shape: tuple[int, ...]
    out_dtype: Any
    custom: bool


def inner_jaxpr(eqn: Any) -> tuple[Jaxpr, Sequence[Any]] | None:
    """(jaxpr, consts) of a call eqn whose inputs and outputs map one to one onto its jaxpr's, else None."""
    name = eqn.primitive.name
    if name not in _CALLS + _CUSTOM:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    jaxpr, consts = (inner.jaxpr, inner.consts) if isinstance(inner, ClosedJaxpr) else (inner, ())
    if not isinstance(jaxpr, Jaxpr) or len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts


def find_sites(closed: ClosedJaxpr, candidates: Mapping[int, Any]) -> tuple[dict[Any, Site], dict[Any, str]]:
    """(sites, reasons): per candidate key its Site when mapped, else why not. candidates maps the
    positions of 2-D inputs of `closed` to keys (the caller's leaf ids)."""
    jaxpr = closed.jaxpr
    origin = {jaxpr.invars[i]: (key, False) for i, key in candidates.items()}
    uses: dict[Any, list[Site | str]] = {key: [] for key in candidates.values()}
    _walk(jaxpr, origin, (), False, uses)
    sites, reasons = {}, {}
    for key, found in uses.items():
        bad = [u for u in found if isinstance(u, str)]
        if bad:
            reasons[key] = bad[0]
        elif not found:
            reasons[key] = "not used by the loss"
        elif len(found) > 1:
            reasons[key] = f"used by {len(found)} dot_generals"
        else:
            sites[key] = found[0]
    return sites, reasons


def _walk(jaxpr: Jaxpr, origin: dict, prefix: tuple[int, ...], custom: bool, uses: dict) -> None:
    """Records in `uses` every use of a var in `origin` (var -> (key, transposed)) within `jaxpr`."""
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [(k, origin[v]) for k, v in enumerate(eqn.invars) if isinstance(v, Var) and v in origin]
        if not ins:
            continue
        name, path = eqn.primitive.name, (*prefix, i)
        inner = inner_jaxpr(eqn)
        if name in _VIEWS and len(eqn.outvars) == 1:
            key, flipped = ins[0][1]
            perm = tuple(eqn.params.get("permutation", (0, 1)))
            origin[eqn.outvars[0]] = (key, flipped ^ (perm == (1, 0)))
        elif name == "dot_general":
            for k, (key, flipped) in ins:
                uses[key].append(_dot_site(eqn, k, flipped, len(ins), path, custom))
        elif inner is not None:
            sub, _ = inner
            _walk(sub, {sub.invars[k]: o for k, o in ins}, path, custom or name in _CUSTOM, uses)
        else:
            for _, (key, _) in ins:
                uses[key].append(f"used by {name}")
    for v in jaxpr.outvars:
        if isinstance(v, Var) and v in origin:
            uses[origin[v][0]].append("returned by a nested call" if prefix else "returned by the loss")


def _dot_site(eqn: Any, k: int, flipped: bool, n_weights: int, path: tuple, custom: bool) -> Site | str:
    """The Site of a dot_general whose operand k is a weight view, or why it cannot be mapped."""
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if n_weights > 1:
        return "multiplied by a chosen weight in one dot_general"
    if batch_l or batch_r:
        return "used in a dot_general with batch dimensions"
    contract = (contract_l, contract_r)
    if len(contract[k]) != 1:
        return "used in a dot_general contracting both of its axes"
    out = eqn.outvars[0].aval
    return Site(path, k, int(contract[k][0]) ^ flipped, int(contract[1 - k][0]), tuple(out.shape), out.dtype, custom)


def run_tapped(
    closed: ClosedJaxpr, sites: Mapping[Any, Site], args: Sequence[Any], perturb: Mapping[Any, Any]
) -> tuple[list[Any], dict[Any, Any]]:
    """(outputs of `closed` on args, {key: activation}) with perturb[key] added to the output of each
    site's dot_general."""
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


def token_matrices(site: Site, act: Any, grad: Any) -> tuple[Any, Any]:
    """(U (T, rows), V (T, cols)) of one example: the weight's gradient is U^T V = sum_t u_t v_t^T. act: the
    activation operand, grad: the gradient of the dot_general's output; T = the activation's other axes."""
    a = _last(act, site.act_contract)
    b = _last(grad, 0) if site.weight_operand == 0 else grad  # output axes: (weight, tokens) or (tokens, weight)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a, b) if site.contract == 0 else (b, a)


def _last(x: Any, axis: int) -> Any:
    order = [d for d in range(np.ndim(x)) if d != axis] + [axis]
    return x.transpose(order)
