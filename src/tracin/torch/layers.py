"""Choosing the parameters whose gradients are exported, and finding the last Linear layer."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .._export.layers import as_patterns, matches

EXAMPLE = "['fc2'] or ['encoder.layer.11.*']"


def qualified(module_name: str, leaf: str) -> str:
    """The full name of `leaf` (a parameter, buffer or submodule) of the module named `module_name`:
    "fc2.weight", and "weight" for the model itself (named "" by named_modules(): a bare nn.Linear)."""
    return f"{module_name}.{leaf}" if module_name else leaf


def _matches(name: str, pattern: str) -> bool:
    """A module-name prefix ("fc2" matches fc2.weight, fc2.bias) or a glob ("encoder.*.weight")."""
    return matches(name, pattern, ".")


def select_parameters(model: nn.Module, layers: Sequence[str] | str | None, note_tied: bool = True) -> list[str]:
    """Names of the chosen parameters, in the model's order.

    layers=None: every parameter with requires_grad. Otherwise the parameters matched by the patterns
    (each must match at least one), among the trainable ones: a pattern matching trainable and frozen
    (requires_grad=False) parameters chooses its trainable ones only (layers=["encoder"] over a LoRA
    encoder: the adapters, not the frozen base weights training never changed), while a pattern
    matching frozen parameters only chooses them (a frozen layer named on purpose, a parameter's full
    name: "encoder.0.base.weight"). note_tied: a warning when a pattern matches a tied second name
    whose first name is not chosen (it is left out).
    """
    params = dict(model.named_parameters())
    if layers is None:
        names = [n for n, p in params.items() if p.requires_grad]
        if not names:
            raise ValueError("the model has no trainable parameters; name the layers to use with layers=")
        return names
    layers = as_patterns(layers, EXAMPLE)
    first = tied_first_names(model)
    for pattern in layers:
        if not any(_matches(n, pattern) for n in params):
            tied = [f"{n!r} is tied to {first[n]!r}" for n in first if _matches(n, pattern)]
            if tied:
                raise ValueError(
                    f"layers: {pattern!r} matches only tied second names ({'; '.join(tied[:4])}); the "
                    "parameter is chosen (and its gradient taken over all its uses) under its first name"
                )
            modules = [m for m, _ in model.named_modules() if m]
            names = list(params)
            shown = (
                f"modules are {_listed(modules)}; parameters are {_listed(names)}"
                if modules
                else (f"the model ({type(model).__name__}) has no submodules; its parameters are {_listed(names)}")
            )
            raise ValueError(f"layers: {pattern!r} matches no parameter; {shown}")
    only_frozen = {
        pattern: not any(p.requires_grad for n, p in params.items() if _matches(n, pattern)) for pattern in layers
    }
    chosen = [
        n
        for n, p in params.items()
        if any(_matches(n, pattern) and (p.requires_grad or only_frozen[pattern]) for pattern in layers)
    ]
    left_out = {n: f for n, f in first.items() if f not in chosen and _matched(n, layers)}
    if note_tied and left_out:
        warnings.warn(
            f"layers={layers!r} leaves out {'; '.join(f'{n!r} (tied to {f!r})' for n, f in left_out.items())}: a "
            f"tied weight is exported under its first name only, when that is chosen (add {list(left_out.values())} "
            "to layers= for its gradient over all its uses)",
            stacklevel=4,  # export_gradients' caller
        )
    return chosen


def _listed(names: Sequence[str]) -> str:
    """The first 30 names as a list, '...' after it when there are more."""
    return f"{list(names[:30])}{' ...' if len(names) > 30 else ''}"


def _matched(name: str, patterns: Sequence[str]) -> bool:
    return any(_matches(name, p) for p in patterns)


def tied_first_names(model: nn.Module, buffers: bool = False) -> dict[str, str]:
    """{second name: first name} of every tied parameter (a decoder weight shared with an embedding),
    and buffer with `buffers`: named_parameters() and load_checkpoint know such a tensor under its
    first name only."""
    first: dict[int, str] = {}
    second: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    if buffers:
        named += list(model.named_buffers(remove_duplicate=False))
    for name, p in named:
        if id(p) in first:
            second[name] = first[id(p)]
        else:
            first[id(p)] = name
    return second


def linear_by_name(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear module `name` (any of a shared module's names); ValueError saying what `name` is
    otherwise (another module, a parameter: its module's name given, no name of the model: its nn.Linear
    modules listed)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    module = modules.get(name)
    if isinstance(module, nn.Linear):
        return module
    start = f"layers: mode='last_layer' needs the name of one nn.Linear module; {name!r} is"
    if module is not None:
        raise ValueError(f"{start} {type(module).__name__}")
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if linears == [""]:  # a bare nn.Linear: the model is its one Linear, named "", which layers= cannot give
        raise ValueError(
            f"layers: mode='last_layer' got {name!r}, but the model ({type(model).__name__}) is itself its one "
            "nn.Linear layer; leave layers=None and mode='last_layer' takes it"
        )
    shown = ", ".join(map(repr, linears[:8])) + (", ..." if len(linears) > 8 else "")
    owner = name.rpartition(".")[0]
    if name in dict(model.named_parameters(remove_duplicate=False)):
        if not owner:
            raise ValueError(
                f"{start} a parameter of the model ({type(model).__name__}) itself, not of an nn.Linear module "
                f"(its nn.Linear modules: {shown or 'none'})"
            )
        kind = type(modules[owner]).__name__
        raise ValueError(f"{start} a parameter, not a module: give the name of its module ({kind}), {owner!r}")
    raise ValueError(f"{start} no module of the model (its nn.Linear modules: {shown or 'none'})")


def linear_name(model: nn.Module, name: str) -> str:
    """The first name (named_modules()'s) of the nn.Linear module `name`, which may be a second name of a
    module shared under several; ValueError as linear_by_name otherwise."""
    module = linear_by_name(model, name)
    return next(n for n, m in model.named_modules() if m is module)


def last_linear(model: nn.Module, run_forward) -> str:
    """Name of the nn.Linear module whose forward runs last when `run_forward()` is called."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod])) for m in names]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(
            "mode='last_layer' needs an nn.Linear layer in the model's forward; none ran" + _last_other(model)
        )
    return order[-1]


def _last_other(model: nn.Module) -> str:
    """For a model without an nn.Linear in its forward (a CNN whose head is a 1x1 or full-size Conv2d): the way
    to its last layer's exact gradients, mode='full' with layers= naming it (the last module, in registration
    order, that holds parameters of its own); "" where the model has none."""
    owners = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if not owners:
        return ""
    last = model.get_submodule(owners[-1])
    return (
        f" (the last module holding parameters is {owners[-1]!r}, a {type(last).__name__}): for its exact gradients, "
        f"export mode='full' with layers=[{owners[-1]!r}]"
    )


def linear_modules_of(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The nn.Linear modules owning the parameters `names`, in the model's order; ValueError if a
    parameter is not a Linear's weight or bias, or a Linear is chosen without all its parameters."""
    modules = dict(model.named_modules())
    owners: list[str] = []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if not isinstance(modules.get(owner), nn.Linear) or leaf not in ("weight", "bias"):
            raise ValueError(
                f"mode='factored' needs every chosen parameter to be an nn.Linear weight or "
                f"bias; {name!r} is not (choose layers=, or use mode='full')"
            )
        if owner not in owners:
            owners.append(owner)
    chosen = set(names)
    first = tied_first_names(model)
    for owner in owners:
        params = [n for n, _ in modules[owner].named_parameters(prefix=owner)]
        missing = [n for n in params if n not in chosen]
        tied = [n for n in missing if n in first]
        if tied:
            full = [first.get(n, n) for n in params]
            ties = "; ".join(f"{n!r} is tied to {first[n]!r}" for n in tied)
            raise ValueError(
                f"mode='factored' cannot factor {owner!r}: {ties}, "
                "whose gradient over all its uses is not one outer product. Use mode='last_layer' with "
                f"layers=[{owner!r}] (the gradient through {owner!r} only, under the first name), or mode='full' "
                f"with layers={full!r}"
            )
        if missing:
            frozen = [n for n in missing if not modules[owner].get_parameter(n.rpartition(".")[2]).requires_grad]
            hint = (
                f" ({', '.join(frozen)}: frozen (requires_grad=False), so left out by a pattern that also matches "
                f"trainable parameters; add {frozen} to layers= to choose them)"
                if frozen
                else ""
            )
            layer = repr(owner) if owner else f"the model ({type(model).__name__})"
            raise ValueError(
                f"mode='factored' factors whole nn.Linear layers; {missing} of {layer} is not chosen{hint}"
            )
    return owners
