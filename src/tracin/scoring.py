"""The public scoring functions: validation, then one generic loop over (test chunk x train piece)
that hands each pair to a scoring backend (tracin.backends; "cpu" is the C++ kernel)."""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from . import _progress, _tunables
from ._caller import user_stacklevel
from ._cpus import usable_cores
from ._export.resume import static_digest_note
from ._progress import check_progress, progress_bar, shows_automatically
from ._tunables import AUTO_OVERHEAD as _AUTO_OVERHEAD
from ._tunables import AUTO_PROGRESS_MACS as _AUTO_PROGRESS_MACS
from ._tunables import AUTO_RATE as _AUTO_RATE
from ._tunables import AUTO_STEPS as _AUTO_STEPS
from ._tunables import BAR_S as _BAR_S
from ._tunables import BAR_SHARE as _BAR_SHARE
from ._tunables import BAR_STEPS as _BAR_STEPS
from ._tunables import MERGE_S as _MERGE_S
from ._tunables import MIN_PIECE_ROWS as _MIN_PIECE_ROWS
from ._tunables import PIECE_S as _PIECE_S
from ._tunables import SELECT_S as _SELECT_S
from ._validate import flag, positive_int, thread_count
from .backends import Backend, BothSides, ChunkCache, TopK, placement
from .backends.base import KeepsTopK, SumsColumns
from .gradients import Gradients, GradientSet, KernelSide, non_finite_message
from .store._format import metadata_problem, short
from .whitening import Whitening

_SIDES = ("proponents", "opponents", "both")
# A backend's message for NaN/Inf rows, whose row numbers count from the start of the pair it scored.
_NON_FINITE = re.compile(r"^(test|train) (.+) contains NaN or Inf values, first in rows \[([0-9, ]+)\]$")
# The C++ kernel's float32 overflow message names the pair of the first overflowed score, counted the same way.
_OVERFLOW_PAIR = re.compile(r"first for test row ([0-9]+) and train row ([0-9]+)")
# Its (and the torch backend's) message for self-influence beyond float32 names the first rows where it is.
_SELF_OVERFLOW = re.compile(
    r"^(self-influence overflowed float32(?: in checkpoint [0-9]+)?)( for train rows \[)([0-9, ]+)\]"
)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# self_influence's refusal of normalize=True, tracin.distributed's too.
NO_SELF_NORMALIZE = (
    "self_influence takes no normalize=True: the cosine of a gradient with itself is 1, so every row would score "
    "sum_c w_c; rank by self_influence(normalize=False)"
)
_KERNEL_OOM = "out of memory in the tracin kernel"  # the C++ kernel's MemoryError (csrc/src/guarded.hpp)


def as_gradient_set(x: Any, name: str) -> GradientSet:
    """A GradientSet as is; a bare array (or list of per-checkpoint arrays) as Gradients."""
    if isinstance(x, GradientSet):
        return x
    if x is None or isinstance(x, (dict, set, bytes, bytearray, int, float)):
        raise TypeError(
            f"{name} must be gradient rows: a 2-D array, a list of them (one per checkpoint), a tracin.Gradients "
            f"or a GradientStore (tracin.GradientStore.open(path)); got {type(x).__name__}"
        )
    try:
        return Gradients(x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


def _weights(test: GradientSet, train: GradientSet) -> list[float]:
    """The weights both sides agree on (a side with default weights takes the other's)."""
    if test.n_checkpoints != train.n_checkpoints:
        raise ValueError(
            f"test has {_slots_text(test)} but train has {_slots_text(train)}; "
            "both sides must come from the same checkpoints"
        )
    if test.weights_given and train.weights_given and not np.array_equal(test.weights, train.weights):
        rounding = np.array_equal(test.weights.astype(np.float32), train.weights.astype(np.float32))
        raise ValueError(
            f"test and train carry different checkpoint weights ({test.weights.tolist()} vs "
            f"{train.weights.tolist()}); they must come from the same checkpoints"
            + (
                " (these differ only by float32 rounding: one side's weights were float32, a float32 tensor of "
                "learning rates?; give both sides the same float64 values)"
                if rounding
                else ""
            )
        )
    return (train.weights if train.weights_given or not test.weights_given else test.weights).tolist()


def _slots_text(s: GradientSet) -> str:
    """The set's checkpoint slots in words: "3 checkpoints", or "20 checkpoint x layer slots
    (2 checkpoints x 10 layers)" when its metadata groups them by real checkpoint (_checkpoint_run)."""
    run = _checkpoint_run(s)
    if run is None or run == 1:
        return _count(s.n_checkpoints, "checkpoint")
    return f"{s.n_checkpoints} checkpoint x layer slots ({_count(s.n_checkpoints // run, 'checkpoint')} x {run} layers)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _layout_text(s: GradientSet) -> str:
    """'factored (FactoredGradients, exported by tracin.jax with mode='last_layer')' ('exported with
    framework='numpy', mode=...' for a framework tracin has no adapter for), or without the export's words where
    the metadata does not record them."""
    kind = "factored" if s.factored else "full"
    framework, mode = s.metadata.get("framework"), s.metadata.get("mode")
    how = ""
    if isinstance(framework, str) and mode:
        by = f"by tracin.{framework} with" if framework in ("torch", "jax") else f"with framework={short(framework)},"
        how = f", exported {by} mode={short(mode)}"
    return f"{kind} ({type(s).__name__}{how})"


def _pair(test: Any, train: Any) -> tuple[GradientSet, GradientSet, list[float]]:
    test, train = as_gradient_set(test, "test"), as_gradient_set(train, "train")
    if test.factored != train.factored:
        raise ValueError(
            f"test is {_layout_text(test)} but train is {_layout_text(train)}: both sides must be "
            "factored or both full; export test and train with the same mode"
        )
    weights = _weights(test, train)
    _check_same_gradient_space(test, train)
    if test.dims != train.dims:
        raise ValueError(f"test dims {list(test.dims)} differ from train dims {list(train.dims)}")
    _warn_fitted_elsewhere(test, train)
    return test, train, weights


# True while a caller has told (or will tell) the user itself that a whitening was fitted on another store: the
# command line (in its options' words), tracin.distributed's tasks (the client warned once for all shards)
_FITTED_ELSEWHERE_TOLD: ContextVar[bool] = ContextVar("tracin_fitted_elsewhere_told", default=False)


@contextmanager
def fitted_elsewhere_told() -> Iterator[None]:
    """Inside: _pair does not warn of a whitening fitted on another store than the other side (the caller
    did, once); this thread's (or task's) context only."""
    token = _FITTED_ELSEWHERE_TOLD.set(True)
    try:
        yield
    finally:
        _FITTED_ELSEWHERE_TOLD.reset(token)


_CHECKPOINTS_TOLD: ContextVar[bool] = ContextVar("tracin_checkpoints_told", default=False)


@contextmanager
def pair_warnings_told() -> Iterator[None]:
    """Inside: _pair warns of nothing in the pair's records (a whitening fitted elsewhere, checkpoints given
    differently on the two sides): the caller's own _pair did, once (tracin.distributed's client; its tasks
    score shards of the same pair); this thread's (or task's) context only."""
    with _checkpoints_told(True), fitted_elsewhere_told():
        yield


def fitted_elsewhere(fitted_on: Any, other: Any) -> str | None:
    """The store id of `other` where a whitening fitted on the store of id `fitted_on` (None: fitted in memory)
    meets it and it is another GradientStore (the scores whitened by another set's R), unless a caller told the
    user already (fitted_elsewhere_told); else None."""
    store_id = getattr(other, "store_id", None)
    if _FITTED_ELSEWHERE_TOLD.get() or not isinstance(fitted_on, str) or not isinstance(store_id, str):
        return None
    return store_id if fitted_on != store_id else None


def _warn_fitted_elsewhere(test: GradientSet, train: GradientSet) -> None:
    """A UserWarning at the user's line where a whitened side (metadata['whitening'], as Whitening.apply
    records it) was fitted on a store (its fitted_on id; None: fitted in memory, nothing to compare) other than
    the other side, a GradientStore with another store_id: the scores are whitened by another set's R (say a
    whitening fitted on the test store). A whitened train argument that records the store it holds the rows of
    (metadata['whitened_store']) is W g_train, whitened TracIn's other form, only with a whitening fitted on that
    store: warned of where it was fitted on another, whatever the test side."""
    for whitened, other, name, other_name in ((test, train, "test", "train"), (train, test, "train", "test")):
        fitted = whitened.metadata.get("whitening")
        fitted_on = fitted.get("fitted_on") if isinstance(fitted, dict) else None
        own = whitened.metadata.get("whitened_store")
        if name == "train" and isinstance(own, str):
            if isinstance(fitted_on, str) and fitted_on != own and not _FITTED_ELSEWHERE_TOLD.get():
                warnings.warn(
                    f"the train side holds rows of a gradient store (id {own}) whitened by a whitening fitted on "
                    f"another gradient store (id {fitted_on}); whitened train rows are whitened TracIn only with a "
                    "whitening fitted on them: Whitening.fit(train).apply(train), or whiten the test side with "
                    "Whitening.fit(train).apply(test), unless that was meant (a subset or a copy re-exported)",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
            return
        store_id = fitted_elsewhere(fitted_on, other)
        if store_id is not None:
            where = getattr(other, "path", None)
            warnings.warn(
                f"the {name} side's whitening was fitted on another gradient store (id {fitted_on}) than the "
                f"{other_name} store{'' if where is None else f' {where}'} (id {store_id}); its scores are whitened "
                f"by that store's second moment: fit the whitening on the {other_name} gradients "
                f"(Whitening.fit({other_name}), then apply it to {name}) unless that was meant (a subset or a copy "
                "re-exported)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return


class _Recorded(Protocol):
    """What _check_same_gradient_space reads of a side: a GradientSet, or a stand-in holding its metadata
    (and `path` where a store's is named)."""

    metadata: dict[str, Any]


def _layout(spec: Any) -> list | None:
    """A per-layer projection's recorded segment layout (metadata['projection']['segments']), each
    LayerMatrix dict in to_dict()'s form; None where none is recorded."""
    from .projection import LayerMatrix

    segments = spec.get("segments") if isinstance(spec, dict) else None
    if not isinstance(segments, list):
        return None

    def normal(s: Any) -> Any:  # an older dict lacking default keys as to_dict() writes it; else as recorded
        try:
            return LayerMatrix(**s).to_dict()
        except (TypeError, ValueError):
            return s

    return [normal(s) if isinstance(s, dict) else s for s in segments]


def _param_shapes(params: Any) -> list | None:
    """The shapes of metadata["params"] in row order, None where it is absent or an entry records none
    (metadata of the user's own: only a 'name' is required of it)."""
    if not isinstance(params, list) or not all(isinstance(p, dict) and "shape" in p for p in params):
        return None
    return [list(p["shape"]) for p in params]


def _check_same_layout(
    test: Any, train: Any, names: tuple[str, str], frameworks: tuple[Any, Any] = (None, None)
) -> None:
    """Refuses two sides projected by one Projection over different segment layouts: each segment has its
    own random matrices (a Kronecker segment P_rows G P_cols^T, a plain one P g), so rows of two layouts
    are not comparable though their parameters are the same (a weight tied between an embedding and a
    Linear head is a plain segment in exports before it became one Kronecker segment)."""
    layouts = [_layout(spec) for spec in (test, train)]
    if None in layouts or layouts[0] == layouts[1]:
        return
    j = next((j for j, (s, o) in enumerate(zip(*layouts, strict=False)) if s != o), min(map(len, layouts)))
    shown = [short(layout[j]) if j < len(layout) else "<none>" for layout in layouts]
    raise ValueError(
        f"projection mismatch: {_gradients(names[0])} and {_gradients(names[1])} are projected over different "
        f"segment layouts (metadata['projection']['segments'], {len(layouts[0])} and {len(layouts[1])} "
        f"segments; segment {j}: {shown[0]} in {names[0]}, {shown[1]} in {names[1]}), their rows are not "
        "comparable: "
        + (
            f"exported by tracin.{frameworks[0]} and tracin.{frameworks[1]} (tracin.torch projects an nn.Linear's bias "
            "as its weight's last column, tracin.jax projects biases flat): export both sides with one framework"
            if None not in frameworks and frameworks[0] != frameworks[1]
            else "exported by different tracin versions? Export both sides with this one"
        )
    )


def _check_same_gradient_space(test: _Recorded, train: _Recorded, names: tuple[str, str] = ("test", "train")) -> None:
    """Refuses pairs whose metadata (as the adapters record it) shows they are not gradients of
    the same thing: a different mode, different parameters (same framework), a different
    projection (metadata["projection"] None: unprojected), other checkpoints, or, both sides
    preconditioner="adam", other optimizer states of them (`names` name the two sides in messages).
    Sets without metadata are trusted; recorded keys of another shape than the adapters'
    (metadata_problem) are a ValueError. A whitened side is then also checked by the records of the
    gradients its whitening was fitted on (metadata['whitening']['space']): against the other side, which
    plays the untouched train gradients' part whichever argument it is (the score is symmetric)."""
    t, x = test.metadata, train.metadata
    for name, m in zip(names, (t, x), strict=True):
        problem = metadata_problem(m)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
    first, second = (_gradients(n) for n in names)
    if "mode" in t and "mode" in x and t["mode"] != x["mode"]:
        raise ValueError(f"{first} are mode={short(t['mode'])} but {second} are mode={short(x['mode'])}")
    _check_same_preconditioner(t, x, names)
    if (
        t.get("framework") is not None
        and x.get("framework") is not None
        and t["framework"] != x["framework"]
        and t.get("mode", "full") == "full"
        and None not in (shapes := (_param_shapes(t.get("params")), _param_shapes(x.get("params"))))
        and shapes[0] != shapes[1]
    ):  # names differ across frameworks, but full rows' layout (the shapes in order) must be the same; factored /
        # last_layer rows are the factors (dL/d(output), input with a 1), whatever way a kernel is stored
        raise ValueError(
            f"{names[0]} ({short(t['framework'])}) and {names[1]} ({short(x['framework'])}) lay out their rows "
            f"differently: parameter shapes {short(shapes[0])} vs "
            f"{short(shapes[1])} ({_param_names(t['params'])} vs {_param_names(x['params'])}); "
            "tracin.jax concatenates leaves in tracin.jax.PARAM_ORDER (dict keys sorted), tracin.torch in "
            "named_parameters() order: give the JAX params in the torch module's order and orientation (e.g. a "
            "list of (weight (out, in), bias) pairs), or export both sides with one framework"
        )
    if "projection" in t and "projection" in x and t["projection"] != x["projection"]:
        specs = {}
        for name, side, m in zip(names, (test, train), (t, x), strict=True):
            if m["projection"] is not None:
                specs[name] = _projection_of(m["projection"], name, getattr(side, "path", None))
        (projected, projected_name), (other, other_name) = ((x, names[1]), (t, names[0]))[
            :: 1 if x["projection"] is not None else -1
        ]
        specs[projected_name].check_compatible(other["projection"], what=other_name, this=projected_name)
        _check_same_params(t, x, names)  # other layers= under one per-layer projection: other layouts too
        _check_same_layout(t["projection"], x["projection"], names, (t.get("framework"), x.get("framework")))
    if "whitening" in t and "whitening" in x:
        raise ValueError(
            f"{names[0]} and {names[1]} are both whitened (metadata['whitening']); whiten only the test side "
            "(Whitening.apply) and score it against the unwhitened train gradients"
        )
    _check_same_params(t, x, names)
    warned = _check_same_checkpoints(t, x, names)
    _check_same_optimizer_states(t, x, names)
    if names != ("test", "train"):
        return
    for whitened, other, name, fitted_on in ((t, train, "train", FITTED_ON), (x, test, "test", FITTED_ON_TRAIN)):
        fitted = whitened.get("whitening")
        if isinstance(fitted, dict) and isinstance(fitted.get("space"), dict):
            # then the space of the gradients the whitening was fitted on: the other side's too (bare
            # arrays carry no records of their own, their whitening's are checked); checkpoints given
            # differently warned of once per call
            with _checkpoints_told(warned):
                _check_same_train_space(fitted["space"], other, fitted_on, name)


def _check_same_params(t: dict[str, Any], x: dict[str, Any], names: tuple[str, str]) -> None:
    """Refuses two sides of one framework whose recorded parameters (metadata["params"]) differ."""
    if (
        t.get("framework") is not None
        and t.get("framework") == x.get("framework")
        and "params" in t
        and "params" in x
        and _comparable(t["params"]) != _comparable(x["params"])
    ):
        raise ValueError(
            f"{names[0]} and {names[1]} are gradients of different parameters: "
            + _params_differ(t["params"], x["params"])
        )


def _comparable(params: list[dict]) -> list[dict]:
    """Recorded params with each shape a list (a tuple in metadata given in memory is the same shape)."""
    return [{**p, "shape": list(p["shape"])} if isinstance(p.get("shape"), tuple) else p for p in params]


def _params_differ(a: list[dict], b: list[dict], limit: int = 10) -> str:
    """What differs between two recorded params lists: the names where they differ, else per entry that
    differs its shapes (or, shapes equal, its other differing keys), at most `limit` entries."""
    if [p.get("name") for p in a] != [p.get("name") for p in b]:
        return f"{_param_names(a)} vs {_param_names(b)}"
    diff, shapes_only = [], True
    for p, q in zip(_comparable(a), _comparable(b), strict=True):
        if p == q:
            continue
        keys = (
            ["shape"]
            if p.get("shape") != q.get("shape")
            else sorted((k for k in {*p, *q} if p.get(k) != q.get(k)), key=str)
        )
        shapes_only = shapes_only and keys == ["shape"]
        what = ", ".join(
            f"{'' if k == 'shape' else short(k) + ' '}{short(p.get(k))} vs {short(q.get(k))}" for k in keys[:3]
        )
        diff.append(f"{short(p['name'])} {what}")
    more = f", ... ({len(diff) - limit} more)" if len(diff) > limit else ""
    return ("shapes differ: " if shapes_only else "entries differ: ") + "; ".join(diff[:limit]) + more


def _param_names(params: list[dict], limit: int = 40) -> str:
    """The recorded params' names as a list's repr ("['fc.weight', 'fc.bias']"), each cut to 80 characters
    and at most `limit` of them: a hostile manifest can record huge names, or millions of them."""
    names = ", ".join(short(p["name"]) for p in params[:limit])
    return f"[{names}{f', ... ({len(params) - limit} more)' if len(params) > limit else ''}]"


def _check_same_train_space(space: dict, train: _Recorded, name: str, side: str = "train") -> None:
    """Refuses a train side whose records are not those of the gradients a whitening was fitted on
    (`space`, WhiteningSpec.space, named `name` in messages; the train side named `side`: "test" where
    the whitened set is the train argument). Both are train-side records, compared as
    one side's: the same preconditioner kind (LESS's "adam_update" included: test rows pair with it, not
    the whitening), then as _check_same_gradient_space compares two sides (mode, projection, parameters,
    checkpoints), then the preconditioner's settings and optimizer states (checkpoints first, as for two sides)."""
    names = (name, side)
    problem = metadata_problem(space)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    x = train.metadata
    if "mode" in space and "mode" in x:  # else "preconditioner" is not read, as _check_same_preconditioner
        kinds = [_preconditioner_kind(m) for m in (space, x)]
        if kinds[0] != kinds[1]:
            raise FittedKindError(
                f"{name} are preconditioner={short(kinds[0])} but {side} gradients are "
                f"preconditioner={short(kinds[1])}: "
                f"fit the whitening on the {side} side's gradients (Whitening.fit({side}))",
                (kinds[0], kinds[1]),
            )
    plain = [SimpleNamespace(metadata={k: v for k, v in m.items() if k != "preconditioner"}) for m in (space, x)]
    plain[1].path = getattr(train, "path", None)  # named in a projection message
    _check_same_gradient_space(plain[0], plain[1], names)  # checkpoints before optimizer states, as two sides
    if "mode" in space and "mode" in x and kinds[0] is not None:
        _check_same_hyperparameters(space, x, names)
        _check_same_optimizer_states(space, x, names)


def _projection_of(spec: Any, name: str, path: Any = None) -> Any:
    """The Projection a side's metadata["projection"] records; a ValueError naming the side (and
    the store at `path`) and the form expected where it is not a spec Projection.from_dict reads."""
    from .projection import Projection

    try:
        return Projection.from_dict(spec)
    except (TypeError, ValueError) as e:
        where = f" (gradient store {path})" if path is not None else ""
        if isinstance(spec, dict) and str(e).startswith("projection spec from generator version"):
            raise ValueError(f"{_gradients(name)}{where}: {e}") from None  # a spec, of another generator
        raise ValueError(
            f"{_gradients(name)}{where}: metadata['projection'] is not a projection spec tracin can read ({e}); "
            "it must be null (unprojected) or the dict tracin.Projection(...).to_dict() writes, e.g. "
            f"{Projection(8192, seed=0).to_dict()}"
        ) from None


class CheckpointMismatchError(ValueError):
    """Two gradient sets exported at different checkpoints (their recorded digests differ), or two
    preconditioner="adam" sets exported with different optimizer states of their checkpoints
    (`optimizer_states` True); `checkpoints`: the indices of the real checkpoints that differ."""

    def __init__(
        self,
        message: str,
        checkpoints: list[int] | None = None,
        optimizer_states: bool = False,
        names: tuple[str, str] = ("test", "train"),
    ):
        super().__init__(message)
        self.checkpoints = [] if checkpoints is None else checkpoints
        self.optimizer_states = optimizer_states
        self.names = names  # the two sides as the message names them (FITTED_ON first: a whitening's train side)

    @property
    def listed(self) -> str:
        """`checkpoints` as messages show them: the first few indices, then how many differ in all."""
        return listed_indices(self.checkpoints)


def listed_indices(indices: list[int], limit: int = 8) -> str:
    """'[0, 3]', or past `limit` indices '[0, 1, 2, 3, 4, 5, 6, 7, ...] (1000 in all)'."""
    if len(indices) <= limit:
        return str(list(indices))
    return f"[{', '.join(str(i) for i in indices[:limit])}, ...] ({len(indices)} in all)"


FITTED_ON = "the gradients the test side's whitening was fitted on"
"""How messages name the train-side records a whitened test side carries (metadata['whitening']['space'])."""
FITTED_ON_TRAIN = "the gradients the train side's whitening was fitted on"
"""As FITTED_ON, for a whitened set passed as the train side (checked against the test side)."""


class FittedKindError(ValueError):
    """A whitened test side whose whitening was fitted on gradients of another preconditioner kind than the
    train side's: `kinds` (the fitted-on gradients', the train side's)."""

    def __init__(self, message: str, kinds: tuple[Any, Any]):
        super().__init__(message)
        self.kinds = kinds


def _check_same_checkpoints(t: dict, x: dict, names: tuple[str, str] = ("test", "train")) -> bool:
    """Refuses sides exported at different checkpoints (CheckpointMismatchError; `names` name the
    metadata `t` and `x` in its message). Checkpoint c (a real one: a factored set's
    layers share its digest) is compared where both sides' digests of it
    (metadata["fingerprints"]["checkpoints"]) were made the same way by the same framework
    (metadata["checkpoint_sources"]: "file", the bytes at a path, or "state", an in-memory
    checkpoint's arrays): one checkpoint given as a file on one side and in memory on the other
    digests differently (warned of: _warn_unchecked_checkpoints, whose result it returns). Sides without these
    records (older stores, sets built by hand) are trusted."""
    differ, kinds = _differing_records(t, x, "checkpoints", "checkpoint_sources")
    warned = _warn_unchecked_checkpoints(t, x, names)
    if differ:
        raise CheckpointMismatchError(
            f"{names[0]} and {names[1]} were exported at different checkpoints: checkpoints "
            f"{listed_indices(differ)} differ (their digests in metadata['fingerprints']['checkpoints'], made alike: "
            "metadata['checkpoint_sources']); "
            "score gradients of the same checkpoints. If they are the same weights saved differently (a file "
            "or an orbax checkpoint folder saved again: orbax writes timestamps and randomly named files; "
            "renamed keys), drop the record from one side to have the pair trusted: "
            "side.metadata.pop('checkpoint_sources') (with tracin.distributed, from a side that is not a "
            "store: workers open stores again by path)" + static_digest_note(t["framework"], kinds),
            differ,
            names=names,
        )
    return warned


def _warn_unchecked_checkpoints(t: dict, x: dict, names: tuple[str, str]) -> bool:
    """A UserWarning at the user's line where two sides of one framework record checkpoints given one way on
    one side and the other way on the other (metadata["checkpoint_sources"]: "file" / "state"), whose digests
    are made differently and so never compared: sides exported at other checkpoints (or the same ones listed
    in another order) would be scored without a word. Not inside pair_warnings_told() (nor _checkpoints_told).
    Whether it warned."""
    if _CHECKPOINTS_TOLD.get() or t.get("framework") is None or t.get("framework") != x.get("framework"):
        return False
    ours = _checkpoint_records(t, "checkpoints", "checkpoint_sources")
    theirs = _checkpoint_records(x, "checkpoints", "checkpoint_sources")
    if ours is None or theirs is None or len(ours) != len(theirs):
        return False
    mixed = [c for c, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a[1] != b[1]]
    if not mixed:
        return False
    worded = _SIDES_WORDED.get()
    first, second = (names[0], names[1]) if worded is None else (worded.get(n, n) for n in names)
    given = {"file": "as a file or folder path", "state": "in memory"}
    ways = {(ours[c][1], theirs[c][1]) for c in mixed}
    if len(ways) == 1:
        how = [given.get(way, repr(way)) for way in next(iter(ways))]
        said = f"were given {how[0]} for {first} and {how[1]} for {second}"
    else:  # some one way, some the other
        said = f"were given some as file or folder paths for {first} and in memory for {second}, some the other way"
    both = "both sides" if worded is None else f"{first} and {second}"
    warnings.warn(
        f"checkpoints {listed_indices(mixed)} {said} (metadata['checkpoint_sources']): their digests are made "
        f"differently, so tracin cannot check that both sides were exported at the same checkpoints (another "
        f"checkpoint, or the list in another order, would not be caught); export {both} with their checkpoints "
        "given the same way (both as paths, or both as loaded weights)",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    return True


# the words a caller names the sides by in the warning of checkpoints given differently (the command line's
# options), keyed by the library's names of them ("test", "train", FITTED_ON, ...); None: the library's names
_SIDES_WORDED: ContextVar[dict[str, str] | None] = ContextVar("tracin_sides_worded", default=None)


@contextmanager
def sides_worded(words: dict[str, str]) -> Iterator[None]:
    """Inside: the warning of checkpoints given differently on the two sides names each side by `words` (the
    library's name of it -> the caller's, e.g. {"test": "--test", "train": "--train"}; a name not in it is
    kept) and advises exporting those two, not "both sides"; this thread's (or task's) context only."""
    token = _SIDES_WORDED.set(dict(words))
    try:
        yield
    finally:
        _SIDES_WORDED.reset(token)


@contextmanager
def _checkpoints_told(told: bool) -> Iterator[None]:
    """Inside, where `told`: _warn_unchecked_checkpoints is quiet (this call warned already)."""
    token = _CHECKPOINTS_TOLD.set(_CHECKPOINTS_TOLD.get() or told)
    try:
        yield
    finally:
        _CHECKPOINTS_TOLD.reset(token)


def _check_same_optimizer_states(t: dict, x: dict, names: tuple[str, str] = ("test", "train")) -> None:
    """Refuses two preconditioner="adam" sides (or two "adam_update" records of one side: a whitening's
    train rows and the train side) exported with different optimizer states of their checkpoints
    (CheckpointMismatchError, optimizer_states True; `names` name the metadata `t` and `x` in its
    message): Adam's second moments weigh each side's rows, so scores of two sides weighed by
    different states mean nothing. Checkpoint c's states are compared where both sides' digests of
    them (metadata["fingerprints"]["optimizer_states"]) were made the same way by the same framework
    (metadata["optimizer_state_sources"]: "file", the bytes at a path, or "state", an in-memory
    state's arrays). Sides without these records (older stores, sets built by hand) are trusted."""
    kind = _preconditioner_kind(t)
    if kind not in ("adam", "adam_update") or _preconditioner_kind(x) != kind:
        return  # ("adam_update" and "adam_update": one side's rows, as a whitening's are to its train side's)
    differ, _ = _differing_records(t, x, "optimizer_states", "optimizer_state_sources")
    if differ:
        raise CheckpointMismatchError(
            f"{names[0]} and {names[1]} were exported with different optimizer states: the optimizer states of "
            f"checkpoints {listed_indices(differ)} differ (their digests in "
            "metadata['fingerprints']['optimizer_states'], made alike: metadata['optimizer_state_sources']), and "
            f"preconditioner={kind!r} rows are computed from "
            "them; export both sides with the optimizer state saved with each checkpoint. If they are the "
            "same states saved differently (a file saved again), drop the record from one side to have the pair "
            "trusted: side.metadata.pop('optimizer_state_sources') (with tracin.distributed, from a side that "
            "is not a store: workers open stores again by path)",
            differ,
            optimizer_states=True,
            names=names,
        )


def _differing_records(t: dict, x: dict, key: str, sources_key: str) -> tuple[list[int], list[Any]]:
    """(indices, source kinds) of the real checkpoints whose digests in metadata["fingerprints"][key]
    differ between two sides of one framework where both were made alike (metadata[sources_key]);
    ([], []) when the sides are of other frameworks or either lacks the records."""
    if t.get("framework") is None or t.get("framework") != x.get("framework"):
        return [], []
    ours, theirs = _checkpoint_records(t, key, sources_key), _checkpoint_records(x, key, sources_key)
    if ours is None or theirs is None or len(ours) != len(theirs):
        return [], []
    differ = [c for c, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a[1] == b[1] and a[0] != b[0]]
    return differ, [ours[c][1] for c in differ]


def _checkpoint_records(m: dict, key: str, sources_key: str) -> list[tuple[Any, Any]] | None:
    """(digest, source kind) per real checkpoint as an export records them in metadata["fingerprints"][key]
    and metadata[sources_key] (the checkpoints', or their optimizer states'), or None when it does not."""
    fingerprints = m.get("fingerprints")
    digests = fingerprints.get(key) if isinstance(fingerprints, dict) else None
    sources = m.get(sources_key)
    if not isinstance(digests, list) or not isinstance(sources, list) or len(digests) != len(sources):
        return None
    return list(zip(digests, sources, strict=True))


def _gradients(name: str) -> str:
    """A side's name as the subject of a message: "test gradients", or a phrase as it is ("the
    gradients the whitening was fitted on")."""
    return name if " " in name else f"{name} gradients"


def _rows(name: str) -> str:
    """A side's name as the rows to export again: "test rows", or a phrase as it is."""
    return name if " " in name else f"{name} rows"


def _check_same_preconditioner(t: dict, x: dict, names: tuple[str, str] = ("test", "train")) -> None:
    """Both sides preconditioned alike (metadata["preconditioner"]: None or {"kind": ...}), except the
    LESS pairing: train rows "adam_update" against plain test rows; two sides of one kind with the
    same hyperparameters where both record them (_check_same_hyperparameters; `names` name the sides)."""
    if "mode" not in t or "mode" not in x:
        return
    kt, kx = (_preconditioner_kind(m) for m in (t, x))
    if kt is not None and kt == kx:
        _check_same_hyperparameters(t, x, names)
    first, second = (_gradients(n) for n in names)
    if kt == "adam_update":
        raise ValueError(
            f"{first} are preconditioner='adam_update', which is for train rows only (scored against plain "
            f"test rows): export {_rows(names[0])} with preconditioner=None"
        )
    if kx == "adam_update" and kt is not None:
        raise ValueError(
            f"{second} are preconditioner='adam_update', which pairs with plain test rows, but {first} are "
            f"preconditioner={short(kt)}: export {_rows(names[0])} with preconditioner=None (from the same "
            "checkpoints, without their optimizer states)"
        )
    if kt != kx and kx != "adam_update":
        raise ValueError(
            f"{first} are preconditioner={short(kt)} but {second} are "
            f"preconditioner={short(kx)}: export both sides with the same one"
        )


def _check_same_hyperparameters(t: dict, x: dict, names: tuple[str, str] = ("test", "train")) -> None:
    """Refuses two sides of one preconditioner kind whose records (metadata["preconditioner"]) give
    another value to a setting both record (tracin.jax's b1, b2, eps from preconditioner_options=):
    Adam's b2 and eps weigh each side's rows as its second moments do. A setting one side lacks (a
    record of an older version, or torch's, whose hyperparameters are in each optimizer state and so
    in its digest) is not compared."""
    ours, theirs = t["preconditioner"], x["preconditioner"]
    differ = {key: (ours[key], theirs[key]) for key in ours.keys() & theirs.keys() if ours[key] != theirs[key]}
    if differ:
        settings = ", ".join(f"{str(key):.80} {short(a)} vs {short(b)}" for key, (a, b) in sorted(differ.items()))
        raise ValueError(
            f"{names[0]} and {names[1]} were preconditioned with other settings "
            f"(metadata['preconditioner']: {settings}), which weigh each side's rows differently: export "
            "both sides with the same preconditioner_options"
        )


def _preconditioner_kind(metadata: dict) -> Any:
    """metadata["preconditioner"]["kind"] as the adapters record it ({"kind": "adam", ...}); None for
    none, or for a record of another shape (a user's own metadata)."""
    recorded = metadata.get("preconditioner")
    return recorded.get("kind") if isinstance(recorded, dict) else None


def check_self_influence_rows(train: GradientSet) -> None:
    """Refuses rows whose self-influence means nothing: preconditioner='adam_update' rows are Adam's next
    steps u_c, whose score pairs with a plain gradient (<g, u>); sum_c w_c |u_c|^2 is not a self-influence."""
    if _preconditioner_kind(train.metadata) == "adam_update":
        raise ValueError(
            "train gradients are preconditioner='adam_update' (Adam's next steps u, for pairing with plain test "
            "rows), whose squared norms are no self-influence; rank by the diagonal of scores(plain rows, "
            "adam_update rows) (the same examples exported with preconditioner=None as the test side), or by "
            "self_influence of plain or preconditioner='adam' rows"
        )


def _checkpoint_run(s: GradientSet) -> int | None:
    """Checkpoint slots per real checkpoint as an export records them (one fingerprint per real
    checkpoint in metadata["fingerprints"]["checkpoints"]; mode="factored" stores checkpoint c,
    layer l at slot c * L + l), or None when the metadata does not say."""
    fingerprints = s.metadata.get("fingerprints")
    digests = fingerprints.get("checkpoints") if isinstance(fingerprints, dict) else None
    if not isinstance(digests, list) or not digests or s.n_checkpoints % len(digests):
        return None
    return s.n_checkpoints // len(digests)


class WhitenedNormalizeError(ValueError):
    """normalize=True asked of a whitened side (metadata['whitening']): `sides`, those whitened ("test",
    "train" or both, in that order)."""

    def __init__(self, message: str, sides: tuple[str, ...]):
        super().__init__(message)
        self.sides = sides


def _normalize_run(normalize: Any, test: GradientSet, train: GradientSet) -> int:
    """The backends' `normalize`: 0 for plain scores, else the checkpoint slots normalised together
    (the layers of one real checkpoint, from the sets' metadata; 1 when neither records it).
    A whitened side is a WhitenedNormalizeError naming it."""
    normalize = flag(normalize, "normalize")
    if not normalize:
        return 0
    whitened = tuple(name for name, s in (("test", test), ("train", train)) if "whitening" in s.metadata)
    if whitened:
        head = "normalize=True does not combine with whitened gradients (metadata['whitening'])"
        if len(whitened) == 2:  # _pair refuses these first; kept accurate for a caller that checks normalize first
            message = (
                f"{head}, and both sides are whitened, which is refused with normalize=False too: the whitening "
                "applies once, to the test side; whiten only the test side (Whitening.apply) and score it against "
                "the unwhitened train gradients with normalize=False"
            )
        else:
            other = "train" if whitened == ("test",) else "test"
            message = (
                f"{head}: the {whitened[0]} side is whitened and the {other} side is not, so a cosine of the two "
                "compares different spaces; score whitened sets with normalize=False"
            )
        raise WhitenedNormalizeError(message, whitened)
    runs = {name: r for name, r in (("test", _checkpoint_run(test)), ("train", _checkpoint_run(train))) if r}
    if len(set(runs.values())) > 1:
        raise ValueError(
            f"test records {runs['test']} checkpoint slots (layers) per checkpoint but train {runs['train']} "
            "(metadata['fingerprints']['checkpoints']); normalize=True needs the same grouping on both sides"
        )
    return next(iter(runs.values()), 1)


def _chunks(s: GradientSet, limit: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of `s` as its row_chunks() cuts it (one range without them), of at most `limit` rows."""
    step = s.row_chunks() or max(s.n_rows, 1)
    if limit is not None:
        step = min(step, limit)
    return [(a, min(a + step, s.n_rows)) for a in range(0, max(s.n_rows, 1), step)]


def _device_test_rows(backend: Backend, test: GradientSet, normalize: int, state: int = 0) -> int | None:
    """Test rows per chunk for a device backend, which uploads a chunk whole and keeps `state` bytes
    per test row of the chunk while it is scored (top_k's running selection: _TOPK_STATE_BYTES x k x
    sides): DEVICE_TEST_BYTES of both. None (no cut) for the CPU kernel, which reads the test side in
    passes of its own. A test set used in place costs no upload: plain scores (normalize 0) of an
    in-memory set whose blocks are all float32 tensors on the backend's device (its `holds`), cut
    only for `state` (each chunk reads the whole train side again; cosine scores scale a copy)."""
    if backend.name == "cpu":
        return None
    holds = getattr(backend, "holds", None)  # TorchBackend's; other backends upload every chunk
    in_place = not normalize and holds is not None and test.row_chunks() is None and holds(test.kernel_side())
    per_row = (0 if in_place else 4 * max(_width(test), 1)) + state
    return max(1, _tunables.DEVICE_TEST_BYTES // per_row) if per_row else None


_TOPK_STATE_BYTES = 12
"""Device bytes of top_k's running selection per test row, side and k: a float32 value and an int64 index."""


def _width(s: GradientSet) -> int:
    """Multiply-adds per pair of rows: the summed dims (p + q per factored checkpoint)."""
    return int(sum(np.sum(d) for d in s.dims))


def _check_side(side: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(side, str) or side not in allowed:
        choices = " or ".join([", ".join(map(repr, allowed[:-1])), repr(allowed[-1])])
        raise (ValueError if isinstance(side, str) else TypeError)(f"side must be {choices}, got {side!r}")


def _backend(device: Any, precision: Any, **sets: GradientSet) -> Backend:
    """The backend that scores this call (tracin.backends.placement.choose)."""
    return placement.choose(device, precision, sets)


class _Pair(NamedTuple):
    """One step of the generic loop: test rows [test_rows] against train rows [train_rows], each side
    as a backend takes it (test None for self-influence)."""

    test_rows: slice
    test: KernelSide | None
    train_rows: slice
    train: KernelSide


class _Loop:
    """The generic loop over (test chunk x train piece), and the tqdm bar it advances: over the train
    rows once per test chunk (its total train rows x chunks, its description naming the chunks).

    Test chunks and train pieces follow each set's row_chunks() (a store maps that many rows per
    call), test chunks of at most `test_rows` rows (a device backend's upload, _device_test_rows).
    progress: True, False, or None (automatic, if tqdm is installed: a bar at once when the work is at
    least _AUTO_PROGRESS_MACS multiply-adds, else one that appears once the call has run
    _progress.AUTO_DELAY_S seconds, e.g. a store read from a slow disk). With progress True or a
    call that long, and `split`, each train chunk is cut into up to _BAR_STEPS pieces of at least
    _MIN_PIECE_ROWS rows so that the bar moves, fewer when the extra pieces (a kernel call each and,
    for top_k, its candidate selection and a merge) would cost more than _bar_steps allows; below
    it, for `timed` calls (the CPU kernel on `threads` threads, 0: all it may use; capped at the
    usable cores, as the CPU backend caps them) estimated to outlast the delay, into the fewer pieces
    _auto_steps allows, else none: the bar moves once per train chunk (a store's row_chunks()).
    Results do not depend on the cut. test None: train pieces only (self-influence). top_k: (k,
    sides) of a top_k call (an extra piece merges their candidates; the kernel's MemoryError names
    them). `cache` is the backends' ChunkCache for the current test chunk (what a device backend
    uploads once per chunk, not once per piece), emptied when the loop ends; its `next_train` is the
    train side of the next pair, taken one pair ahead, so that a device backend can start uploading
    it while it scores the current one. `lead`: rows the caller advances the bar by (advance) before
    the pairs, counted in its total (aggregate's test rows, summed by columns ahead of the train pass).
    """

    def __init__(
        self,
        test: GradientSet | None,
        train: GradientSet,
        progress: Any,
        macs: float,
        desc: str,
        split: bool = True,
        *,
        threads: int = 0,
        top_k: tuple[int, int] | None = None,
        timed: bool = False,
        test_rows: int | None = None,
        lead: int = 0,
    ):
        check_progress(progress)
        # The CPU backend caps num_threads at the usable cores (backends/cpu.py); so do the estimates.
        threads = min(threads or usable_cores(), usable_cores())
        self.threads, self.top_k = threads, top_k  # for the kernel's out-of-memory message
        if progress is None and macs >= _AUTO_PROGRESS_MACS and shows_automatically():
            progress = True  # long by its multiply-adds alone: a bar at once, and pieces for it
        self.test, self.train = test, train
        self.test_chunks = [(0, 0)] if test is None else _chunks(test, test_rows)
        self.pieces = _chunks(train)
        steps = 1
        seconds, extra = _estimated_seconds(macs, threads, test, train, top_k)
        if progress:
            steps = _bar_steps(seconds, extra)
        if progress is None and timed and shows_automatically():
            steps = _auto_steps(seconds, extra)
        if steps > 1 and split:
            step = max(_MIN_PIECE_ROWS, -(-train.n_rows // steps))
            self.pieces = [(s, min(s + step, b)) for a, b in self.pieces for s in range(a, max(b, a + 1), step)]
        if len(self.test_chunks) > 1:  # the train rows are passed over once per chunk
            desc = f"{desc}, {len(self.test_chunks)} test chunks"
        self.bar = progress_bar(lead + len(self.test_chunks) * train.n_rows, progress, desc, unit="row")
        self.cache = ChunkCache()
        self.current: _Pair | None = None

    def pairs(self) -> Iterator[_Pair]:
        """Every (test chunk, train piece), test chunks outer; the bar advances once a pair is used."""
        steps = [(t, piece) for t in self.test_chunks for piece in self.pieces]
        train = self._train(steps[0][1])
        for j, ((t0, t1), (i0, i1)) in enumerate(steps):
            self.cache.use((t0, t1))
            current, train = train, self._train(steps[j + 1][1]) if j + 1 < len(steps) else None
            self.cache.next_train = train
            # The test side is taken again for every piece, so that a store's checks that it is
            # unchanged (done per kernel_side call) cover the test side for the whole run.
            test = None if self.test is None else KernelSide._make(self.test.kernel_side(t0, t1))
            self.current = _Pair(slice(t0, t1), test, slice(i0, i1), current)
            yield self.current
            self.bar.update(i1 - i0)

    def advance(self, rows: int) -> None:
        """Moves the bar by `rows` of the caller's `lead`."""
        self.bar.update(rows)

    def _train(self, piece: tuple[int, int]) -> KernelSide:
        return KernelSide._make(self.train.kernel_side(*piece))

    def __enter__(self) -> _Loop:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        self.cache.clear()
        self.bar.close()
        if type(exc) is MemoryError and str(exc) == _KERNEL_OOM and self.test is not None:
            raise MemoryError(self._oom_message()) from None
        if type(exc) is ValueError and self.current is not None:
            message = rows_shifted(str(exc), self.current.test_rows.start, self.current.train_rows.start)
            if message is not None:
                raise ValueError(message) from None

    def _oom_message(self) -> str:
        """The kernel's MemoryError with its likely cause: the packed test rows of a pass (wide rows)
        or, for top_k, the candidate buffers of the pair being scored (large k), whichever is larger."""
        assert self.test is not None
        width = _width(self.train)
        m, n = self.test.n_rows, self.train.n_rows
        if self.current is not None:
            m, n = _span(self.current.test_rows), _span(self.current.train_rows)
        threads = min(self.threads, max(-(-n // 96), 1))  # the kernel runs no more than its tiles
        k, sides = self.top_k or (0, 0)
        rows = _pass_rows(m, width, _selector_row_cap(min(k, n), n, min(self.threads, n), sides))
        per_row = _candidates_per_row(min(k, n), n, threads)
        candidates = 16 * rows * per_row * threads * sides
        if candidates > 4 * width * rows:
            return (
                f"{_KERNEL_OOM} (top_k's candidates for k={k:,}: {rows} test rows per pass x about "
                f"{per_row:,} candidates x 16 bytes per thread ({threads}) and side ({sides}), "
                f"{candidates / 2**20:,.0f} MiB here, besides the result); lower k, pass fewer test rows "
                "per call or a smaller num_threads, or free memory"
            )
        return (
            f"{_KERNEL_OOM} (rows of {width:,} columns: it holds at least 8 test rows of full depth as "
            f"float32, {32 * width / 2**20:,.0f} MiB here, besides the result); project the gradients "
            "to fewer dims first (tracin.Projection), or free memory"
        )


def _estimated_seconds(
    macs: float, threads: int, test: GradientSet | None, train: GradientSet, top_k: tuple[int, int] | None
) -> tuple[float, float]:
    """(seconds of the call in one piece, seconds each extra piece adds) estimated for the CPU kernel
    on `threads` threads: multiply-adds at _AUTO_RATE per thread, top_k's selection (_SELECT_S, per
    piece, k above 64) and, per extra piece, a kernel call (_PIECE_S) and the merge of the (m, 2k)
    candidates per side (_MERGE_S)."""
    seconds, extra = macs / (_AUTO_RATE * threads), _PIECE_S
    if top_k is not None and test is not None:
        k, sides = min(top_k[0], train.n_rows), top_k[1]
        select = _SELECT_S * test.n_rows * sides * k if top_k[0] > 64 else 0.0
        seconds += select
        extra += select + _MERGE_S * test.n_rows * 2 * k * sides
    return seconds, extra


def _bar_steps(seconds: float, extra: float) -> int:
    """Train pieces for a call with a bar, estimated to take `seconds` in one piece and `extra` more
    per extra piece (_BAR_SHARE), up to _BAR_STEPS."""
    budget = max(_BAR_SHARE * seconds, _BAR_S)
    return max(1, min(_BAR_STEPS, 1 + int(budget / extra)))


def _auto_steps(seconds: float, extra: float) -> int:
    """Train pieces for an automatic bar (progress=None) over a call estimated to take `seconds` in one
    piece and `extra` more per extra piece: 1 (one call; a bar moving once per chunk) for work
    estimated to end within _progress.AUTO_DELAY_S, else as many as keep the extra pieces' estimated
    cost within _AUTO_OVERHEAD of the work, up to _AUTO_STEPS."""
    if seconds <= _progress.AUTO_DELAY_S:
        return 1
    return max(1, min(_AUTO_STEPS, 1 + int(_AUTO_OVERHEAD * seconds / extra)))


def _span(rows: slice) -> int:
    return rows.stop - rows.start


def _pass_rows(m: int, width: int, cap: int | None = None) -> int:
    """Test rows the kernel scores per pass over the train side (csrc/src/engine.cpp DefaultPassRows:
    up to 512, fewer when their float32 copy would pass 64 MiB, at least 8; then RoundDownPassRows of
    `cap`, top_k's _selector_row_cap, when below)."""
    by_budget = 2**26 // max(4 * width, 1)
    rows = min(by_budget // 32 * 32, 512) if by_budget >= 32 else max(by_budget // 8 * 8, 8)
    rows = min(rows, m)
    if cap is not None and cap < rows:
        rows = cap // 32 * 32 if cap >= 32 else cap // 8 * 8 if cap >= 8 else cap
    return max(rows, 1)


def _selector_row_cap(k: int, n: int, threads: int, sides: int) -> int | None:
    """Most test rows per pass whose top-k candidates, at their largest, fit 64 MiB on `threads` threads
    and `sides` sides (csrc/src/api.cpp TopKConsumer::MaxPassRows); None without top_k."""
    if sides == 0:
        return None
    per_row = k if k <= 64 else max(k + 1, min(2 * k, n))
    return max(2**22 // threads // sides // max(per_row, 1), 1)


def _candidates_per_row(k: int, n: int, threads: int) -> int:
    """Candidates of one test row a kernel thread keeps for top_k over n train rows (csrc/src/topk.hpp):
    a heap of k up to k=64, else a buffer with room for a quarter more than the thread's share of the
    train rows (at least 64), at most min(2k, n) (k + 1 when that is n): it doubles when a row fills it."""
    if k <= 64:
        return k
    share = -(-n // threads)
    return min(max(share + share // 4, 64), max(k + 1, min(2 * k, n)))


def rows_shifted(message: str, test_start: int, train_start: int) -> str | None:
    """A backend's NaN/Inf message (or the C++ kernel's float32 overflow message naming a pair, or
    self-influence's naming train rows) about rows from test_start / train_start on, with its row
    numbers counted from the start of the sets instead (None for any other message)."""
    found = _NON_FINITE.match(message)
    own = _SELF_OVERFLOW.match(message)
    if own is not None:
        shifted = ", ".join(str(train_start + int(r)) for r in own[3].split(", "))
        return f"{own[1]}{own[2]}{shifted}]{message[own.end() :]}"
    if found is None:
        pair = _OVERFLOW_PAIR.search(message)
        if pair is None:
            return None
        test_row, train_row = test_start + int(pair[1]), train_start + int(pair[2])
        return (
            message[: pair.start()] + f"first for test row {test_row} and train row {train_row}" + message[pair.end() :]
        )
    side, block, rows = found.groups()
    start = test_start if side == "test" else train_start
    factored = " factor of " in block  # block_name's "left/right factor of checkpoint c"
    return non_finite_message(
        side, factored, _block_number(block, factored), [start + int(r) for r in rows.split(", ")]
    )


def scores(
    test: Any,
    train: Any,
    *,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    normalize: bool = False,
) -> np.ndarray:
    """Dense influence scores float32 (m, n): entry (t, i) = sum_c w_c <g_c(t), g_c(i)>.

    test, train: gradient rows, one per example: a 2-D (n, d) float32, float16 or bfloat16 array (NumPy,
    np.memmap, torch tensor, JAX array; one checkpoint of weight 1; float64 is refused), a list of such
    arrays (one per checkpoint, the same n), a tracin.Gradients or tracin.FactoredGradients (with the
    checkpoints' weights), or a GradientStore (tracin.GradientStore.open(path)). Both sides need the same
    checkpoints and widths.

    >>> import numpy as np, tracin
    >>> train = np.array([[1, 0], [0, 2], [-1, 1]], np.float32)  # 3 examples' gradients, one checkpoint
    >>> test = np.array([[1, 1], [2, 0]], np.float32)
    >>> tracin.scores(test, train).tolist()
    [[1.0, 2.0, 0.0], [2.0, 0.0, -2.0]]

    Materialises the whole matrix: for small problems. Use top_k for large ones. Very wide rows
    (about 1e8 columns and more) need gigabytes of working memory: see top_k.
    progress: a tqdm bar over train rows (None: if tqdm is installed and stderr is a terminal or
    Jupyter, for calls that run over about 2 s).
    On a device, a test set of over 1 GiB of float32 rows is scored in chunks, each passing over the
    train rows: the bar then counts train rows x chunks (its description: "..., 3 test chunks").
    device, precision, normalize: where and how to score, as in top_k.
    """
    test, train, w = _pair(test, train)
    run = _normalize_run(normalize, test, train)
    threads = thread_count(num_threads)
    backend = _backend(device, precision, test=test, train=train)
    out = None
    macs, timed = test.n_rows * train.n_rows * _width(train), backend.name == "cpu"
    cut = _device_test_rows(backend, test, run)
    with _Loop(test, train, progress, macs, "tracin scores", threads=threads, timed=timed, test_rows=cut) as loop:
        single = len(loop.test_chunks) == len(loop.pieces) == 1
        for p in loop.pairs():
            part = backend.scores(p.test, p.train, w, num_threads=threads, normalize=run, cache=loop.cache)
            if single:  # the backend's fresh (m, n) array is the result: no second (m, n) matrix
                out = part
            else:
                if out is None:
                    out = np.empty((test.n_rows, train.n_rows), dtype=np.float32)
                out[p.test_rows, p.train_rows] = part
    assert out is not None and out.dtype == np.float32 and out.shape == (test.n_rows, train.n_rows)
    return out


def top_k(
    test: Any,
    train: Any,
    k: int = 10,
    side: str = "proponents",
    *,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    normalize: bool = False,
) -> TopK | BothSides:
    """Exact top-k training examples per test example, without the dense score matrix.

    test, train: gradient rows, one per example: a 2-D (n, d) float32, float16 or bfloat16 array (NumPy,
    np.memmap, torch tensor, JAX array; one checkpoint of weight 1; float64 is refused), a list of such
    arrays (one per checkpoint, the same n), a tracin.Gradients or tracin.FactoredGradients (with the
    checkpoints' weights), or a GradientStore (tracin.GradientStore.open(path)). Both sides need the same
    checkpoints and widths.
    Returns TopK(values float32 (m, k), indices int64 (m, k) into the train rows), best first per test
    row; side="both": BothSides(proponents: TopK, opponents: TopK).

    >>> import numpy as np, tracin
    >>> train = np.array([[1, 0], [0, 2], [-1, 1]], np.float32)  # 3 examples' gradients, one checkpoint
    >>> test = np.array([[1, 1], [2, 0]], np.float32)
    >>> best = tracin.top_k(test, train, k=2)
    >>> best.indices.tolist(), best.values.tolist()
    ([[1, 0], [0, 1]], [[2.0, 1.0], [2.0, 0.0]])
    >>> helped, hurt = tracin.top_k(test, train, k=1, side="both")
    >>> hurt.indices.tolist(), hurt.values.dtype, hurt.indices.dtype
    ([[2], [2]], dtype('float32'), dtype('int64'))

    side: "proponents" (the k highest scores, largest first), "opponents" (the k lowest, most negative
    first; either side includes scores of 0 or of the other sign when fewer than k have its sign) or
    "both" (BothSides(proponents, opponents) from a single pass). Ties go to the smaller train index;
    k larger than the number of train rows gives that many columns.
    progress: a tqdm bar over train rows (None: if tqdm is installed and stderr is a terminal or
    Jupyter, for calls that run over about 2 s).
    On a device, test rows are scored in chunks of 1 GiB of their float32 rows (none for a test set
    already on it, plain scores) plus the running selection, 12 B x min(k, train rows) x sides per
    row, each passing over the train rows: the bar then counts train rows x chunks (its description:
    "..., 3 test chunks").
    device: where to score. None (default): on the GPU holding the rows when they are GPU arrays
    (torch CUDA tensors; JAX / CuPy GPU arrays through DLPack), else "cpu" (the C++ kernel).
    "cuda" / "cuda:N": on that GPU through torch, host rows (NumPy, stores) streamed to it; within
    the same scale-aware bound of the exact scores, but not the same bits as "cpu".
    "torch:cpu": the torch backend on the CPU (for tests and debugging).
    precision: "float32" (default) or "tf32" (TF32 GEMMs on a CUDA device: faster, errors up to
    about 1e-3 of sum_c |w_c| |g_c(t)| |g_c(i)|). Whitened rows (Whitening.apply): TF32's input rounding
    (2^-11) is amplified by the whitening's condition number, by analysis up to about
    (4 + sqrt(d) / 2) x cond x 2^-11 of the largest score, which fit's warning (for float32) does not
    cover: see Whitening.
    normalize: cosine scores instead: each row's gradient is unit-normalised per checkpoint (over all
    its layers: for mode="factored" exports the norm of checkpoint c is sqrt(sum_l |L_l|^2 |R_l|^2)),
    then weighted and summed: sum_c w_c <g_c(t), g_c(i)> / (|g_c(t)| |g_c(i)|); a zero gradient scores
    0. The kernel sums the norms in float64 from the rows it scores (a store's train rows piece by
    piece as they stream; nothing is kept between calls) and makes no normalised copy of the data.
    Rows of any norm are scored: every device brings train rows of a norm below 2^-64 or above 2^64
    near norm 1 by powers of two first (exactly, so the cosines do not change; device "cpu" brings
    such a factored row's left factor near norm 1 and its right factor takes the rest). Other train
    rows are used as they are, so |w_c| times a train row's norm beyond float32's range (weight 1e30,
    norm 1e10) is refused as an overflow although a cosine is at most sum_c |w_c|: scale those rows
    (or every weight) down. Device "cpu"
    refuses (ValueError, overflow) factored rows of any norm whose left and right factors are out of
    balance by more than about 1e19 (left x1e20, right /1e20) where two such rows meet: the product
    of their left factors overflows float32 ("influence overflowed float32"), as it does for plain
    scores on every device; where the small factors' products underflow instead (left x1e30, right
    x1e-44), its cosine and plain scores of such rows lose accuracy beyond the bound without an error.
    The torch devices bring a row's two factors to the same norm by powers of two first for cosine
    scores, and score them.
    Refused for whitened test sets (a cosine across two spaces).
    Memory (device "cpu"; also scores and aggregate): besides the result, the kernel packs the
    weighted test rows of one pass (up to 512 rows) as float32 (up to 64 MiB), but never fewer than
    8 rows of full depth: 32 bytes per column, 512 MiB at 2^24 columns, 64 GiB at 2^31. Rows that
    wide fail with a MemoryError saying so: project them first (tracin.Projection). For k > 64,
    top_k also keeps 16-byte candidates per test row of a pass, thread and side: room for
    min(1.25 n / threads, c) of them over n train rows, c = max(k + 1, min(2k, n)) (doubling, up to c, when a
    thread gets more than its share); a pass takes fewer test rows where threads x sides x rows x c x
    16 B would pass 64 MiB, so they stay within that at capacity unless one row's are more: 15 MiB a
    thread and side at k=5e5, n=1e6. The peak is up to twice that, 128 MiB: a buffer being doubled
    holds its old and new room at once, and the pass's final selection gathers each row's candidates
    from every thread (measured beyond the result at k=1e5, n=3e5, both sides: 47 MiB on 1 thread,
    73 to 98 MiB on 2). When that is what runs out, the MemoryError names k: lower it, or pass
    fewer test rows per call.
    """
    test, train, w = _pair(test, train)
    k = positive_int(k, "k")
    _check_side(side, _SIDES)
    run = _normalize_run(normalize, test, train)
    threads = thread_count(num_threads)
    backend = _backend(device, precision, test=test, train=train)
    result: list[TopK | None] = [None, None]  # (proponents, opponents) of all test rows
    running: list[TopK | None] = [None, None]  # of the current test chunk, global train indices
    macs = test.n_rows * train.n_rows * _width(train)
    sides = 2 if side == "both" else 1
    desc, timed = f"tracin top_k ({side})", backend.name == "cpu"
    cut = _device_test_rows(backend, test, run, _TOPK_STATE_BYTES * min(k, train.n_rows) * sides)
    # A method of the backend's class (KeepsTopK), for train indices below 2^32 (its int64 keys' low half)
    keeps = hasattr(type(backend), "top_k_running") and train.n_rows < 2**32
    on_backend = cast(KeepsTopK, backend).top_k_running if keeps else None
    with _Loop(
        test, train, progress, macs, desc, threads=threads, top_k=(k, sides), timed=timed, test_rows=cut
    ) as loop:
        for p in loop.pairs():
            i0, last = p.train_rows.start, p.train_rows.stop == train.n_rows  # last: the test chunk's last piece
            cache = loop.cache
            if on_backend is not None:  # the backend keeps the chunk's best k across pieces (KeepsTopK)
                kept = on_backend(
                    p.test, p.train, w, k, side, first=i0, last=last, num_threads=threads, normalize=run, cache=cache
                )
                if last:
                    _place(result, list(kept), p.test_rows, test.n_rows, single=len(loop.test_chunks) == 1)
                continue
            width = min(k, p.train_rows.stop - i0)
            parts = backend.top_k(p.test, p.train, w, width, side, num_threads=threads, normalize=run, cache=loop.cache)
            for s, (part, name) in enumerate(zip(parts, ("proponents", "opponents"), strict=True)):
                if part is None:
                    continue
                if i0:
                    np.add(part.indices, i0, out=part.indices)  # in place: the backend's arrays are the caller's
                running[s] = (
                    part
                    if running[s] is None
                    else _select(
                        np.concatenate([running[s].values, part.values], axis=1),
                        np.concatenate([running[s].indices, part.indices], axis=1),
                        k,
                        name,
                    )
                )
            if last:
                _place(result, running, p.test_rows, test.n_rows, single=len(loop.test_chunks) == 1)
                running = [None, None]
    prop, opp = result
    if side == "proponents":
        return prop
    if side == "opponents":
        return opp
    return BothSides(prop, opp)


def _place(result: list[TopK | None], running: list[TopK | None], rows: slice, m: int, single: bool) -> None:
    """Puts a test chunk's (proponents, opponents) at `rows` of the (m, k) results: as they are
    when the chunk is every test row (no copy), else into results allocated by the first chunk."""
    for s, part in enumerate(running):
        if part is None:
            continue
        if single:
            result[s] = part
            continue
        if result[s] is None:
            result[s] = TopK(*(np.empty((m, part.values.shape[1]), a.dtype) for a in part))
        result[s].values[rows], result[s].indices[rows] = part


def _select(values: np.ndarray, indices: np.ndarray, width: int, side: str) -> TopK:
    """The best `width` columns per row of (m, w) candidates: by score, ties to the smaller index."""
    key = -values if side == "proponents" else values
    keyed = values.dtype == np.float32 and indices.dtype == np.int64 and values.size
    if keyed and not np.isnan(values).any() and indices.min() >= 0 and indices.max() < 2**32:
        # one int64 per candidate, ordered as (score, index): a stable argsort (timsort) merges the
        # already sorted runs of the pieces in about linear time: 0.055 s against lexsort's 0.21 s at m=k=1000
        order = np.argsort(_order_keys(key, indices), axis=1, kind="stable")[:, :width]
    else:  # lexsort: last key is primary; stable order by (score, global index)
        order = np.lexsort((indices, key), axis=1)[:, :width]
    return TopK(np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1))


def _order_keys(key: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """int64 (m, w) in the order of (key, index): float32 key bits (-0.0 as 0.0) mapped to a signed
    integer of the same order in the high half, the index (0 <= index < 2^32) in the low half."""
    bits = (key + np.float32(0)).view(np.int32)  # a new array: changed in place below
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)  # negative floats: all but the sign bit flipped
    ordered = bits.astype(np.int64)
    ordered <<= 32
    ordered |= indices
    return ordered


def merge_top_k(results: list[TopK], offsets: list[int], *, k: int | None = None, side: str | None = None) -> TopK:
    """Merge top-k results computed on row shards of the train side into the result on the whole.

    results: TopK per shard (indices local to the shard); offsets: the first global train row of
    each shard. side: the side the shards were scored for, "proponents" or "opponents"; a shard
    sorted the other way (values rising along a row for proponents, falling for opponents) is
    refused, naming the side to pass. None (default) merges as proponents where a shard shows its
    order; where none can (every shard one column wide, as with k=1, or its rows all tied) and the
    side would matter (a row's values differ between shards), it is a ValueError asking for side=.
    k: the k the shards were scored with; exactly equal to top_k(k=k) on the unsharded data, ties
    included (smaller global index first). k None takes it from a shard that shows it: one with more train rows than
    columns, known from a local index at or past its width. Where none shows k (every shard may be
    as wide as its rows, as any larger k also gives; always so with no test rows), or shards
    disagree, it is a ValueError asking for k. A train row present twice (the same shard given
    twice, or overlapping shards) is refused.
    """
    if side is not None:
        _check_side(side, ("proponents", "opponents"))
    for name, value in (("results", results), ("offsets", offsets)):
        if isinstance(value, (str, bytes, TopK)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{name} must be a sequence (one entry per shard), got {type(value).__name__}")
    results, offsets = list(results), list(offsets)
    if len(results) != len(offsets):
        raise ValueError(f"results has {len(results)} entries but offsets has {len(offsets)}")
    if not results:
        raise ValueError("results must hold at least one TopK")
    shown = False  # whether a shard shows the order it was sorted in
    for i, (r, o) in enumerate(zip(results, offsets, strict=True)):
        if not isinstance(r, TopK):
            raise TypeError(
                f"results[{i}] must be a TopK (values, indices), got {type(r).__name__}"
                + (
                    " (pass the .proponents of each, or their .opponents with side='opponents')"
                    if isinstance(r, BothSides)
                    else ""
                )
            )
        if np.ndim(r.values) != 2 or np.shape(r.values) != np.shape(r.indices):
            raise ValueError(
                f"results[{i}]: values and indices must be 2-D of the same shape, got "
                f"{np.shape(r.values)} and {np.shape(r.indices)}"
            )
        if isinstance(o, bool) or not isinstance(o, numbers.Integral) or o < 0:
            raise ValueError(f"offsets[{i}] must be a non-negative integer, got {o!r}")
        steps = np.diff(np.asarray(r.values, dtype=np.float64), axis=1)
        rising, falling = bool(np.any(steps > 0)), bool(np.any(steps < 0))
        shown = shown or rising or falling
        if (rising and not falling) if side in (None, "proponents") else (falling and not rising):
            other = "opponents" if side in (None, "proponents") else "proponents"
            way = "rise" if other == "opponents" else "fall"
            raise ValueError(
                f"results[{i}] is sorted as {other} results are (its values {way} along a row), but "
                f"side={side or 'proponents'!r}: merge {other} with side={other!r}"
            )
    rows = {r.values.shape[0] for r in results}
    if len(rows) != 1:
        raise ValueError(f"every result must cover the same test rows, got row counts {sorted(rows)}")
    values = np.concatenate([np.asarray(r.values, dtype=np.float32) for r in results], axis=1)
    if side is None:
        # Every shard's rows constant: the side matters only where a row's values differ between shards.
        if not shown and bool(np.any(values != values[:, :1])):
            raise ValueError(
                "the side the shards were scored for is not known: no shard shows an order (widths "
                f"{[r.values.shape[1] for r in results]}: one column, as with k=1, or values all tied along "
                "a row); pass side='proponents' or side='opponents'"
            )
        side = "proponents"
    indices = np.concatenate(
        [np.asarray(r.indices, dtype=np.int64) + int(o) for r, o in zip(results, offsets, strict=True)], axis=1
    )
    _refuse_repeated_rows(indices)
    width = _merge_width(results) if k is None else positive_int(k, "k")
    return _select(values, indices, width, side)


def _merge_width(results: list[TopK]) -> int:
    """merge_top_k's k when none is given: the width of a shard known to have more train rows than
    columns (which holds only at width k); a single shard is its own merge, its width in any case."""
    widths = [r.values.shape[1] for r in results]
    if len(results) == 1:
        return widths[0]
    shown = {w for r, w in zip(results, widths, strict=True) if np.any(np.asarray(r.indices) >= w)}
    how = "no shard has a local index at or past its width"
    if not results[0].values.shape[0]:
        how = "there are no test rows, so no shard's indices show it"
    if not shown:
        raise ValueError(
            f"the k the shards were scored with is not known: {how}, so none is known to have more train "
            f"rows than columns (widths {widths}; a shard with at most k rows has one column per row); "
            "pass it as merge_top_k(..., k=k)"
        )
    if len(shown) > 1 or max(widths) > max(shown):
        raise ValueError(
            f"results have different widths {widths}, not one k: shards with more train rows than columns "
            f"have {sorted(shown)} columns; pass the k to merge to as merge_top_k(..., k=k)"
        )
    return shown.pop()


def _refuse_repeated_rows(indices: np.ndarray) -> None:
    """ValueError if a row of (m, w) global train indices names a train row twice."""
    ordered = np.sort(indices, axis=1)
    repeated = np.argwhere(ordered[:, 1:] == ordered[:, :-1])
    if repeated.size:
        row, col = repeated[0]
        raise ValueError(
            f"results name train row {ordered[row, col]} more than once (test row {row}); "
            "give each shard once, at offsets whose row ranges do not overlap"
        )


def self_influence(
    train: Any,
    *,
    per_checkpoint: bool = False,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    whitening: Whitening | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """float32 (n,): influence of each training example on itself, sum_c w_c |g_c(i)|^2.

    train: gradient rows, as in top_k (an array, a list of arrays, Gradients, FactoredGradients or a
    GradientStore).

    >>> import numpy as np, tracin
    >>> train = np.array([[1, 0], [0, 2], [-1, 1]], np.float32)
    >>> tracin.self_influence(train).tolist()
    [1.0, 4.0, 2.0]
    >>> tracin.self_influence(tracin.Gradients([train, 2 * train], weights=[0.5, 0.25])).tolist()  # 2 checkpoints
    [1.5, 6.0, 3.0]

    High values flag mislabelled or unusual examples. Rows exported with preconditioner="adam_update"
    (Adam's next steps, for pairing with plain test rows) are refused (ValueError): rank them by the
    diagonal of scores(plain rows, adam_update rows).
    per_checkpoint: float32 (n, S) instead, one column per checkpoint slot of train (S =
    train.n_checkpoints), column s holding slot s's term w_s |g_s(i)|^2 (the columns sum to the (n,)
    result up to float32 rounding). A factored export of several layers (mode="factored", the NumPy and
    PyTorch demos' stores) holds one slot per layer, checkpoint by checkpoint: .reshape(n, -1, layers).sum(2)
    gives each checkpoint's term, as tracin.report.checkpoint_diagnostics(train).terms does (and plots).
    progress: a tqdm bar over train rows (None: if tqdm is installed and stderr is a terminal or
    Jupyter, for calls that run over about 2 s).
    device, precision: where and how to score, as in top_k.
    whitening: a tracin.Whitening fitted on the train side gives sum_c w_c g_c(i)^T (R_c + lambda_c I)^-1 g_c(i)
    instead (both sides whitened), computed by the whitening in float64 on the CPU (device None or "cpu";
    precision "float32", its default: "tf32" is a ValueError, as on the CPU without whitening).
    A set already whitened (Whitening.apply's output) is refused: pass the unwhitened one with whitening=.
    normalize: True is refused (ValueError): with unit-normalised gradients every row's self-influence
    is sum_c w_c (0 for a zero gradient), which ranks nothing; it is accepted as False for callers that
    pass the scoring functions one set of options.
    """
    normalize = flag(normalize, "normalize")
    if normalize:
        raise ValueError(NO_SELF_NORMALIZE)
    train = as_gradient_set(train, "train")
    check_self_influence_rows(train)
    if whitening is not None:
        placement.check_precision(precision)
        if not isinstance(whitening, Whitening):
            raise TypeError(f"whitening must be a tracin.Whitening or None, got {type(whitening).__name__}")
        if device is not None and not isinstance(device, str):
            placement.choose(device, precision, {})  # raises placement's TypeError, as top_k and the rest do
        if device not in (None, "cpu"):
            raise ValueError(f"whitening runs on the CPU (float64 BLAS); device must be None or 'cpu', got {device!r}")
        if precision == "tf32":
            raise ValueError(
                "precision='tf32' needs a CUDA device, but whitening= runs on the CPU in float64: "
                "leave precision at its default"
            )
        return whitening.self_influence(
            train, per_checkpoint=per_checkpoint, num_threads=num_threads, progress=progress
        )
    if "whitening" in train.metadata:
        raise ValueError(
            "train is whitened (metadata['whitening']): the self-influence of whitened rows is not the whitened "
            "self-influence g^T (R + lambda I)^-1 g; pass the unwhitened gradients and whitening=<the Whitening>"
        )
    per_checkpoint = flag(per_checkpoint, "per_checkpoint")
    threads = thread_count(num_threads)
    backend = _backend(device, precision, train=train)
    w = train.weights.tolist()
    out = np.empty((train.n_rows, len(w)) if per_checkpoint else train.n_rows, dtype=np.float32)
    macs, timed = train.n_rows * _width(train), backend.name == "cpu"
    with _Loop(None, train, progress, macs, "tracin self_influence", threads=threads, timed=timed) as loop:
        for p in loop.pairs():
            if per_checkpoint:
                for c in range(len(w)):
                    try:
                        out[p.train_rows, c] = backend.self_influence(
                            _checkpoint_of(p.train, c), [w[c]], num_threads=threads
                        )
                    except ValueError as e:
                        message = _block_shifted(str(e), train.factored, c * (2 if train.factored else 1))
                        own = _SELF_OVERFLOW.match(str(e))
                        if own is not None:  # checkpoint c's term alone is beyond float32
                            summed = ", summed over the checkpoints in float64,"
                            rest = str(e)[own.end(1) :].replace(summed, " in float64")
                            message = f"{own[1]} in checkpoint {c}{rest}"
                        if message is None:
                            raise
                        raise ValueError(message) from None
            else:
                out[p.train_rows] = backend.self_influence(p.train, w, num_threads=threads, cache=loop.cache)
    return out


def _block_shifted(message: str, factored: bool, first_block: int) -> str | None:
    """A backend's NaN/Inf message about a side cut from a set at kernel block first_block, with
    the block named as in the whole set (None for any other message)."""
    found = _NON_FINITE.match(message)
    if found is None:
        return None
    side, block, rows = found.groups()
    return non_finite_message(
        side, factored, first_block + _block_number(block, factored), [int(r) for r in rows.split(", ")]
    )


def _block_number(block: str, factored: bool) -> int:
    """The kernel block that gradients.block_name calls `block`."""
    return int(block.rsplit(" ", 1)[1]) * (2 if factored else 1) + block.startswith("right")


def _checkpoint_of(side: KernelSide, c: int) -> KernelSide:
    """Checkpoint c's blocks of a kernel side (its left and right factor when factored)."""
    per = 2 if side.factored else 1
    return KernelSide(side.factored, side.blocks[c * per : (c + 1) * per], side.dtypes[c * per : (c + 1) * per])


def aggregate(
    test: Any,
    train: Any,
    *,
    num_threads: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    precision: str = "float32",
    normalize: bool = False,
) -> np.ndarray:
    """float32 (n,): influence of each training example summed over the whole test set
    (group influence, for data selection). Summed in float64 whatever the chunking; a sum beyond
    float32's range is a ValueError, as in the other scoring functions. Full gradients are summed by
    columns: the test side's float64 column sums per checkpoint over all its rows (a store's chunks
    in turn, each column in row order), then one pass over the train rows, (m + n) x d multiply-adds
    and one read of each side; on device "cpu" the bits do not depend on either side's chunks.
    Single pair scores beyond float32 are no error here when their sum is in range (top_k and scores
    refuse them) for full gradients, which form no pair score, on every device, and for factored
    gradients on device "cpu", whose train rows with a pair score that overflows float32 are summed
    again in float64 (through per-checkpoint p x q matrices or pair by pair), so both layouts give the
    same sums there; the other rows keep their bits however the train rows are pieced (a test row
    beyond float32 once weighted sends every train row of its chunk to float64, so the test side's
    chunking can change those bits); the torch devices sum such train rows in float64 the same way.
    progress: a tqdm bar over rows, as below (None: if tqdm is installed and stderr is a terminal or
    Jupyter, for calls that run over about 2 s).
    The bar counts the test rows then the train rows for full gradients; for factored ones, on a
    device, a test set of over 1 GiB of float32 rows is scored in chunks, each passing over the train
    rows: the bar then counts train rows x chunks (its description: "..., 3 test chunks").
    device, precision, normalize: where and how to score, as in top_k (normalize: the sum of the
    cosine scores).

    test, train: gradient rows, one per example: a 2-D (n, d) float32, float16 or bfloat16 array (NumPy,
    np.memmap, torch tensor, JAX array; one checkpoint of weight 1; float64 is refused), a list of such
    arrays (one per checkpoint, the same n), a tracin.Gradients or tracin.FactoredGradients (with the
    checkpoints' weights), or a GradientStore (tracin.GradientStore.open(path)). Both sides need the same
    checkpoints and widths.

    >>> import numpy as np, tracin
    >>> train = np.array([[1, 0], [0, 2], [-1, 1]], np.float32)  # 3 examples' gradients, one checkpoint
    >>> test = np.array([[1, 1], [2, 0]], np.float32)
    >>> tracin.aggregate(test, train).tolist()  # the column sums of scores(test, train)
    [3.0, 2.0, -2.0]
    """
    test, train, w = _pair(test, train)
    run = _normalize_run(normalize, test, train)
    threads = thread_count(num_threads)
    backend = _backend(device, precision, test=test, train=train)
    total = np.zeros(train.n_rows, dtype=np.float64)  # float64 partial sums from the backend
    timed = backend.name == "cpu"
    cut = _device_test_rows(backend, test, run)
    desc = "tracin aggregate"
    if not train.factored and all(hasattr(type(backend), f) for f in ("column_sums", "aggregate_sums")):
        # Full gradients (SumsColumns): the test side's column sums once, carried across its chunks,
        # then one pass over the train rows; (m + n) * d work, and the bar counts the rows of both.
        columns = cast(SumsColumns, backend)
        macs = (test.n_rows + train.n_rows) * _width(train)
        try:
            with _Loop(None, train, progress, macs, desc, threads=threads, timed=timed, lead=test.n_rows) as loop:
                sums = _column_sums(columns, test, None, threads, run, cut, loop.advance)
                for p in loop.pairs():
                    total[p.train_rows] = columns.aggregate_sums(
                        sums, p.train, w, num_threads=threads, normalize=run, cache=loop.cache
                    )
        except MemoryError as e:
            if str(e) != _KERNEL_OOM:
                raise
            raise MemoryError(_sums_oom_message(train, threads)) from None
    else:  # factored (pairwise), or a backend without SumsColumns: each test chunk against every piece
        macs = (test.n_rows * train.n_rows if train.factored else test.n_rows + train.n_rows) * _width(train)
        split = train.factored  # full gradients: a piece more would sum the test chunk's columns again
        with _Loop(test, train, progress, macs, desc, split, threads=threads, timed=timed, test_rows=cut) as loop:
            for p in loop.pairs():
                total[p.train_rows] += backend.aggregate(
                    p.test, p.train, w, num_threads=threads, normalize=run, cache=loop.cache
                )
    _refuse_float32_overflow(total)
    return total.astype(np.float32)


def _sums_oom_message(train: GradientSet, threads: int) -> str:
    """The kernel's MemoryError in full-gradient aggregate with its cause: the float64 column sums and
    their weighted copy (8 bytes per column each), and a float32 row per kernel thread (csrc/src/api.cpp
    AggregateFromColumnSums: a thread per 256 train rows at most)."""
    width = _width(train)
    threads = min(min(threads or usable_cores(), usable_cores()), max(-(-train.n_rows // 256), 1))
    need = (16 + 4 * threads) * width
    return (
        f"{_KERNEL_OOM} (rows of {width:,} columns: aggregate holds the test side's float64 column sums, "
        f"their weighted copy and a float32 row per kernel thread ({threads}), {need / 2**20:,.0f} MiB here, "
        "besides the result); project the gradients to fewer dims first (tracin.Projection), or free memory"
    )


def _column_sums(
    backend: SumsColumns,
    test: GradientSet,
    sums: Any,
    threads: int,
    run: int,
    cut: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> Any:
    """backend.column_sums of `test`'s chunks (of at most `cut` rows) in turn, carried on from `sums`
    (None: zero), advance(rows) after each; NaN / Inf errors name rows counted from the set's start."""
    for t0, t1 in _chunks(test, cut):
        try:
            sums = backend.column_sums(
                KernelSide._make(test.kernel_side(t0, t1)), sums, num_threads=threads, normalize=run
            )
        except ValueError as e:
            message = rows_shifted(str(e), t0, 0)
            if message is None:
                raise
            raise ValueError(message) from None
        if advance is not None:
            advance(t1 - t0)
    return sums


def _refuse_float32_overflow(total: np.ndarray) -> None:
    """ValueError naming the first rows of float64 (n,) sums that round to inf in float32 (or are NaN:
    float64 terms that overflowed to +inf and -inf)."""
    if np.abs(total).max(initial=0.0) <= _FLOAT32_MAX:  # False for a NaN
        return
    with np.errstate(over="ignore"):
        overflowed = np.flatnonzero(~np.isfinite(total.astype(np.float32)))
    if overflowed.size:
        raise ValueError(
            f"aggregate influence overflowed float32 for train rows {overflowed[:5].tolist()} "
            "although every input is finite; rescale the gradients (or the learning-rate weights)"
        )
