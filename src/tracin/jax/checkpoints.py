"""Checkpoint lists: (params, learning_rate) pairs, params a pytree or a saved checkpoint's path, or
(params, learning_rate, optax optimizer state) triples for a preconditioner."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._export.checkpoints import Checkpoint, missing_optimizer_state
from .._export.checkpoints import parse_checkpoints as shared_parse
from .._export.fingerprint import digest_arrays, holds_set, stable_repr
from .._export.preconditioner import AdamMoments, check_moments
from .params import host_array, is_array_leaf, is_float_leaf, leaf_path, scalars_are_parameters


def parse_checkpoints(checkpoints: Any, adam: Mapping[str, float] | None = None) -> list[Checkpoint]:
    """Checkpoints from a sequence of (params or path, learning_rate[, optimizer state]) entries (see
    tracin._export.checkpoints); `adam`: the b1, b2, eps (and eps_root) the optimizer states were made
    with. A checkpoint path that is an empty file or an empty directory is a ValueError naming it, before any
    checkpoint is exported (as in tracin.torch); other damage is found when it is read (`restore`). Flax NNX
    checkpoints holding the model's live Variables are refused (refuse_live_variables)."""
    parsed = shared_parse(
        checkpoints, "params pytree or path", optimizer=lambda state, i: OptimizerState(state, i, adam or {})
    )
    for index, entry in enumerate(parsed):
        if isinstance(entry.source, (str, os.PathLike)):
            _check_not_empty(entry.source, f"checkpoints[{index}]")
    refuse_live_variables(parsed)
    return parsed


def refuse_train_state_without_optimizer(entries: Sequence[Checkpoint], preconditioner: str) -> None:
    """ValueError for the first checkpoint given as a Flax TrainState (the object, or the dict a saved one
    restores as: a "params" Mapping and an "opt_state" holding floating leaves) without an optimizer state
    item, which preconditioner `preconditioner` needs: the shared check's message, naming the TrainState's
    own opt_state to pass as the third item. Other checkpoints are left to that check."""
    for c, entry in enumerate(entries):
        if entry.optimizer is not None:
            continue
        source = entry.source
        if isinstance(source, Mapping):
            params, opt_state, item = source.get("params"), source.get("opt_state"), "state['opt_state']"
        elif dataclasses.is_dataclass(source) and not isinstance(source, type):
            params, opt_state = getattr(source, "params", None), getattr(source, "opt_state", None)
            item = "state.opt_state"
        else:
            continue
        if not isinstance(params, Mapping) or not any(
            is_float_leaf(x, False) for x in jax.tree_util.tree_leaves(opt_state)
        ):
            continue
        raise ValueError(
            f"{missing_optimizer_state(c, preconditioner)}; checkpoints[{c}][0] is a Flax TrainState, whose "
            f"optimizer state is its opt_state: give (state, learning_rate, {item})"
        )


_COPY = "jax.tree.map(lambda a: a, {}) (new Variables holding the same immutable arrays)"


def refuse_live_variables(entries: Sequence[Checkpoint]) -> None:
    """ValueError when two checkpoints hold the very same Flax NNX Variable (holding floating arrays) in their
    params, or in their optimizer states as given (an opt_state or an nnx.Optimizer, not the Adam state merged from
    an optax.partition's, which holds new trees) while their params are not one object: nnx.split(model) /
    nnx.state(model) and an nnx.Optimizer's opt_state, appended during training without a copy, hold the live
    Variables, which every later step updates in place, so each such checkpoint holds the final weights (or
    moments). One nnx.Module object listed at two checkpoints is refused too (it can only be the live model); one
    State object listed twice is taken, on purpose (tracin.torch's rule for one state_dict object). flax is not
    imported: Variables exist only where it is."""
    nnx = sys.modules.get("flax.nnx")
    variable, module = (vars(nnx).get(name) if nnx is not None else None for name in ("Variable", "Module"))
    if not isinstance(variable, type):
        return
    params = _first_shared(entries, lambda e: e.source, variable, module)
    # the state as given: the Adam state merged from an optax.partition's is a new tree holding none of its Variables
    states = _first_shared(entries, lambda e: None if e.optimizer is None else e.optimizer.state, variable, None)
    if params is not None:
        i, j, module_twice = params
        what = (
            "hold the same nnx.Module object, the live model, whose Variables every later step updates in place"
            if module_twice
            else "hold the very same Flax NNX Variables in their params: nnx.split(model) / nnx.state(model) "
            "give the model's live Variables, which every later step updates in place"
        )
        also = (
            f"; checkpoints[{states[0]}][2] and checkpoints[{states[1]}][2] share their optimizer state's Variables "
            f"too: save {_COPY.format('optimizer.opt_state')} with each as well"
            if states is not None
            else ""
        )
        raise ValueError(
            f"checkpoints[{i}] and checkpoints[{j}] {what}, so each such checkpoint holds the final weights, not "
            f"those of its point of training: save a copy with each checkpoint, "
            + ("nnx.clone(model) (a Module again, for a loss_fn that calls it), or " if module_twice else "")
            + f"{_COPY.format('nnx.state(model, nnx.Param)')}, or save it to a file and pass the path{also}"
        )
    if states is not None:
        i, j, _ = states
        raise ValueError(
            f"checkpoints[{i}][2] and checkpoints[{j}][2] (optimizer states) hold the very same Flax NNX Variables "
            f"while checkpoints[{i}] and checkpoints[{j}] are not one params object: an nnx.Optimizer's opt_state is "
            "one object whose Variables every step updates in place, so each such checkpoint carries the moments "
            f"after the last step, not its own: save {_COPY.format('optimizer.opt_state')} with each checkpoint "
            "(to give one state to several checkpoints on purpose, pass a copy for each)"
        )


def _first_shared(
    entries: Sequence[Checkpoint], part: Any, variable: type, module: type | None
) -> tuple[int, int, bool] | None:
    """(i, j, whether they are one `module` object) for the first two checkpoints i < j whose `part` (their params
    or Adam state, in memory) holds the very same `variable` holding floating arrays, or is one `module` object;
    checkpoints whose params are one other object are not compared (listed twice on purpose); None if none."""
    owners: dict[int, int] = {}
    for j, entry in enumerate(entries):
        tree = part(entry)
        if tree is None or isinstance(tree, (str, os.PathLike)):
            continue
        for i in range(j):
            if entries[i].source is entry.source:
                if module is not None and isinstance(tree, module):
                    return i, j, True
                break
        else:
            for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda node: isinstance(node, variable)):
                if not isinstance(leaf, variable):
                    continue
                if not any(is_float_leaf(a) for a in jax.tree_util.tree_leaves(leaf)):
                    continue
                i = owners.setdefault(id(leaf), j)
                if i != j:
                    return i, j, False
    return None


def _check_not_empty(source: str | os.PathLike, where: str) -> None:
    """ValueError naming checkpoint `where` and its path when it is a file of 0 bytes or an empty
    directory (a failed copy, a full disk)."""
    path = os.path.abspath(os.fspath(source))
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{_cannot_read(where, path)}: a file of 0 bytes, empty or cut short")
    if os.path.isdir(path) and not os.listdir(path):
        raise ValueError(f"{_cannot_read(where, path)}: an empty directory, not an orbax checkpoint")


def _cannot_read(where: str, path: str) -> str:
    """'<where> (<path>) cannot be read', the words of tracin.torch's errors for a damaged checkpoint."""
    return f"{where} ({path}) cannot be read"


def _state_nodes(state: Any) -> list[Any]:
    """Every NamedTuple of an optax state (its transformations' states), outer ones first, inside any
    pytree container (tuples, lists, dicts, a flax TrainState, an Equinox module holding the state)."""
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            found.append(node)
        children = jax.tree_util.tree_leaves(node, is_leaf=lambda child: child is not node)  # one level down
        if not (len(children) == 1 and children[0] is node):  # not a leaf
            for child in children:
                visit(child)

    visit(state)
    return found


def _holds_moment_dicts(state: Any) -> bool:
    """Whether `state` holds a 'mu' and a 'nu' dict key: Adam's moments whose ScaleByAdamState type was lost (a
    restored nnx.state(optimizer) of an optax.partition keeps its field-less MaskedNode NamedTuples alone; the
    caller asks only when every NamedTuple left is field-less, as a model's own 'mu' / 'nu' params are keys too)."""
    keys = {
        k.key
        for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
        for k in path
        if isinstance(k, jax.tree_util.DictKey)
    }
    return {"mu", "nu"} <= keys


def _is_adam(node: Any) -> bool:
    """optax's ScaleByAdamState, by its type (optax is not imported)."""
    kind = type(node)
    return kind.__name__ == "ScaleByAdamState" and kind.__module__.split(".")[0] == "optax"


# optax states with a second moment nu that is not Adam's E[g^2] (the optimizers that make them)
_OTHER_SECOND_MOMENTS = {
    "ScaleByAmsgradState": "optax.amsgrad: its steps divide by the running maximum nu_max",
    "ScaleByBeliefState": "optax.adabelief: its nu is the running variance of g around mu",
    "ScaleByNovogradState": "optax.novograd: its nu is a per-layer norm",
    "ScaleByRmsState": "optax.rmsprop",
    "ScaleByRStdDevState": "optax.rmsprop(centered=True)",
    "ScaleBySM3State": "optax.sm3",
}
# inject_hyperparams arguments of optax optimizers whose state is a ScaleByAdamState but whose step is not Adam's
_OTHER_HYPERPARAMS = {
    "threshold": "optax.radam (hyperparameter 'threshold')",
    "initial_accumulator_value": "optax.scale_by_yogi (hyperparameter 'initial_accumulator_value')",
}
_SUPPORTED = (
    "preconditioner='adam' takes the ScaleByAdamState of optax.adam / adamw (alone, in a chain, masked or "
    "under inject_hyperparams)"
)


def _state_paths(state: Any, found: Sequence[Any]) -> list[str]:
    """The path in `state` of each Adam state in `found`, as "state.inner_states['decay'].inner_state[0]"."""
    located = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_adam)[0]
    return [next(f"state{jax.tree_util.keystr(p)}" for p, leaf in located if leaf is adam) for adam in found]


def _around(nodes: Sequence[Any], found: Sequence[Any]) -> list[Any]:
    """The inject_hyperparams states (a `hyperparams` Mapping) among `nodes` that hold one of the Adam states
    `found` inside them."""
    adams = {id(adam) for adam in found}
    return [
        node
        for node in nodes
        if isinstance(getattr(node, "hyperparams", None), Mapping)
        and any(id(inner) in adams for inner in _state_nodes(node))
    ]


def _refuse_without_eps_root(state: Any, nodes: Sequence[Any], found: Sequence[Any], where: str) -> None:
    """ValueError when an inject_hyperparams state (among `nodes`) around one of the Adam states `found`
    records b1, b2 and eps but no eps_root, as optax.adamax / adamaxw / yogi do (whose ScaleByAdamState's nu
    is not Adam's; optax.adam / adamw / nadam / lamb / radam inject eps_root too). The error names `where`,
    the partition when there are several Adam states, and the ways out."""
    names = _state_paths(state, found)
    for node in _around(nodes, found):
        hyperparams = node.hyperparams
        if "eps_root" in hyperparams or not {"b1", "b2", "eps"} <= hyperparams.keys():
            continue
        for adam, name in zip(found, names, strict=True):
            if not _around([node], [adam]):
                continue
            what = where if len(found) == 1 else f"{where}, partition {name} (of {len(found)} Adam states),"
            raise ValueError(
                f"{what} looks like the state of optax.adamax / adamaxw / yogi: inject_hyperparams recorded "
                f"{', '.join(sorted(map(str, hyperparams)))} but no eps_root, as those do, while optax.adam / adamw "
                "record eps_root too; their ScaleByAdamState holds a second moment that is not "
                "Adam's (adamax: a running max of |g|; yogi: updated additively), so Adam rows made from it would "
                "be wrong: use the states of a model trained with optax.adam / adamw, or export plain-gradient "
                "TracIn (SGD, as in the TracIn paper): preconditioner=None with the checkpoints without their "
                "states, [c[:2] for c in checkpoints] (for optax.adam under a function of your own that injects no "
                f"eps_root: pass its ScaleByAdamState alone, {name}, with preconditioner_options giving its b1, b2, "
                f"eps{'' if len(found) == 1 else ' and layers= naming its leaves'})"
            )


class OptimizerState:
    """An optax optimizer state (in memory) holding one ScaleByAdamState (mu, nu, count), as
    optax.adam / adamw and chains containing them make it, or several over disjoint leaves (each masked
    out, a MaskedNode, where another holds moments: an optax.partition / multi_transform decay / no-decay
    split), merged into one per leaf when their counts and any injected b1, b2, eps, eps_root, learning_rate agree
    (_merge_partitions; preconditioner_options are one set for all leaves: partitions made with other b1, b2 or
    eps that inject_hyperparams does not record cannot be told apart, and their leaves get rows made with the wrong
    ones; a RuntimeWarning when some partitions record them and others do not); several over the same leaves
    are refused as ambiguous. mu and nu must have the params' pytree
    structure (the optimizer was initialised on the same params pytree), or that of the "params"
    collection of Flax linen variables ({"params": ..., "batch_stats": ...}, whose TrainState's
    optimizer was initialised on variables["params"]): then they are looked up under "params/".
    Moments at paths the params lack are refused (check_leaves), and a chosen leaf without moments
    (masked out by optax.masked, or another linen collection) is a ValueError naming it. b1, b2, eps
    and eps_root are not in the state: they are given (`adam`; eps_root 0 when absent), and checked
    against the state's own when it was made with optax.inject_hyperparams (the inject_hyperparams states
    around a ScaleByAdamState; an injected optimizer beside it, say optax.adagrad on other leaves, is not read).

    Refused: a state holding the second moment of another optimizer (optax.amsgrad, adabelief,
    novograd, rmsprop: _OTHER_SECOND_MOMENTS), one whose injected hyperparameters are another's
    (optax.radam by its 'threshold', optax.scale_by_yogi by its 'initial_accumulator_value'), and one
    whose inject_hyperparams state around its ScaleByAdamState records b1, b2 and eps but no eps_root:
    optax.adamax / adamaxw / yogi inject no eps_root, while optax.adam / adamw (and nadam, lamb, radam)
    do (_refuse_without_eps_root; one such partition of several is refused too). optax's nadam and
    lamb (with or without inject_hyperparams) and adamax, adamaxw, yogi, radam and optax.contrib.adopt
    without it keep a ScaleByAdamState that nothing in it tells from Adam's: their states are taken as
    Adam's, which their steps are not (adamax: nu is a running max of |g|; yogi: nu is updated additively;
    adopt: nu starts at g^2 and its step divides by sqrt(nu), never bias-corrected, before the momentum;
    nadam, radam: the step is not m_hat / (sqrt(v_hat) + eps); lamb: the step is scaled by a
    per-layer trust ratio, whose state is an EmptyState)."""

    def __init__(self, state: Any, index: int, adam: Mapping[str, float]):
        self.where = f"checkpoints[{index}][2] (optimizer state)"
        if isinstance(state, (str, os.PathLike)):
            raise TypeError(
                f"{self.where}: give the optax state pytree itself, not a path (a restored file "
                "loses the ScaleByAdamState type)"
            )
        nodes = _state_nodes(state)
        found = [n for n in nodes if _is_adam(n)]
        others = [n for n in nodes if "nu" in n._fields and not _is_adam(n)]
        # only inject_hyperparams states around a ScaleByAdamState: an injected optax.adagrad beside it (its
        # initial_accumulator_value, its eps) says nothing of Adam's
        self.hyperparams = [n.hyperparams for n in _around(nodes, found)]
        if others:
            names = sorted({type(n).__name__ for n in others})
            made = "; ".join(f"{name} ({_OTHER_SECOND_MOMENTS.get(name, 'not optax.adam')})" for name in names)
            not_adam = f"{self.where} holds the second moment of an optimizer that is not Adam"
            raise ValueError(f"{not_adam}: {made}; {_SUPPORTED}")
        _refuse_without_eps_root(state, nodes, found, self.where)
        if len(found) > 1 and not _overlap(found):
            found = [_merge_partitions(state, nodes, found, self.where)]
        if len(found) != 1:
            kinds = sorted({type(n).__name__ for n in nodes})
            raise ValueError(
                f"{self.where} must hold exactly one optax ScaleByAdamState (mu, nu, count), found {len(found)} "
                f"(its states: {', '.join(kinds) if kinds else 'none'}); {_SUPPORTED}"
                + (
                    "; a pytree of dicts and lists holds none: nnx.state(optimizer), or a state restored "
                    "without a target, has lost optax's state types: pass the optax state itself (an "
                    "nnx.Optimizer's .opt_state attribute, a TrainState's opt_state; for nnx.state(optimizer) "
                    "restored by orbax, whose .opt_state is dicts too: restore it with the abstract optimizer's "
                    "State as target, nnx.state(nnx.eval_shape(lambda: optimizer)), then nnx.update(optimizer, "
                    "restored) on an nnx.Optimizer made as the saved one, and pass its .opt_state)"
                    if not nodes or (all(not n._fields for n in nodes) and _holds_moment_dicts(state))
                    else ""
                )
                + (f"; {_overlap(found)}" if len(found) > 1 else "")
            )
        other = [why for h in self.hyperparams for key, why in _OTHER_HYPERPARAMS.items() if key in h]
        if other:
            raise ValueError(f"{self.where} is the state of {other[0]}, whose steps are not Adam's; {_SUPPORTED}")
        self.adam, self.settings, self.state = found[0], dict(adam), state
        self.prefix = ""  # "params/" when the moments are those of linen variables' "params" (check_leaves)

    @functools.cached_property
    def step(self) -> float:
        """The step count (`count`), validated once (check_leaves, up front; a state left unused by
        preconditioner=None is not): a ValueError naming this state and 'count' unless it is one whole
        number >= 1."""
        return _step_count(self.adam.count, self.where)

    def digest(self) -> str:
        """Fingerprint: paths and contents of the state's mu, nu and count."""
        return state_digest({"mu": self.adam.mu, "nu": self.adam.nu, "count": self.adam.count})

    def moments(self, params: Sequence[tuple[str, Sequence[int]]]) -> list[AdamMoments]:
        """The Adam moments of `params` ((leaf path, shape) in row order), on the host."""
        self._check_settings()
        step = self.step
        mu, nu = (_by_path(tree) for tree in (self.adam.mu, self.adam.nu))
        out, prefix, adam = [], self.prefix, self.settings
        mu, nu = ({prefix + k: a for k, a in tree.items()} for tree in (mu, nu))
        for name, shape in params:
            if name not in mu or name not in nu:
                masked = {prefix + k for k in _masked_paths(self.adam.mu)}
                kept = [n for n, _ in params if n in mu and n in nu]
                if name in masked:
                    raise ValueError(
                        f"{self.where}: leaf {name!r} is masked out of Adam (optax.masked: a MaskedNode in the "
                        "moments), so the state holds no Adam moments for it; pass layers= naming only the "
                        f"leaves Adam updates{f', e.g. layers={kept}' if kept else ''}"
                    )
                if prefix and not name.startswith(prefix):
                    raise ValueError(
                        f"{self.where}: the Adam moments are those of the linen variables' 'params' collection, "
                        f"which has no leaf {name!r} (no gradient steps it: batch statistics, a cache); pass "
                        f"layers= naming only leaves under 'params/'{f', e.g. layers={kept}' if kept else ''}"
                    )
                raise ValueError(
                    f"{self.where}: the Adam moments have no leaf {name!r}; the optimizer must have "
                    "been initialised on the same params pytree, or on part of it: then pass layers= naming only "
                    f"the leaves it updates{f', e.g. layers={kept}' if kept else ''} (for an NNX model whose "
                    "optimizer holds its nnx.Param variables, as nnx.Optimizer(model, tx, wrt=nnx.Param) does, "
                    "the Param leaves, or the State of nnx.split(model, nnx.Param, ...) as the params)"
                )
            m, v = np.asarray(mu[name]), np.asarray(nu[name])
            check_moments(name, shape, m, v, step, self.where)
            out.append(
                AdamMoments(
                    m.reshape(-1),
                    v.reshape(-1),
                    step,
                    adam["b1"],
                    adam["b2"],
                    adam["eps"],
                    eps_root=adam.get("eps_root", 0.0),
                )
            )
        return out

    def check_leaves(self, params: Any) -> None:
        """ValueError naming the paths of the Adam moments' leaves that `params` (a checkpoint's pytree)
        has no leaf at: the optimizer was initialised on another pytree (one with more leaves), whose
        moments tracin would otherwise look up by path and use in part. Moments may hold fewer leaves
        (optax.masked, an Equinox module's non-array fields): moments() names the missing ones used.
        Moments that all lie under "params/" of linen variables (a Mapping holding "params" and other
        collections, or "params" alone, or a Flax TrainState's `params` field) are taken from there on
        (`prefix`); moments most of which lie there are reported by the paths missing there."""
        self.step  # noqa: B018 - validates the step count before any row is computed
        have = set(_by_path(params))
        paths = {name for tree in (self.adam.mu, self.adam.nu) for name in _by_path(tree)}
        extra = sorted(paths - have)
        linen = (isinstance(params, Mapping) and "params" in params) or isinstance(
            getattr(params, "params", None), Mapping
        )  # linen variables, or a TrainState (a dataclass whose "params" field holds them)
        if extra and linen and paths:
            missing = sorted(f"params/{name}" for name in paths if f"params/{name}" not in have)
            if not missing:
                self.prefix, extra = "params/", []
            elif len(missing) < len(extra):  # the moments are the "params" collection's, one layer differs
                extra = missing
        if extra:
            raise ValueError(
                f"{self.where}: the Adam moments have leaves the params do not: {extra[:5]}"
                f"{f' and {len(extra) - 5} more' if len(extra) > 5 else ''}; the optimizer must have been "
                "initialised on the same params pytree as the checkpoint's (its moments are looked up by leaf path)"
                f"{_under_hint(paths, have)}"
            )

    def _check_settings(self) -> None:
        """ValueError when the state was made with inject_hyperparams and its b1, b2, eps or eps_root is not
        the one given (preconditioner_options, or optax.adam's defaults: eps_root 0)."""
        given = {"eps_root": 0.0, **self.settings}
        for hyperparams in self.hyperparams:
            for key in ("b1", "b2", "eps", "eps_root"):
                if key in hyperparams and not np.isclose(
                    float(np.asarray(hyperparams[key])), given[key], rtol=1e-6, atol=0
                ):
                    raise ValueError(
                        f"{self.where} records {key}={float(np.asarray(hyperparams[key])):.6g} "
                        f"(inject_hyperparams), but the export uses {key}={given[key]:.6g}: pass "
                        f"preconditioner_options={{'{key}': {float(np.asarray(hyperparams[key])):.6g}, ...}}"
                    )


def _under_hint(paths: set[str], have: set[str]) -> str:
    """Where every moment path lies under one prefix of the params' paths (the optimizer initialised on a part of
    the checkpoint's pytree: a TrainState in a tuple or a dict beside other entries), that prefix and the two ways
    to pass such params; "" otherwise."""
    if not paths:
        return ""
    first = min(paths)
    prefixes = {name[: -len(first)] for name in have if name.endswith("/" + first)}
    # the optimizer state's own moments (a TrainState's opt_state in the params) hold the same paths: not a match
    found = sorted(
        p for p in prefixes if p.split("/")[-2] not in ("mu", "nu") and all(p + name in have for name in paths)
    )
    if len(found) != 1:
        return ""
    part = found[0]
    if part.endswith("params/"):
        way = (
            "pass a checkpoint holding it as its top-level 'params' entry (linen variables {'params': ..., "
            "'batch_stats': ...}, or the TrainState itself), whose moments are matched under 'params/'"
        )
    else:
        way = "pass that part as the params (or as the 'params' entry of a dict of linen variables)"
    return f". They all lie under {part!r} in the params, the part the optimizer was initialised on: {way}"


def _moment_paths(adam: Any) -> set[str]:
    """Paths of the leaves an Adam state holds moments for (MaskedNode placeholders hold none)."""
    return {name for tree in (adam.mu, adam.nu) for name in _by_path(tree)}


def _overlap(found: Sequence[Any]) -> str:
    """Why several Adam states cannot be merged because two hold moments for one leaf ("" if none do)."""
    for j, later in enumerate(found):
        for earlier in found[:j]:
            shared = sorted(_moment_paths(earlier) & _moment_paths(later))
            if shared:
                return (
                    f"two of them hold moments for the same leaves ({shared[:3]}), so which one preconditions a "
                    "leaf is ambiguous (several Adam states are merged only over disjoint leaves, the others "
                    "masked out, as in optax.multi_transform / optax.partition)"
                )
    return ""


_MERGE_KEYS = ("b1", "b2", "eps", "eps_root", "learning_rate")  # injected hyperparameters merged partitions share


def _merge_partitions(state: Any, nodes: Sequence[Any], found: Sequence[Any], where: str) -> Any:
    """One ScaleByAdamState from several that hold moments for disjoint leaves (optax.multi_transform /
    optax.partition, or optax.masked ones with complementary masks: MaskedNode elsewhere): each leaf's mu and
    nu are taken from the state that has them. A ValueError naming the states (their paths in `state`) when
    their counts differ, when inject_hyperparams records different b1, b2, eps or eps_root for them
    (preconditioner_options are one set for all leaves) or learning_rate (a row has one rate, the
    checkpoint's), or when their moments are not trees of one params pytree; it names the way out: each state
    alone, with layers= naming its leaves (under 'params/' for Flax linen variables)."""
    names = _state_paths(state, found)
    leaves = sorted(_moment_paths(found[0]))

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{where} holds {len(found)} optax ScaleByAdamStates over disjoint leaves ({', '.join(names)}; "
            "optax.multi_transform / optax.partition), which tracin merges only when they share their step count "
            f"and hyperparameters: {why}; export each partition alone instead: pass its ScaleByAdamState as the "
            f"optimizer state, e.g. {names[0]}, with layers= naming its leaves"
            + (f", e.g. layers={leaves} (under 'params/' for Flax linen variables)" if leaves else "")
        )

    counts = [np.asarray(adam.count) for adam in found]
    if any(not np.array_equal(count, counts[0]) for count in counts):
        shown = ", ".join(f"{name}: {count.tolist()!r}" for name, count in zip(names, counts, strict=True))
        raise refuse(f"their counts (Adam step counts) differ ({shown})")
    known: list[dict[str, float]] = [{} for _ in found]
    for node in nodes:
        hyperparams = getattr(node, "hyperparams", None)
        if not isinstance(hyperparams, Mapping):
            continue
        inside = {id(n) for n in _state_nodes(node)}
        for i, adam in enumerate(found):
            if id(adam) in inside:
                known[i].update({k: float(np.asarray(hyperparams[k])) for k in _MERGE_KEYS if k in hyperparams})
    unchecked = [name for name, k in zip(names, known, strict=True) if not {"b1", "b2", "eps"} <= k.keys()]
    if any(k.keys() & {"b1", "b2", "eps"} for k in known) and unchecked:  # not a learning_rate alone
        warnings.warn(
            f"{where}: {', '.join(unchecked)} (merged with other optax Adam states over disjoint leaves) records no "
            "b1 / b2 / eps (no inject_hyperparams), so its leaves are taken with preconditioner_options unchecked; "
            "if that partition used others, export its state alone with its own preconditioner_options and layers=",
            RuntimeWarning,
            stacklevel=2,
        )
    for key in _MERGE_KEYS:
        values = {name: k[key] for name, k in zip(names, known, strict=True) if key in k}
        if not np.allclose(list(values.values()), next(iter(values.values()), 0.0), rtol=1e-6, atol=0):
            shown = ", ".join(f"{name}: {value:.6g}" for name, value in values.items())
            one = (
                "a row is weighted by one rate, the checkpoint's (export each with its own and add their scores)"
                if key == "learning_rate"
                else "while preconditioner_options are one set"
            )
            raise refuse(f"inject_hyperparams records different {key} ({shown}), {one}")

    def pick(*nodes: Any) -> Any:
        """The one node not masked out; several: merged one level down (a MaskedNode may stand for a whole
        subtree, as a prefix mask or label tree makes it, in any of the states)."""
        kept = [node for node in nodes if not _is_masked_node(node)]
        if len(kept) < 2:
            return kept[0] if kept else nodes[0]
        children, treedef = jax.tree_util.tree_flatten(kept[0], is_leaf=lambda child: child is not kept[0])
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # two arrays for one leaf (excluded by _overlap)
            raise ValueError(f"two states hold moments for one leaf ({type(kept[0]).__name__})")
        rest = [treedef.flatten_up_to(node) for node in kept[1:]]
        return treedef.unflatten([pick(*group) for group in zip(children, *rest, strict=True)])

    try:
        mu, nu = (pick(*(getattr(adam, part) for adam in found)) for part in ("mu", "nu"))
    except ValueError as err:
        why = f"their moments are not trees of one params pytree ({_first_line(err)})"
        raise refuse(why) from err
    return found[0]._replace(mu=mu, nu=nu)


def _step_count(count: Any, where: str) -> float:
    """The Adam state's step count (optax's `count`, bias correction's t) as a float, or a ValueError naming
    `where` and "count" unless it is one whole number >= 1 (0: a state no step has updated)."""
    try:
        value = np.asarray(count)
    except Exception as err:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"{where}: its 'count' (the Adam step count) is not an array: {err}") from err
    if value.shape != ():
        raise ValueError(f"{where}: its 'count' (the Adam step count) must be a scalar (0-d), got shape {value.shape}")
    if value.dtype.kind not in "iuf":
        raise ValueError(f"{where}: its 'count' (the Adam step count) must be a number, got dtype {value.dtype}")
    step = float(value)
    if not np.isfinite(step) or step != np.floor(step) or step < 1:
        raise ValueError(
            f"{where}: its 'count' (the Adam step count) is {value.item()!r}; a whole number >= 1 is needed: "
            "the state after at least one optimizer step (count 0 is a state no step has updated)"
        )
    return step


def _by_path(tree: Any) -> dict[str, Any]:
    return {leaf_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_masked_node(node: Any) -> bool:
    """optax.masked's placeholder for a leaf masked out of the inner optimizer (by type; optax is not imported)."""
    kind = type(node)
    return kind.__name__ == "MaskedNode" and kind.__module__.split(".")[0] == "optax"


def _masked_paths(tree: Any) -> set[str]:
    """Paths of the MaskedNode placeholders in a tree of moments (optax.masked)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked_node)[0]
    return {leaf_path(path) for path, leaf in flat if _is_masked_node(leaf)}


def state_digest(params: Any, static: bool = True) -> str:
    """Fingerprint of an in-memory params pytree: the paths and contents of its array leaves (floating
    scalars included unless in an Equinox module), then, when there are any, its static parts: the
    paths and values of its other leaves (an Equinox float field, an int in a dict) and the pytree
    structure with its static data (Equinox static fields). A pytree of arrays alone digests as
    before those were recorded; `static=False` leaves them out, as tracin did before. (A checkpoint
    path is fingerprinted by its bytes, in tracin._export.)"""
    arrays, statics, scalars = [], [], scalars_are_parameters(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in flat:
        if is_array_leaf(leaf, scalars):
            arrays += [np.frombuffer(leaf_path(path).encode(), np.uint8), host_array(leaf)]
        else:
            statics.append(f"{leaf_path(path)}={stable_repr(leaf)}")
    if static and (statics or not scalars):  # Equinox modules keep their static fields in the treedef
        arrays.append(np.frombuffer(f"static:{statics}{_treedef_text(treedef)}".encode(), np.uint8))
    return digest_arrays(arrays)


def _treedef_text(treedef: Any) -> str:
    """stable_repr(treedef), unless a node's static data (an Equinox static field) holds a set, which
    repr prints in an order that depends on PYTHONHASHSEED: then each node's type and stable_repr'd
    data, the same in every process."""
    found_set = False

    def node(td: Any) -> str:
        nonlocal found_set
        data = td.node_data()
        if data is None:
            return "*"
        kind, aux = data
        found_set = found_set or holds_set(aux, set())
        return f"{kind.__module__}.{kind.__qualname__}[{stable_repr(aux)}]({', '.join(node(c) for c in td.children())})"

    text = node(treedef)
    return text if found_set else stable_repr(treedef)


def restore(source: Any, where: str) -> Any:
    """The params pytree of a checkpoint entry: returned as is, or restored from a path.

    A directory is read with orbax (`StandardCheckpointer`); a file as Flax msgpack
    (`flax.serialization.msgpack_restore`). Both give the nested dicts of arrays that were saved. A
    file or directory that cannot be read (cut short, damaged, not in that format) is a ValueError
    naming `where`, the path and the reader's error; so is a pytree with no leaves (None, {}). A file
    that starts as a pickle (any protocol; never unpickled), a NumPy .npy array, a safetensors file or a
    zip archive (.npz) does: it names that format and says to load the file and pass the pytree. A
    directory holding orbax checkpoints a level or two down (a CheckpointManager's step folder or root)
    names the item folders to pass.
    """
    if not isinstance(source, (str, os.PathLike)):
        if not jax.tree_util.tree_leaves(source):
            raise ValueError(f"{where}: params {source!r:.60} has no leaves: expected a pytree of arrays or a path")
        return source
    path = os.path.abspath(os.fspath(source))
    if os.path.isdir(path):
        ocp = _reader("orbax.checkpoint", "orbax-checkpoint", f"{where}: {path} is a directory (an orbax checkpoint)")
        try:
            return ocp.StandardCheckpointer().restore(path)
        except _UNREADABLE as e:  # tensorstore's errors (DATA_LOSS, OUT_OF_RANGE) are ValueErrors
            raise ValueError(
                f"{_cannot_read(where, path)} as an orbax checkpoint: {_first_line(e).rstrip('.')}{_item_hint(path)}"
            ) from e
    if os.path.isfile(path):
        serialization = _reader("flax.serialization", "flax", f"{where}: {path} is a file (a Flax msgpack checkpoint)")
        with open(path, "rb") as f:
            content = f.read()
        other = _other_format(content, path)
        if other:
            raise ValueError(
                f"{_cannot_read(where, path)}: it is {other[0]}, which tracin.jax does not read (it reads orbax "
                f"checkpoint directories and Flax msgpack files): load it yourself ({other[1]}) and pass the "
                "params pytree in its place"
            )
        try:
            return serialization.msgpack_restore(content)
        except _UNREADABLE as e:  # msgpack's errors ('incomplete input', ExtraData) are ValueErrors
            cause = "the file ends early: cut short" if "incomplete input" in str(e) else _first_line(e)
            raise ValueError(
                f"{_cannot_read(where, path)} as a Flax msgpack checkpoint ({len(content)} bytes): {cause}"
            ) from e
    raise FileNotFoundError(f"{where}: no checkpoint at {path}")


def _item_hint(path: str) -> str:
    """For a directory that is no orbax checkpoint itself (no _METADATA) but holds some a level down (a
    CheckpointManager's step folder root/<step>, holding the item root/<step>/default) or two (its root):
    "; pass ..." naming them; "" otherwise."""
    if os.path.exists(os.path.join(path, "_METADATA")):
        return ""
    found = [name for name in _subfolders(path) if os.path.isfile(os.path.join(path, name, "_METADATA"))]
    what = "the orbax checkpoint item folder it holds"
    if not found:  # a CheckpointManager's root: its steps' items
        found = [
            f"{step}/{item}"
            for step in _subfolders(path)
            for item in _subfolders(os.path.join(path, step))
            if os.path.isfile(os.path.join(path, step, item, "_METADATA"))
        ]
        what = "a step's orbax checkpoint item folder (a CheckpointManager's root?)"
    if not found:
        return ""
    shown = ", ".join(repr(name) for name in found[:4]) + (f", ... ({len(found)} in all)" if len(found) > 4 else "")
    return f"; pass {what}: {shown}, e.g. {os.path.join(path, found[0])}"


def _subfolders(path: str) -> list[str]:
    """The names of the folders in `path`, step numbers in numeric order, then the other names."""
    try:
        names = [entry.name for entry in os.scandir(path) if entry.is_dir()]
    except OSError:
        return []
    return sorted(names, key=lambda name: (0, int(name), "") if name.isdigit() else (1, 0, name))


def _other_format(content: bytes, path: str = "") -> tuple[str, str] | None:
    """(format, how to load it) of a checkpoint file in a format restore does not read, told by its first
    bytes (nothing is unpickled): a NumPy .npy array, a safetensors file (8-byte header length, then a JSON
    header), a pickle (protocol 2 and up: 0x80, the protocol, ...; protocols 0 and 1: an opening opcode
    such as "(d", "}q", "]q" or "c<module>", and the STOP opcode "." last, but for trailing whitespace: a
    newline added by an editor or `echo >>`) or a zip archive (np.savez's .npz);
    None otherwise (msgpack, or anything else, is left to the msgpack reader: a Flax msgpack file is a map,
    whose first byte is none of these). .npy records one after another (or one, in a file named *.eqx) are
    Equinox's eqx.tree_serialise_leaves, which np.load would read only the first leaf of."""
    if content[:6] == b"\x93NUMPY":
        if _npy_records(content) > 1 or path.lower().endswith(".eqx"):
            return (
                "an Equinox file (eqx.tree_serialise_leaves: the leaves as .npy records one after another)",
                "model = eqx.tree_deserialise_leaves(path, like), like a module of the same structure, such as "
                "a freshly made one",
            )
        return "a NumPy .npy array (np.save)", "np.load, and put the array in a params pytree"
    header = int.from_bytes(content[:8], "little") if len(content) > 8 else 0
    if content[8:9] == b"{" and 2 <= header <= len(content) - 8 and content[7 + header : 8 + header] in b"} ":
        return "a safetensors file", "safetensors.flax.load_file or safetensors.numpy.load_file"
    old_pickle = content[:1] in (b"(", b"}", b"]", b")", b"c") and content.rstrip()[-1:] == b"."
    if old_pickle or (content[:1] == b"\x80" and len(content) > 1 and 2 <= content[1] <= 5):
        return "a pickle", "pickle.load, or torch.load for a torch file, only if you trust the file"
    if content[:4] == b"PK\x03\x04":
        return "a zip archive (an .npz of np.savez, or a torch.save file)", "np.load, or torch.load"
    return None


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_records(content: bytes) -> int:
    """How many .npy records (np.save's bytes) start `content` one after another, stopping at anything else
    (a record of objects, whose size its header does not give, counts as one and ends the count)."""
    stream, count = io.BytesIO(content), 0
    while stream.tell() < len(content) and content[stream.tell() : stream.tell() + 6] == b"\x93NUMPY":
        try:
            read_header = _NPY_HEADERS.get(np.lib.format.read_magic(stream))
            if read_header is None:
                count += count == 0  # the first record, of a version read_array_header does not know
                break
            shape, _, dtype = read_header(stream)
        except (ValueError, SyntaxError, TypeError):
            count += count == 0  # a record only when its header reads (stray magic bytes after one are not)
            break
        count += 1
        if dtype.hasobject:
            break
        stream.seek(stream.tell() + dtype.itemsize * math.prod(shape))
    return count


# what the readers raise for a damaged checkpoint (a missing orbax _METADATA file is a FileNotFoundError)
_UNREADABLE = (ValueError, TypeError, KeyError, IndexError, EOFError, OSError)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _reader(module: str, package: str, what: str) -> Any:
    """The module that reads a checkpoint format; ImportError saying `what` needs `package` if absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what}; reading it needs {package} (pip install {package})") from None
