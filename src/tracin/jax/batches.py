"""Data as fixed-size batches: shorter batches are padded to the batch size, so the row count never
compiles again (the other axes, e.g. a sequence length, are kept: each of their shapes compiles once).
Arrays of fewer rows than the batch size run as one batch of their row count. The batch shape is a
function of the data and the batch size alone, never of what the process ran before: XLA compiles a
batch of 8 rows and one of 64 rows to code whose results can differ in the last bits, so a shape
chosen by history would make the same export give other bytes (on a fresh Dask worker, say)."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import scalar_leaf_kind
from .._caller import user_stacklevel
from .._validate import positive_int

DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class Batch:
    """Rows [start, start + count) of the data, padded to the batch size by repeating the last row.

    inputs / targets: pytrees of arrays with leading dimension = the padded size; only the first
    `count` rows of a result are real, the padded rows' results are dropped.
    """

    start: int
    count: int
    inputs: Any
    targets: Any


def _leaves(tree: Any, name: str) -> list:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} holds no arrays")
    return leaves


def _as_array(a: Any) -> Any:
    return a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a)


def _rows(inputs: Any, targets: Any, where: str) -> int:
    """The common leading dimension of every array in inputs and targets (targets may hold none: None).
    ValueError naming the leaf (data inputs['temperature']) that is not an array with a leading dimension,
    or the leaves of each size when the sizes differ."""
    sizes: dict[int, list[str]] = {}
    for name, tree in (("inputs", inputs), ("targets", targets)):
        if name == "inputs":
            _leaves(tree, f"{where} {name}")
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaf_name = f"{name}{jax.tree_util.keystr(path)}"
            if np.ndim(leaf) == 0:
                raise ValueError(f"{where} {leaf_name}: {_not_rows(leaf, path, _column(tree, path, name))}")
            # per leaf of every batch: the dtype's kind first (bool, ints, floats, complex), the slower
            # issubdtype only for the rest (ml_dtypes' bfloat16 / float8 are kind 'V')
            if isinstance(leaf, np.ndarray) and leaf.dtype.kind not in "biufc" and not _numeric_dtype(leaf.dtype):
                shown = leaf.dtype.str if leaf.dtype.kind in "USV" else leaf.dtype
                numbers_only = leaf.dtype == object and all(_number(item) for item in leaf.flat)
                raise ValueError(
                    f"{where} {leaf_name}: an array of dtype {shown}"
                    f" ({leaf.dtype.name}), which JAX cannot take: every leaf of the data goes to loss_fn as a JAX "
                    "array (bool, integer, floating or complex); "
                    + (
                        "it holds numbers only (a DataFrame's .values of mixed columns, a list of arrays): convert "
                        "it, e.g. np.asarray(leaf, dtype=np.float32)"
                        if numbers_only
                        else "keep example ids and texts out of the data (row i of the result is example i, in data "
                        "order), or encode them as numbers (np.arange, token ids)"
                    )
                )
            sizes.setdefault(np.shape(leaf)[0], []).append(leaf_name)
    if len(sizes) != 1:
        which = "; ".join(
            f"{n}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" for n, names in sorted(sizes.items())
        )
        raise ValueError(
            f"{where}: inputs and targets must have the same number of rows, got sizes {sorted(sizes)} "
            f"(rows of each leaf, {which}): every leaf needs one row per example (dimension 0)"
        )
    return next(iter(sizes))


def _numeric_dtype(dtype: np.dtype) -> bool:
    """Whether JAX takes an array of `dtype`: bool, integers, floats (bfloat16 / float8 from ml_dtypes too), complex;
    not strings, bytes, objects, datetimes or structured records."""
    try:
        return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
    except TypeError:
        return False


def _number(leaf: Any) -> bool:
    return isinstance(leaf, (numbers.Number, np.generic))


def _numbers_tree(node: Any) -> bool:
    """Whether `node` is a non-empty list or tuple of numbers or of such lists or tuples."""
    return isinstance(node, (list, tuple)) and bool(node) and all(_number(item) or _numbers_tree(item) for item in node)


def _column(tree: Any, path: tuple, name: str) -> tuple[str, str | None] | None:
    """For a leaf of `tree` at `path` in a Python list of numbers (a column of values, not an argument or a
    setting: a tokenizer's lists, inputs['input_ids'][0][3], or targets [0, 1, 1]): the outermost such list's
    name and its dict key (None if it is no dict's value); None for other leaves (a float among the positional
    inputs, a dict's value)."""
    node, key = tree, None
    for depth, entry in enumerate(path):
        if isinstance(node, list) and _numbers_tree(node):
            return f"{name}{jax.tree_util.keystr(path[:depth])}", key
        if isinstance(entry, jax.tree_util.DictKey):
            node, key = node[entry.key], entry.key if isinstance(entry.key, str) else None
        elif isinstance(entry, jax.tree_util.SequenceKey):
            node, key = node[entry.idx], None
        else:
            return None
    return None


def _not_rows(leaf: Any, path: tuple, column: tuple[str, str | None] | None = None) -> str:
    """Why a leaf without a leading dimension (a scalar, a string, an object) cannot be data, and what to pass
    instead: for numbers in a Python list of numbers (`column`: a tokenizer's output without return_tensors), an
    array of the list; otherwise (a scalar or 0-d array anywhere, among the positional inputs too) rows, or
    where a setting shared by every example goes."""
    expected = "expected an array with a leading batch dimension (one row per example)"
    got = scalar_leaf_kind(leaf)
    if column is not None and _number(leaf):
        where_list, dict_key = column
        if dict_key is not None:
            return (
                f"{expected}, got {got} in the Python list of {dict_key!r}, which JAX reads as a pytree of scalars, "
                f'not an array (what a tokenizer returns without return_tensors="np"): call the tokenizer with '
                f'return_tensors="np" (and padding=True for texts of different lengths), or pass np.asarray(...) '
                "of the list"
            )
        return (
            f"{expected}, got {got} in the Python list {where_list}, which JAX reads as a pytree of scalars, not an "
            "array: pass np.asarray(...) of the list"
        )
    key = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    setting = key if isinstance(key, str) and key.isidentifier() else "setting"
    return (
        f"{expected}, got {got}; a setting shared by every example belongs with loss_fn, not in the data: "
        f"functools.partial(loss_fn, {setting}=...)"
    )


PAIR_RULE = (
    "a tuple or list of two is one (inputs, targets) dataset when every leaf of it is an array (targets may "
    "be None), unless both items are themselves pairs (tuples / lists of two): that is a list of two batches "
    "(pass inputs and targets that are both pairs as a list of one batch, [((x, k), (y, w))], or use dicts)"
)


def _plain(tree: Any) -> Any:
    """`tree` with every Mapping that JAX takes as a leaf (transformers' BatchEncoding, what a tokenizer
    or DataCollatorWithPadding returns, is a UserDict) turned into a dict, so that its arrays are leaves."""

    def mapping_leaf(node: Any) -> bool:
        return isinstance(node, Mapping) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node))

    return jax.tree_util.tree_map(
        lambda node: {k: _plain(v) for k, v in node.items()} if mapping_leaf(node) else node, tree, is_leaf=mapping_leaf
    )


def _is_pair(node: Any) -> bool:
    return isinstance(node, (tuple, list)) and len(node) == 2


def _pair_of_pairs(data: Any) -> bool:
    return _is_pair(data) and _is_pair(data[0]) and _is_pair(data[1])


def _has_leaves(data: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(data))


def _all_arrays(data: Any) -> bool:
    """Whether `data` has leaves and every one is an array."""
    leaves = jax.tree_util.tree_leaves(data)
    return bool(leaves) and all(hasattr(leaf, "shape") for leaf in leaves)


def _is_array_pair(data: Any) -> bool:
    """(inputs, targets) arrays rather than a sequence of batches, by PAIR_RULE."""
    return _is_pair(data) and not _pair_of_pairs(data) and _all_arrays(data)


def _warn_two_dict_batches(data: Any) -> None:
    """A UserWarning for a list (not a tuple) of two dicts with the same keys, which PAIR_RULE reads as one
    (inputs, targets) dataset although it looks like two batches of a loader (tfds, Hugging Face): a loss
    reading its labels from the batch would silently drop the second one's rows."""
    if not (isinstance(data, list) and all(isinstance(item, Mapping) for item in data)):
        return
    if set(data[0]) != set(data[1]):
        return
    keys = ", ".join(repr(key) for key in list(data[0])[:4]) + (", ..." if len(data[0]) > 4 else "")
    warnings.warn(
        f"data is a list of two dicts with the same keys ({keys}): it is read as one (inputs, targets) dataset, "
        "inputs the first dict and targets the second (tracin.jax.batches.PAIR_RULE). If they are two batches, "
        "pass [(batch, None) for batch in batches], loss_fn reading the labels from its batch; if they are "
        "inputs and targets, pass them as a tuple, (inputs, targets), to say so without this warning",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _two_batches_note(data: Any) -> str:
    """For data that PAIR_RULE reads as two batches although it could be one dataset (both items pairs of
    arrays, every leaf of both with the same number of rows): how it was read and the workaround, added to a
    loss_fn error ("" otherwise: two batches of different sizes cannot be one dataset)."""
    if not (_pair_of_pairs(data) and _all_arrays(data)):
        return ""
    if len({np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(data)}) != 1:
        return ""
    return (
        "; data was read as two batches, (inputs, targets) = data[0] then data[1], as both its items are pairs: "
        "if it is one dataset whose inputs and targets are both pairs, pass it as a list of one batch, "
        "[((x, k), (y, w))]"
    )


def _slice(tree: Any, start: int, stop: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def _pad(tree: Any, size: int) -> Any:
    def pad(a: Any) -> Any:
        extra = size - a.shape[0]
        if extra == 0:
            return a
        xp = jnp if isinstance(a, jax.Array) else np
        return xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, tree)


class BatchPlan:
    """Iterates the data, once per checkpoint, as padded Batches of one size.

    data: (inputs, targets) arrays (leading dimension n), or an iterable of (inputs, targets)
    batches; inputs and targets may be pytrees of arrays, targets None (no arrays) for a loss that
    ignores them (passed on as None). Which of the two a tuple or list of two is: PAIR_RULE.
    batch_size: the padded size (default: 64 for arrays, the first batch's size for iterables);
    longer batches are cut into pieces. Arrays of fewer rows n than the batch size run as one batch of
    n rows (size = n: its memory and compute scale with n, not batch_size), always: whatever compiled
    function has run before (a train export at batch_size before this test export), so the same export
    gives the same bytes in any process, a fresh Dask worker's too (that costs one compile for n rows).
    note: how ambiguous data was read, for loss_fn errors ("" if not).
    """

    def __init__(self, data: Any, batch_size: int | None):
        if batch_size is not None:
            batch_size = positive_int(batch_size, "batch_size")
        plain = _plain(data) if _is_pair(data) else data  # Mapping inputs of an (inputs, targets) pair;
        if _is_array_pair(plain):  # a list of batches stays the caller's list (each batch converted as read)
            data = plain
        self._data = data
        if _is_pair(plain) and not _pair_of_pairs(plain) and not _is_array_pair(plain) and _has_leaves(plain):
            _rows(*plain, "data")  # can't be two batches (a batch is a pair): a pair with a non-array leaf, named
        self._pair = _is_array_pair(data)
        if self._pair:
            _warn_two_dict_batches(plain)
            self.n_rows: int | None = _rows(*data, "data")
            inputs, targets = (jax.tree_util.tree_map(_as_array, part) for part in data)
            self._data = (inputs, targets)
            if self.n_rows == 0:
                raise ValueError("data has no rows")
            self.batch_size = batch_size or DEFAULT_BATCH_SIZE
            self.size: int | None = min(self.batch_size, self.n_rows)
        else:
            if isinstance(data, (str, bytes, dict)) or not _iterable(data) or hasattr(data, "shape"):
                raise TypeError(
                    "data must be (inputs, targets) arrays or an iterable of (inputs, targets) "
                    f"batches, got {type(data).__name__}{_dict_hint(data, 'data')}{_other_hint(data)}"
                )
            self.n_rows = self._count_rows(data)
            self.batch_size = self.size = batch_size
        self.one_shot = not self._pair and iter(data) is data
        self.note = _two_batches_note(data)

    @staticmethod
    def _count_rows(data: Any) -> int | None:
        """Total rows of a list or tuple of batches (in memory); None for other iterables, a Sequence
        loader included, whose batches are read only when iterated (a store= export counts them then)."""
        if not isinstance(data, (list, tuple)):
            return None
        return sum(_rows(*_pair(data[i], f"data[{i}]"), f"data[{i}]") for i in range(len(data)))

    def __iter__(self) -> Iterator[Batch]:
        if self._pair:
            inputs, targets = self._data
            for start in range(0, self.n_rows, self.size):
                stop = min(start + self.size, self.n_rows)
                yield self._batch(start, _slice(inputs, start, stop), _slice(targets, start, stop), stop - start)
            return
        start = 0
        for i, batch in enumerate(self._data):
            raw = _pair(batch, f"data[{i}]")
            rows = _rows(*raw, f"data[{i}]")
            inputs, targets = (jax.tree_util.tree_map(_as_array, part) for part in raw)
            if rows == 0:
                continue
            if self.size is None:
                self.size = rows
            for lo in range(0, rows, self.size):
                hi = min(lo + self.size, rows)
                yield self._batch(start + lo, _slice(inputs, lo, hi), _slice(targets, lo, hi), hi - lo)
            start += rows

    def _batch(self, start: int, inputs: Any, targets: Any, count: int) -> Batch:
        return Batch(start, count, _pad(inputs, self.size), _pad(targets, self.size))


def _iterable(data: Any) -> bool:
    """Whether iter(data) works: an __iter__, or the old sequence protocol (__getitem__ from 0 up to an
    IndexError, as a loader with __len__ / __getitem__ alone gives), which iter() takes without reading."""
    if hasattr(data, "__iter__"):
        return True
    try:
        iter(data)
    except TypeError:
        return False
    return True


_LABEL_KEYS = ("label", "labels", "y", "target", "targets", "label_ids")


def _dict_hint(data: Any, name: str) -> str:
    """For a Mapping (a tfds / Hugging Face / grain batch, {"image": ..., "label": ...}): its keys and the two
    ways to pass it, as (name, None) with loss_fn reading the labels from it, or split; "" otherwise."""
    if not isinstance(data, Mapping):
        return ""
    keys = list(data)[:4]  # every key shown, not only str ones: {0: x, 1: y} named its keys as "keys , ..."
    shown = ", ".join(repr(key) for key in keys) + (", ..." if len(data) > len(keys) else "")
    label = next((key for key in _LABEL_KEYS if key in data), None)
    other = next((key for key in data if isinstance(key, str) and key != label), None)
    split = f"({name}[{other!r}], {name}[{label!r}])" if label and other else f"({name}[<inputs>], {name}[<labels>])"
    return (
        f" (keys {shown}): pass it as ({name}, None), loss_fn(params, {name}, targets) then reading the labels "
        f"from {name} (targets is None), or split it into (inputs, targets), e.g. {split}"
    )


def _other_hint(data: Any) -> str:
    """For data given as a function (a generator function, not its generator) or as one array (inputs without
    targets): what to pass instead; "" otherwise."""
    if callable(data) and not hasattr(data, "shape"):
        return (
            " (a function, not an iterable: data is read once per checkpoint, so for a generator function pass "
            "an object whose __iter__ returns a new generator, e.g. class Batches: def __iter__(self): return "
            "batches(), or a list of its (inputs, targets) batches)"
        )
    if hasattr(data, "shape"):
        return " (one array: pass (inputs, targets), or (inputs, None) for a loss_fn that takes no targets)"
    return ""


def _pair(batch: Any, where: str) -> tuple[Any, Any]:
    batch = _plain(batch)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{where}: each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            f"{_dict_hint(batch, 'batch')} (data was read as an iterable of batches; {PAIR_RULE})"
        )
    return batch[0], batch[1]
