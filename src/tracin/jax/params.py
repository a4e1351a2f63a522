"""Parameter pytrees: stable leaf order, '/'-joined paths, and selection by path patterns.

Order: the leaves in `jax.tree_util` flatten order (dict keys sorted, dataclass / module fields in
declaration order, sequences by index). A leaf's path joins its keys with '/', e.g.
"params/Dense_1/kernel" (Flax linen), "l2/kernel/value" (NNX state), "layers/1/weight" (Equinox).
Each leaf is flattened row-major (C order); a gradient row is the concatenation of the selected
leaves in this order.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import reprlib
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._export.layers import as_patterns as shared_patterns
from .._export.layers import matches as shared_matches


def _key_name(key: Any) -> str:
    tu = jax.tree_util
    if isinstance(key, tu.DictKey):
        return str(key.key)
    if isinstance(key, tu.GetAttrKey):
        return key.name
    if isinstance(key, tu.SequenceKey):
        return str(key.idx)
    if isinstance(key, tu.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def leaf_path(path: tuple) -> str:
    """'/'-joined key names of a pytree key path: dict keys, attribute names, sequence indices."""
    return "/".join(_key_name(k) for k in path)


def _is_float_scalar(leaf: Any) -> bool:
    """A Python float or a real floating NumPy scalar (np.float32(2.0)): differentiated by jax.grad as a 0-d array."""
    return isinstance(leaf, float) or (isinstance(leaf, np.generic) and jnp.issubdtype(leaf.dtype, jnp.floating))


def scalars_are_parameters(params: Any) -> bool:
    """Whether floating scalar leaves of `params` are parameters: yes for plain pytrees (dicts, lists, Flax), as
    jax.grad differentiates them; no when it is or holds an Equinox module, whose float fields (Dropout.p)
    are settings that eqx.filter_grad leaves alone (eqx.is_array is False for them): static there."""
    eqx = sys.modules.get("equinox")  # imported wherever params hold a module
    if eqx is None:
        return True
    nodes = jax.tree_util.tree_leaves(params, is_leaf=lambda node: isinstance(node, eqx.Module))
    return not any(isinstance(node, eqx.Module) for node in nodes)


def is_array_leaf(leaf: Any, scalars: bool = True) -> bool:
    """True for JAX / NumPy arrays and (if `scalars`: scalars_are_parameters) floating scalars, passed to
    the compiled functions as arguments; other leaves (functions, ints, strings...) are static."""
    return isinstance(leaf, (jax.Array, np.ndarray)) or (scalars and _is_float_scalar(leaf))


def is_float_leaf(leaf: Any, scalars: bool = True) -> bool:
    """True for the leaves differentiated: arrays of a real floating dtype (bfloat16, float16 and the float8
    types of ml_dtypes included: jnp.issubdtype, np.issubdtype misses them) and, if `scalars`, floating
    scalars. Complex leaves (a rotary embedding's table) are constants: a real row has no place for their
    imaginary part."""
    return (scalars and _is_float_scalar(leaf)) or (
        isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def _constant_kind(leaf: Any) -> str | None:
    """The kind of a leaf never differentiated, "complex", "integer" or "boolean" (an array, a NumPy or Python
    scalar), else None: a `layers` pattern naming only such leaves is told why it selects nothing."""
    dtype = getattr(leaf, "dtype", None)
    try:
        dtype = np.dtype(type(leaf)) if dtype is None and isinstance(leaf, (bool, int, complex)) else dtype
    except TypeError:
        return None
    if dtype is None:
        return None
    for kind, base in (("complex", jnp.complexfloating), ("boolean", jnp.bool_), ("integer", jnp.integer)):
        if jnp.issubdtype(dtype, base):
            return kind
    return None


def host_array(leaf: Any) -> np.ndarray:
    """An array leaf on the host as NumPy; a typed PRNG key array (jax.random.key) as its key_data."""
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def matches(path: str, pattern: str) -> bool:
    """A pattern selects a leaf by its path, a '/'-prefix of it ("l2" -> "l2/kernel"), or a glob
    (fnmatch, where '*' also crosses '/': "params/Dense_1/*")."""
    return shared_matches(path, pattern, "/")


@dataclass(frozen=True)
class ParamLayout:
    """How a params pytree is split for differentiation.

    treedef: the pytree structure; paths: every leaf's path; selected: indices of the
    differentiated leaves (in flatten order); arrays: indices of the other array leaves (passed to
    the compiled function as arguments); static: leaves that are not arrays (functions, ints...),
    baked into the compiled function. Floating scalars count as 0-d arrays (is_array_leaf), except in
    Equinox modules. kinds: per leaf its _kind (what it is, for the checkpoint comparison).
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    selected: tuple[int, ...]
    arrays: tuple[int, ...]
    static: tuple[tuple[int, Any], ...]
    kinds: tuple[tuple[str, str], ...]
    _hash: int | None = field(init=False, repr=False, compare=False)  # set by __post_init__

    def __eq__(self, other: object) -> bool:
        """Equal layouts: as the dataclass's own comparison, but static data (an Equinox static field, a
        non-array leaf) compare by _same_value: arrays by kind, dtype, shape and value, where the treedefs' own
        == raises or ignores the dtype of a one-element array (the layout is a compiled function's cache key,
        shared_jit), and NaN equal to NaN. __hash__ stays consistent: a treedef's hash leaves out its static
        data, and a NaN leaf hashes as every NaN does."""
        if not isinstance(other, ParamLayout):
            return NotImplemented
        return (
            (self.paths, self.shapes, self.selected, self.arrays, self.kinds)
            == (other.paths, other.shapes, other.selected, other.arrays, other.kinds)
            and _same_treedef(self.treedef, other.treedef)
            and len(self.static) == len(other.static)
            and all(i == j and _same_value(a, b) for (i, a), (j, b) in zip(self.static, other.static, strict=True))
        )

    def __post_init__(self) -> None:
        """Computes the hash once (a cache key may be hashed again at interpreter exit, when NumPy is gone):
        the fields' hash, with a NaN static leaf hashed alike for every NaN object (Python hashes a NaN by its
        id), as __eq__ takes two NaNs as equal; None for an unhashable static leaf."""
        static = tuple((i, _NAN if _is_nan_scalar(leaf) else leaf) for i, leaf in self.static)
        try:
            value = hash((self.treedef, self.paths, self.shapes, self.selected, self.arrays, static, self.kinds))
        except TypeError:
            value = None
        object.__setattr__(self, "_hash", value)

    def __getstate__(self) -> dict:
        """Pickled without the hash (a type's hash differs between processes); __setstate__ computes it anew."""
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __hash__(self) -> int:
        """The hash computed by __post_init__; TypeError for an unhashable static leaf (shared_jit then
        compiles for one export)."""
        if self._hash is None:
            raise TypeError("unhashable type: a static leaf of this ParamLayout cannot be hashed")
        return self._hash

    @property
    def widths(self) -> list[int]:
        """Per selected leaf its number of entries (the segment widths of a gradient row)."""
        return [int(np.prod(self.shapes[i], dtype=np.int64)) for i in self.selected]

    @property
    def dim(self) -> int:
        return sum(self.widths)

    def describe(self) -> list[tuple[str, tuple[int, ...]]]:
        """(path, shape) of each selected leaf, in row order (metadata["params"])."""
        return [(self.paths[i], self.shapes[i]) for i in self.selected]

    def split(self, params: Any) -> tuple[list, list]:
        """(selected leaves, other array leaves) of a params pytree with this layout; floating scalars as
        0-d JAX arrays (a Python float as jax.grad sees it: float32 unless x64 is enabled)."""
        try:
            flat = self.treedef.flatten_up_to(params)
        except ValueError:  # JAX's == of static data raised (an array in an Equinox static field)?
            flat, treedef = jax.tree_util.tree_flatten(params)
            if not _same_treedef(self.treedef, treedef):
                raise
        leaves = [jnp.asarray(leaf) if _is_float_scalar(leaf) else leaf for leaf in flat]
        return [leaves[i] for i in self.selected], [leaves[i] for i in self.arrays]

    def merge(self, selected: Sequence, arrays: Sequence) -> Any:
        """The params pytree rebuilt from the two leaf lists (inverse of split)."""
        leaves: list[Any] = [None] * len(self.paths)
        for i, leaf in zip(self.selected, selected, strict=True):
            leaves[i] = leaf
        for i, leaf in zip(self.arrays, arrays, strict=True):
            leaves[i] = leaf
        for i, leaf in self.static:
            leaves[i] = leaf
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def check_same(self, other: ParamLayout, where: str) -> None:
        """Raises ValueError unless `other` (another checkpoint's layout) has the same structure. With the same
        leaf paths, the leaves' kinds and shapes are compared before the containers: an Equinox module keeps
        its sizes (in_features, width_size) as static data, so a wider layer is named by its shape."""
        if other.paths != self.paths:
            missing = sorted(set(self.paths) ^ set(other.paths))[:5]
            if not missing and not _same_treedef(self.treedef, other.treedef):  # the containers differ: named below
                found = _first_difference(self.treedef, other.treedef, self.paths)
                raise ValueError(
                    f"{where}: the params pytree has the first checkpoint's leaf paths in another order, in other "
                    f"containers: {found[0] if found else other.treedef}; "
                    "give every checkpoint the same container types (a list saved by Flax msgpack is restored as "
                    "a dict with keys '0', '1', ..., whose leaves flatten in string order: '10' before '2'; "
                    "restore it with flax.serialization.from_bytes(target, ...) or pass every checkpoint as a path)"
                )
            raise ValueError(
                f"{where}: the params pytree differs from the first checkpoint's "
                f"(differing leaves: {missing or 'the same paths in another order'})"
            )
        for i, (mine, theirs) in enumerate(zip(self.kinds, other.kinds, strict=True)):
            if mine[0] != theirs[0]:
                raise ValueError(
                    f"{where}: leaf {self.paths[i]!r} is {theirs[0]} ({theirs[1]}), the first checkpoint's is "
                    f"{mine[0]} ({mine[1]}); every checkpoint must have the same kind of leaf at each path"
                )
        for i in self.selected:
            if other.shapes[i] != self.shapes[i]:
                raise ValueError(
                    f"{where}: parameter {self.paths[i]!r} has shape {other.shapes[i]}, "
                    f"the first checkpoint has {self.shapes[i]}"
                )
        if not _same_treedef(self.treedef, other.treedef):
            found = _first_difference(self.treedef, other.treedef, self.paths)
            if found is not None and found[1] == "static":  # same container types, other static values
                raise ValueError(
                    f"{where}: the params pytree has the first checkpoint's leaf paths and shapes, but {found[0]}; "
                    "every checkpoint must hold the same settings in its static fields"
                )
            if found is not None and found[1] == "keys":  # e.g. {"a": w, "b": None} vs {"a": w, "c": None}
                raise ValueError(
                    f"{where}: the params pytree has the first checkpoint's leaf paths and shapes, but {found[0]}; "
                    "every checkpoint must have the same keys"
                )
            raise ValueError(
                f"{where}: the params pytree has the first checkpoint's leaf paths but other containers: "
                f"{found[0] if found else other.treedef}; give every checkpoint the same "
                "container types (flax.core.unfreeze a FrozenDict, or freeze them all; lists vs tuples)"
            )
        for (i, a), (_, b) in zip(self.static, other.static, strict=True):
            if not _same_value(a, b):
                advice = (
                    "; a non-array leaf (a Python number, a string) is static in the compiled loss, the same at "
                    "every checkpoint: leave it out of the params you pass (a step counter beside the weights: pass "
                    "the weights alone, such as {'params': ..., 'batch_stats': ...}), or make it an array "
                    "(jnp.asarray) where loss_fn reads it"
                    if all(isinstance(v, (numbers.Number, str, bytes)) for v in (a, b))
                    else ""
                )
                raise ValueError(
                    f"{where}: non-array leaf {self.paths[i]!r} differs from the first checkpoint's: {_both(a, b)}"
                    + advice
                )


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _first_difference(first: Any, other: Any, paths: Sequence[str], offset: int = 0) -> tuple[str, str] | None:
    """Where two treedefs with the same leaf paths first differ (depth first), named by the first leaf
    under that node (an empty node: by the leaf after it), and how: "containers" (the text names both
    types), "keys" (a mapping's keys: those of one checkpoint alone) or "static" (the same types, other
    static values, e.g. an Equinox module's fields)."""
    a, b = first.node_data(), other.node_data()
    if a is None and b is None:
        return None
    if first.num_leaves:
        where = f"the node holding {paths[offset]!r}"
    else:  # {} / [] / None / (): named by the next leaf, as it holds none
        where = (
            f"an empty node before {paths[offset]!r}" if offset < len(paths) else "an empty node after the last leaf"
        )
    if a is None or b is None or a[0] is not b[0]:
        ta, tb = (_type_name(d[0]) if d is not None else "leaf" for d in (a, b))
        return f"{where} is a {tb} here and a {ta} in the first checkpoint", "containers"
    keys = _mapping_keys(first), _mapping_keys(other)
    if keys[0] is not None and keys[1] is not None and not _same_value(keys[0], keys[1]):
        return f"{where} (a {_type_name(a[0])}) has {_key_difference(first, other, *keys)}", "keys"
    if not _same_value(a[1], b[1]) or len(first.children()) != len(other.children()):
        return f"{where} (a {_type_name(a[0])}) has {_static_difference(a[0], a[1], b[1])}", "static"
    for x, y in zip(first.children(), other.children(), strict=True):
        found = _first_difference(x, y, paths, offset)
        if found:
            return found
        offset += x.num_leaves
    return None


def _mapping_keys(node: Any) -> list | None:
    """The keys of a mapping node (dict, OrderedDict, defaultdict, FrozenDict), one per child, else None."""
    node_type, data = node.node_data()
    if not issubclass(node_type, Mapping):
        return None
    if issubclass(node_type, defaultdict) and isinstance(data, tuple) and len(data) == 2:
        data = data[1]  # (default_factory, keys)
    if not isinstance(data, (list, tuple)) or len(data) != len(node.children()):
        return None
    return list(data)


def _key_difference(first: Any, other: Any, first_keys: list, other_keys: list) -> str:
    """The keys of one checkpoint alone ("other keys: 'c' here, 'b' in the first checkpoint"), and whether
    they hold no parameters (None, {}: the leaf paths are the same); or the same keys in another order."""
    here = [k for k in other_keys if k not in first_keys]
    there = [k for k in first_keys if k not in other_keys]
    if not here and not there:
        return f"its keys in another order: {other_keys!r} here, {first_keys!r} in the first checkpoint"

    def listed(keys: list) -> str:
        return ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")

    if here and there:
        text = f"other keys: {listed(here)} here, {listed(there)} in the first checkpoint"
    elif here:
        text = f"{'a key' if len(here) == 1 else 'keys'} the first checkpoint lacks: {listed(here)}"
    else:
        text = f"no {'key' if len(there) == 1 else 'keys'} {listed(there)}, as the first checkpoint has"
    sizes = [
        node.children()[keys.index(k)].num_leaves
        for node, keys, ks in ((other, other_keys, here), (first, first_keys, there))
        for k in ks
    ]
    if not any(sizes):
        text += f" ({'its value holds' if len(sizes) == 1 else 'their values hold'} no parameters: None or empty)"
    return text


class _Short(reprlib.Repr):
    """reprlib with strings cut to ~40 characters and other objects' reprs to 80 cut at the end (reprlib
    cuts out the middle: "Lambda(fn=<PjitFun...t 0x7f...>>)" loses the function's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring, self.maxother = 40, 80

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            text = repr(x)
        except Exception:  # noqa: BLE001 - a broken __repr__: named by its type, as reprlib does
            return f"<{type(x).__name__} instance at {id(x):#x}>"
        return text if len(text) <= self.maxother else text[: self.maxother - 3] + "..."


_SHORT = _Short()


def _show(value: Any) -> str:
    """A short text of a static value: a function or class by its module and qualified name (a cut repr
    loses the name: "<PjitFunction of <...at 0x7f13...>>"), an array by its dtype, shape and first values,
    else a repr cut to ~40 characters."""
    if isinstance(value, (jax.Array, np.ndarray)):
        try:
            host = host_array(value)
            values = (
                repr(host.tolist())
                if host.size <= 6
                else " ".join(np.array2string(host, threshold=6, edgeitems=2, separator=", ").split())
            )
        except Exception:  # noqa: BLE001 - a value that cannot be shown is named by its dtype and shape
            return f"a {value.dtype} array of shape {tuple(value.shape)}"
        return f"a {value.dtype} array of shape {tuple(value.shape)} {_SHORT.repr(values)[1:-1]}"
    if isinstance(value, functools.partial):
        return f"functools.partial({_show(value.func)}, ...)"
    if isinstance(value, type):
        return _type_name(value)
    try:
        name = getattr(value, "__qualname__", None) if callable(value) else None
        module = getattr(value, "__module__", None)
    except Exception:  # noqa: BLE001 - an object whose attributes raise is shown by its repr
        name = module = None
    if isinstance(name, str):
        return f"{module}.{name}" if isinstance(module, str) and module != "builtins" else name
    return _SHORT.repr(value)


def _both(first: Any, other: Any) -> str:
    """ "X here, Y in the first checkpoint" for two values that differ (not _same_value), with the first
    index where arrays of one shape differ, and a note when the two texts are the same (two
    lambdas, two functions of one name, or equal arrays of which one is NumPy and the other JAX)."""
    shown, first_shown = _show(other), _show(first)
    text = f"{shown} here, {first_shown} in the first checkpoint"
    kinds = [("a NumPy" if isinstance(v, np.ndarray) else "a JAX") + " array" for v in (other, first) if _is_array(v)]
    other_kinds = len(kinds) == 2 and kinds[0] != kinds[1]  # told with differing values too, not after their fix
    kind = (
        f"{kinds[0]} here, {kinds[1]} in the first checkpoint: give every checkpoint the same kind"
        if other_kinds
        else ""
    )
    at = _first_unequal(first, other)
    if at is not None:
        a, b = (_SHORT.repr(_element(v, at)) for v in (first, other))
        also = f"; {kind}" if other_kinds else ""
        return f"{text} (first differing at index {at}: {b} here, {a} in the first checkpoint{also})"
    if other_kinds:  # equal values of one text: the kind differs (_same_value)
        return f"{text} ({kind})"
    if shown == first_shown:
        what = "functions" if callable(first) and callable(other) else "values"
        text += f" (other {what} of the same name or text; pass the same object to every checkpoint)"
    return text


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _element(array: Any, at: tuple[int, ...]) -> Any:
    """array[at] as a Python value (an object array's element as it is: a dict or str has no .tolist())."""
    value = host_array(array)[at]
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def _first_unequal(first: Any, other: Any) -> tuple[int, ...] | None:
    """The first index where two arrays of one shape differ (NaN equal to NaN), else None; numeric (or bool) arrays
    of two dtypes (a NumPy float64 and a JAX float32 one, with x64 off) compared as their common type
    (np.result_type), so that a value the narrower one cannot hold exactly differs there too: ml_dtypes' bfloat16,
    float8 and int4 (NumPy kind 'V') widened first to float32 or int64, which hold them exactly, and 64-bit integers
    against a common float type (int64 and uint64 meet as float64) compared as Python numbers, exactly."""
    if not all(isinstance(v, (jax.Array, np.ndarray)) for v in (first, other)):
        return None
    try:
        a, b = host_array(first), host_array(other)
        if a.shape != b.shape:
            return None
        if a.dtype != b.dtype:
            a, b = _numeric(a), _numeric(b)
            if not all(v.dtype.kind in "biufc" for v in (a, b)):  # strings, objects: not cast to each other
                return None
            common = np.result_type(a.dtype, b.dtype)
            if common.kind in "fc" and any(v.dtype.kind in "iu" and v.dtype.itemsize == 8 for v in (a, b)):
                exact = np.asarray(a.astype(object) != b.astype(object), dtype=bool)  # float64 rounds 2**53 + 1
                a, b = a.astype(common, copy=False), b.astype(common, copy=False)
                return _first_true(exact & ~(np.isnan(a) & np.isnan(b)), a.shape)
            a, b = a.astype(common, copy=False), b.astype(common, copy=False)
        unequal = np.asarray(a != b)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            unequal &= ~(np.isnan(a) & np.isnan(b))
        return _first_true(unequal, a.shape)
    except Exception:  # noqa: BLE001 - arrays that cannot be compared elementwise: their texts alone
        return None


def _first_true(unequal: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    found = np.flatnonzero(unequal)
    return tuple(int(i) for i in np.unravel_index(int(found[0]), shape)) if found.size else None


def _numeric(x: np.ndarray) -> np.ndarray:
    """ml_dtypes' numeric types (bfloat16, float8_*, int4: NumPy kind 'V', which np.result_type may not combine
    with others) as float32 or int64, which hold each of their values exactly; other arrays as they are."""
    if x.dtype.kind != "V" or not jnp.issubdtype(x.dtype, jnp.number):
        return x
    return x.astype(np.float32 if jnp.issubdtype(x.dtype, jnp.floating) else np.int64)


def _static_difference(node_type: type, first: Any, other: Any) -> str:
    """The static values of a node that differ, e.g. "tag='b' here, 'a' in the first checkpoint", named by
    the node's static dataclass fields (eqx.field(static=True)) where its static data lines up with them."""
    if not (isinstance(first, tuple) and isinstance(other, tuple) and len(first) == len(other)):
        return f"other static data: {_both(first, other)}"
    names: list[str | None] = [None] * len(first)
    if dataclasses.is_dataclass(node_type):
        static = [f.name for f in dataclasses.fields(node_type) if f.metadata.get("static", False)]
        if len(static) in (len(first), len(first) - 1):  # Equinox puts its wrapper fields first
            names = [None] * (len(first) - len(static)) + static
    differing = [
        f"{name or f'static item {k}'}={_both(x, y)}"
        for k, (name, x, y) in enumerate(zip(names, first, other, strict=True))
        if not _same_value(x, y)
    ]
    if not differing:
        return "other static data than in the first checkpoint"
    return "other static data: " + "; ".join(differing[:4]) + ("; ..." if len(differing) > 4 else "")


def _kind(leaf: Any, scalars: bool) -> tuple[str, str]:
    """(category, description) of a leaf: a floating array or scalar (differentiable), another array, or a
    static value; e.g. ("a floating array or scalar", "float32 array"), ("a static (non-array) value", "int")."""
    if isinstance(leaf, (jax.Array, np.ndarray)):
        what = f"{leaf.dtype} array"
    elif isinstance(leaf, np.generic):
        what = f"NumPy {leaf.dtype} scalar"
    else:
        what = type(leaf).__name__
    if is_float_leaf(leaf, scalars):
        return "a floating array or scalar", what
    if is_array_leaf(leaf, scalars):
        return "a non-floating array", what
    return "a static (non-array) value", what


_NAN = ("tracin: a NaN scalar",)  # what ParamLayout.__hash__ hashes for a NaN static leaf


def _is_nan_scalar(value: Any) -> bool:
    """A Python or NumPy floating scalar holding NaN."""
    try:
        return isinstance(value, (float, np.floating)) and bool(value != value)
    except Exception:  # noqa: BLE001 - at interpreter exit (a cache key hashed in teardown): not NaN here
        return False


def _equal(a: Any, b: Any) -> bool:
    """a == b as a plain bool, with two floating scalars of one type holding NaN equal (as NaN entries of
    static arrays are)."""
    if type(a) is type(b) and _is_nan_scalar(a) and _is_nan_scalar(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool are not equal here
        return False


def _same_value(a: Any, b: Any) -> bool:
    """a == b for static data, with arrays (in an Equinox static field: NumPy's == is elementwise, and JAX's
    treedef == raises on it) equal when of one kind (NumPy or JAX), dtype and shape, with equal values (NaN
    equal to NaN), inside tuples, lists and dicts too; NumPy numeric scalars as 0-d arrays (np.uint8(200) is
    not np.float32(200): their sums differ), Python floats NaN equal to NaN; other objects whose == raises
    are unequal."""
    if a is b:
        return True
    arrays = [isinstance(v, (jax.Array, np.ndarray)) for v in (a, b)]
    if any(arrays):
        if not all(arrays) or isinstance(a, np.ndarray) != isinstance(b, np.ndarray):
            return False
        try:
            x, y = host_array(a), host_array(b)
            nan = jnp.issubdtype(x.dtype, jnp.inexact)
            return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y, equal_nan=nan))
        except Exception:  # noqa: BLE001 - arrays that cannot be compared are not equal here
            return False
    if isinstance(a, (np.number, np.bool_)) or isinstance(b, (np.number, np.bool_)):  # as 0-d arrays
        return type(a) is type(b) and _same_value(np.asarray(a), np.asarray(b))
    if type(a) is type(b) and isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is type(b) and isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return _equal(a, b)


def _same_tree(first: Any, other: Any) -> bool:
    """first == other for two treedefs (node types, static data and children alike), with their static data
    compared by _same_value; iterative, so a deep tree does not reach Python's recursion limit."""
    pending = [(first, other)]
    while pending:
        f, o = pending.pop()
        a, b = f.node_data(), o.node_data()
        if a is None or b is None:
            if a is not b:
                return False
            continue
        x, y = f.children(), o.children()
        if a[0] is not b[0] or len(x) != len(y) or not _same_value(a[1], b[1]):
            return False
        pending.extend(zip(x, y, strict=True))
    return True


def _same_treedef(first: Any, other: Any) -> bool:
    """The same treedef object, or the same structure with equal static data (_same_tree). JAX's == is not
    used: it raises on an array of several values in an Equinox static field ("Exception raised while
    checking equality of metadata fields"), calls one holding NaN unequal to itself, and takes one-element
    and 0-d arrays of other dtypes as equal (NumPy's == reduced by bool(): uint8 [200] == float32 [200.]),
    which reused one checkpoint's compiled function for another."""
    if first is other:
        return True
    try:
        return _same_tree(first, other)
    except Exception:  # noqa: BLE001 - unequal (at interpreter exit, say: a cache key compared in teardown)
        return False


def layout_of(params: Any, layers: Sequence[str] | None) -> ParamLayout:
    """The ParamLayout of `params` with the floating leaves matched by `layers` selected
    (all floating leaves, floating scalars included unless in an Equinox module, when layers is None)."""
    scalars = scalars_are_parameters(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("params has no leaves: expected a pytree of arrays")
    paths = tuple(leaf_path(p) for p, _ in flat)
    leaves = [leaf for _, leaf in flat]
    shapes = tuple(tuple(np.shape(leaf)) if is_array_leaf(leaf, scalars) else () for leaf in leaves)
    floats = [i for i, leaf in enumerate(leaves) if is_float_leaf(leaf, scalars)]
    if not floats:
        raise ValueError("params has no floating-point array leaves to differentiate")
    if layers is None:
        selected = floats
    else:
        patterns = as_patterns(layers)
        selected = [i for i in floats if any(matches(paths[i], p) for p in patterns)]
        for p in patterns:
            if not any(matches(paths[i], p) for i in floats):
                shown = ", ".join(repr(paths[i]) for i in floats[:8])
                constants: dict[str, list[str]] = {}  # complex / integer / boolean leaves the pattern matches
                for i, leaf in enumerate(leaves):
                    kind = _constant_kind(leaf)
                    if kind is not None and matches(paths[i], p):
                        constants.setdefault(kind, []).append(repr(paths[i]))
                why = "; ".join(
                    f"{', '.join(named[:4])}{', ...' if len(named) > 4 else ''}: {kind} leaves are constants, "
                    "not differentiated"
                    for kind, named in constants.items()
                )
                raise ValueError(
                    f"layers: pattern {p!r} matches no floating-point parameter{f' ({why})' if why else ''}; "
                    f"parameter paths are {shown}{', ...' if len(floats) > 8 else ''}"
                )
    chosen = set(selected)
    arrays = [i for i, leaf in enumerate(leaves) if i not in chosen and is_array_leaf(leaf, scalars)]
    static = [(i, leaf) for i, leaf in enumerate(leaves) if not is_array_leaf(leaf, scalars)]
    kinds = tuple(_kind(leaf, scalars) for leaf in leaves)
    return ParamLayout(treedef, paths, shapes, tuple(selected), tuple(arrays), tuple(static), kinds)


# Flax linen's collections that no gradient step trains: BatchNorm's running statistics, a decoder's cache,
# sow()'s intermediates, perturb()'s zeros, partitioning metadata
LINEN_STATE = ("batch_stats", "cache", "intermediates", "perturbations", "params_axes")


def linen_collections(params: Any) -> list[str]:
    """The collections besides "params" of Flax linen variables ({"params": ..., "batch_stats": ...}: a
    dict or FrozenDict whose "params" entry is a Mapping with floating leaves, and whose other entries are
    Mappings too, as collections are), sorted; [] for other pytrees (an NNX State, a Mapping too, is keyed
    by module attributes; a dict holding a top-level array is not variables). No gradient step trains
    them (BatchNorm's running mean and var, a cache), so an export takes the "params" collection alone by
    default (layers=None); see LINEN_STATE for the names it leaves out without a warning."""
    variables = isinstance(params, dict) or type(params).__name__ == "FrozenDict"
    if not variables or not isinstance(params.get("params"), Mapping):
        return []
    if not all(isinstance(value, Mapping) for value in params.values()):
        return []
    scalars = scalars_are_parameters(params)
    if not any(is_float_leaf(leaf, scalars) for leaf in jax.tree_util.tree_leaves(params["params"])):
        return []
    return sorted((str(key) for key in params if key != "params"), key=str)


def nnx_variables(params: Any) -> tuple[list[str], dict[str, list[str]]] | None:
    """For a Flax NNX State (nnx.split(model)) or Module (a pytree flattening to the same Variables and paths):
    (the paths of the floating leaves of its nnx.Param variables, subclasses included, {Variable type name: paths
    of its floating leaves} for the other Variable types: BatchNorm's BatchStat, a Cache, Intermediates); None
    for other pytrees and for a State or Module holding no floating Param leaf. Leaves outside any Variable
    count as Params. flax is not imported: a State exists only where it is."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(params, tuple(vars(nnx).get(k, ()) for k in ("State", "Module"))):
        return None
    # older flax's State holds VariableStates; newer ones hold Variables (VariableState: a deprecated alias, from
    # a module __getattr__, so read from vars() without its warning)
    kinds = tuple(k for k in (vars(nnx).get("Variable"), vars(nnx).get("VariableState")) if isinstance(k, type))
    scalars = scalars_are_parameters(params)
    chosen: list[str] = []
    others: dict[str, list[str]] = {}
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda n: isinstance(n, kinds))[0]:
        kind = getattr(node, "type", type(node)) if isinstance(node, kinds) else None
        trained = not isinstance(kind, type) or issubclass(kind, nnx.Param)
        for inner, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
            if is_float_leaf(leaf, scalars):
                name = leaf_path(path + inner)
                chosen.append(name) if trained else others.setdefault(kind.__name__, []).append(name)
    return (chosen, others) if chosen else None


def train_state_entries(params: Any) -> list[str]:
    """The top-level entries besides "params" that hold floating leaves, of a Flax TrainState: restored as
    a dict ({"step": ..., "params": ..., "opt_state": ...}, as flax.serialization or orbax give it back
    from a saved TrainState) or the TrainState itself (a dataclass with those fields, subclasses' extra
    fields such as batch_stats included): one with a "params" Mapping of floating leaves and an
    "opt_state" entry, sorted; [] for other pytrees, and for a TrainState whose other entries hold no
    floating leaf (an int step, an SGD state). Its optimizer moments are no parameters (their gradients
    are zero), so an export takes "params" alone by default (layers=None)."""
    if isinstance(params, dict) or type(params).__name__ == "FrozenDict":
        entries = dict(params)
    elif dataclasses.is_dataclass(params) and not isinstance(params, type):
        fields = dataclasses.fields(params)
        entries = {f.name: getattr(params, f.name) for f in fields if f.metadata.get("pytree_node", True)}
    else:
        return []
    if not isinstance(entries.get("params"), Mapping) or "opt_state" not in entries:
        return []
    scalars = scalars_are_parameters(params)
    floating = [
        str(key)
        for key, value in entries.items()
        if any(is_float_leaf(leaf, scalars) for leaf in jax.tree_util.tree_leaves(value))
    ]
    if "params" not in floating:
        return []
    return sorted((key for key in floating if key != "params"), key=str)


# top-level entries of a saved training checkpoint ("bundle") that hold the model's parameters, in the order a hint
# names them, and those that hold the optimizer's state: a bundle has both (a dict of the model's parameters and a
# step or epoch alone may be what a loss reads, and is no sign of a checkpoint passed whole)
_BUNDLE_MODEL = ("variables", "params", "model", "model_params", "weights", "state_dict")
_BUNDLE_OPTIMIZER = ("opt_state", "optimizer_state", "optimizer", "opt")


def bundle_hint(layout: ParamLayout) -> str:
    """For a loss_fn that failed on params that are a whole training checkpoint ("bundle"): a dict (or FrozenDict)
    whose top-level keys hold the model's parameters ("variables", "params", ...: _BUNDLE_MODEL) and the
    optimizer's state ("opt_state", "optimizer", ...: _BUNDLE_OPTIMIZER), as a pickled {"variables": ...,
    "opt_state": ..., "step": ...} restores: that loss_fn gets each checkpoint as given, and which entry to pass
    instead (with the optimizer state as the third item, for a preconditioner); "" for other params, a
    {"params": ..., "step": ...} without an optimizer state among them. Given only where the loss failed: a loss
    may read such a dict itself."""
    node = layout.treedef.node_data() if layout.treedef.num_nodes > 1 else None
    if not node or not isinstance(node[0], type) or not (issubclass(node[0], dict) or node[0].__name__ == "FrozenDict"):
        return ""
    keys = {str(k) for k in node[1]} if isinstance(node[1], (list, tuple)) else set()
    model = [k for k in _BUNDLE_MODEL if k in keys]
    state = [k for k in _BUNDLE_OPTIMIZER if k in keys]
    if not model or not state:
        return ""
    entry = model[0]
    linen = (
        " (or {'params': ckpt['params']} where loss_fn calls a Flax linen model's apply)" if entry == "params" else ""
    )
    return (
        f"; params look like a whole training checkpoint (entries {', '.join(map(repr, sorted(keys)[:8]))}"
        f"{', ...' if len(keys) > 8 else ''}), while loss_fn gets each checkpoint as given: pass "
        f"ckpt[{entry!r}]{linen} as the checkpoint's params, with ckpt[{state[0]!r}] as the third item for "
        "preconditioner='adam'"
    )


def step_as_array(params: Any) -> Any:
    """A Flax TrainState (the object, or the dict a saved one restores as: a "params" Mapping and an
    "opt_state" entry) whose "step" is a Python int, as an apply_gradients outside jax.jit leaves it, with
    that step as a NumPy array, as a jitted step holds it: a non-array leaf is static and must equal the
    first checkpoint's, which no two checkpoints' steps do. Other params are returned as they are."""
    if isinstance(params, dict):
        entries = params
    elif dataclasses.is_dataclass(params) and not isinstance(params, type) and hasattr(params, "replace"):
        entries = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    else:
        return params
    step = entries.get("step")
    if type(step) is not int or not isinstance(entries.get("params"), Mapping) or "opt_state" not in entries:
        return params
    return {**params, "step": np.asarray(step)} if isinstance(params, dict) else params.replace(step=np.asarray(step))


def as_patterns(layers: Any) -> list[str]:
    """layers as a list of path patterns (a single string is one pattern)."""
    return shared_patterns(layers, "['l2'] or ['params/Dense_1/*']")
