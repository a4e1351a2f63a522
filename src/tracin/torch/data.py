"""Turning the user's data into a re-iterable stream of (inputs, targets) batches.

Accepted forms:
- an (inputs, targets) pair of trees of tensors (which of the two a tuple or list of two is: PAIR_RULE),
- a map-style torch Dataset yielding (input, target) items (an IterableDataset is refused: its items may
  be examples or batches; wrap it in a DataLoader saying which),
- a DataLoader reading its dataset in order, rows 0, 1, 2... (check_sequential), or over an IterableDataset
  (with num_workers > 1 a UserWarning: each worker runs the iterator, the loader interleaves their batches),
- any re-iterable of (inputs, targets) batches (a list, say).

Inputs and targets are "trees": a tensor, or a tuple (a namedtuple too)/list/dict of tensors, all
sharing the batch dimension 0 (NumPy arrays are taken as tensors, without a copy). A tuple or list of inputs is passed
to the model positionally, a dict by keyword. Any Mapping is a dict (transformers' BatchEncoding, what
a tokenizer or DataCollatorWithPadding returns, is a UserDict), read as a plain dict. Every leaf needs dimension 0:
one that is not a tensor or array with it (a float temperature, a string, a 0-d tensor) is a ValueError naming its
path (data inputs['temperature']), and a pair holding one is never read as two batches; a setting shared by every
example goes with the model (or with loss_fn: functools.partial).
"""

from __future__ import annotations

import inspect
import numbers
import operator
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._arrays import scalar_leaf_kind

Tree = Any  # a tensor, or a tuple / list / dict (any Mapping) of trees


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Tree) -> Tree:
    """`fn` applied to every tensor of `tree`, keeping its structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return _rebuilt(tree, [tree_map(fn, v) for v in tree])
    raise TypeError(f"batches must hold tensors, or tuples/lists/dicts of tensors; got {type(tree).__name__}")


def doubled(tree: Tree) -> Tree:
    """`tree` with each tensor's rows taken twice (a batch of one row: the same example twice, a batch of two)."""
    return tree_map(lambda t: torch.cat([t, t]), tree)


def slice_rows(tree: Tree, start: int, stop: int) -> Tree:
    """Rows [start, stop) of every tensor of `tree` (views)."""
    return tree_map(lambda t: t[start:stop], tree)


def as_tensors(tree: Tree) -> Tree:
    """`tree` with NumPy arrays turned into tensors sharing their memory (torch.from_numpy)."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree)
    if isinstance(tree, Mapping):
        return {k: as_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return _rebuilt(tree, [as_tensors(v) for v in tree])
    return tree


def _rebuilt(node: tuple | list, items: list) -> tuple | list:
    """A tuple or list of `node`'s type holding `items`: a namedtuple (or any tuple subclass with
    _fields) is built from its fields positionally, as its constructor does not take one iterable."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*items)
    return type(node)(items)


def host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU NumPy view (or copy, from another device) of a tensor's contents; dtypes NumPy lacks
    (bfloat16...) as raw bytes. For fingerprints."""
    t = t.detach().cpu().contiguous()
    try:
        return t.numpy()
    except TypeError:
        return t.reshape(-1).view(torch.uint8).numpy()


def host_arrays(tree: Tree) -> list[np.ndarray]:
    """host_array of every tensor of `tree`, in tree order."""
    return [host_array(t) for t in tree_leaves(tree)]


def tree_leaves(tree: Tree) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    tree_map(leaves.append, tree)
    return leaves


def batch_rows(tree: Tree, name: str) -> int:
    """The common size of dimension 0 of every tensor in `tree`."""
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} holds no tensors")
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(t.shape) for t in leaves]
        # a dict of tensors (not nested): name each key's shape
        keyed = isinstance(tree, Mapping) and [id(v) for v in tree.values()] == [id(t) for t in leaves]
        named = f" ({', '.join(f'{k}: {s}' for k, s in zip(tree, shapes, strict=True))})" if keyed else ""
        hint = " (a size 1 is not broadcast: repeat such a tensor per row, t.expand(rows, ...))" if 1 in sizes else ""
        raise ValueError(f"every tensor in {name} must share the batch dimension 0; got shapes {shapes}{named}{hint}")
    return sizes.pop()


def call_model(model: Callable, inputs: Tree) -> Any:
    """model(x), model(*x) for a tuple/list, model(**x) for a dict (any Mapping), on copies of the input
    tensors: a forward changing its inputs in place (x -= mean) sees the batch as it was on every pass."""
    inputs = _copied(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _copied(tree: Tree, copies: dict[int, torch.Tensor] | None = None) -> Tree:
    """`tree` with each tensor cloned (a Mapping as a dict), other leaves as they are; a tensor found
    twice (model(x, x)) cloned once, so that the forward sees one tensor there too (`copies`: by id)."""
    copies = {} if copies is None else copies
    if isinstance(tree, torch.Tensor):
        if id(tree) not in copies:
            copies[id(tree)] = tree.clone()
        return copies[id(tree)]
    if isinstance(tree, Mapping):
        return {k: _copied(v, copies) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return _rebuilt(tree, [_copied(v, copies) for v in tree])
    return tree


@contextmanager
def targets_unchanged(targets: Tree) -> Iterator[None]:
    """Refuses (_refuse_changed_targets) a loss_fn that changed the batch's `targets` in place inside the
    block, also when the block ends in an error (raised from it)."""
    watched = _watch_targets(targets)
    try:
        yield
    except Exception as e:
        _refuse_changed_targets(watched, e)
        raise
    _refuse_changed_targets(watched, None)


def _watch_targets(targets: Tree) -> list[tuple[str, torch.Tensor, int, torch.Tensor]]:
    """(path, tensor, its version counter, a copy) of each strided tensor of a batch's targets, for
    _refuse_changed_targets; inference tensors, which count no versions, left out."""
    return [
        (path, t, t._version, t.clone())
        for path, t in _named_leaves(targets, "targets")
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_inference()
    ]


def _refuse_changed_targets(
    watched: list[tuple[str, torch.Tensor, int, torch.Tensor]], cause: Exception | None
) -> None:
    """A ValueError (from `cause`, the error the checks ended in, if any) naming the targets that changed since
    _watch_targets, loss_fn having changed them in place: each pass tracin makes over a batch would see them
    changed again. They are first restored from the copies (the caller's data is left as it was); an in-place
    change leaving them as they were (a clamp of valid labels) passes."""
    changed = [(path, t, saved) for path, t, version, saved in watched if t._version != version and not _same(t, saved)]
    with torch.no_grad():
        for _, t, saved in changed:
            if t.shape == saved.shape:
                t.copy_(saved)
    if changed:
        raise ValueError(
            f"loss_fn changes the batch's {', '.join(path for path, _, _ in changed)} in place (labels -= 1, say): "
            "tracin calls it several times on each batch (its checks, the per-example gradients), and each call "
            "would see them changed again; compute out of place instead (labels = labels - 1)"
        ) from cause


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when `a` and `b` hold the same shape, dtype and values (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    equal = a == b
    if a.is_floating_point() or a.is_complex():
        equal |= a.isnan() & b.isnan()
    return bool(equal.all())


def inputs_mismatch(model: Any, inputs: Tree) -> str | None:
    """Why `model`'s forward cannot take `inputs` as call_model passes them (a dict as keywords, a tuple or
    list positionally), for a TypeError raised by a call; None when it can, or its signature is unknown."""
    forward = getattr(model, "forward", None)
    try:
        signature = inspect.signature(forward)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        if isinstance(inputs, Mapping):
            signature.bind(**inputs)
        elif isinstance(inputs, (tuple, list)):
            signature.bind(*inputs)
        else:
            signature.bind(inputs)
    except TypeError as e:
        return (
            f"{type(model).__name__}.forward{signature} cannot take the batch's inputs ({e}): tracin calls "
            "model(**inputs) for dict inputs (each key a keyword argument), model(*inputs) for a tuple or list, "
            "model(inputs) otherwise; for a forward taking one dict (forward(self, batch)), give the inputs "
            "as a tuple of that dict, (batch,)"
        )
    return None


# torch's names of the floating dtypes in its errors: "Double", "double", "c10::Half", "torch.cuda.FloatTensor",
# "CPUBFloat16Type", "torch.float64"
_FLOATING_NAMES = {
    "double": torch.float64,
    "float64": torch.float64,
    "float": torch.float32,
    "float32": torch.float32,
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# torch's dtype-mismatch phrasings (torch 2.x, CPU and CUDA): "mat1 and mat2 must have the same dtype, but got Double
# and Float" (Linear, addmm, attention), "expected m1 and m2 to have the same dtype, but got: double != float" (matmul,
# Linear without bias), "expected scalar type Double but found Float" (bmm), "Input type (double) and bias type (float)
# should be the same" (Conv), "mixed dtype (CPU): all inputs must share same datatype." and "mixed dtype (CPU): expect
# parameter to have scalar type of Float" (LayerNorm, BatchNorm, GroupNorm), "... to have the same type as tensor ...
# but type torch.FloatTensor does not equal torch.DoubleTensor"
_MISMATCH_PHRASES = re.compile(
    r"same dtype|expected scalar type|should be the same|mixed dtype|same type as|does not equal|same scalar type|"
    r"does not match",
    re.IGNORECASE,
)
# errors about index tensors (Embedding's indices, cross_entropy's class targets, gather): the data wants an integer
# dtype there, not the model's floating one
_INDEX_WORDS = re.compile(r"\b(?:indices|index|long|int|int32|int64|byte|longtensor|inttensor)\b", re.IGNORECASE)


def _floating_named(message: str) -> set[torch.dtype]:
    """The floating dtypes `message` names in torch's spellings."""
    named = set()
    for word in re.findall(r"[A-Za-z0-9]+", message):
        word = word.lower().removeprefix("cpu").removeprefix("cuda").removesuffix("tensor").removesuffix("type")
        if word in _FLOATING_NAMES:
            named.add(_FLOATING_NAMES[word])
    return named


# the tensor method casting to a model's dtype
_CASTS = {torch.float32: ".float()", torch.float64: ".double()", torch.float16: ".half()"}


def dtype_mismatch(params: Iterable[torch.Tensor], inputs: Tree, targets: Tree, error: RuntimeError) -> str | None:
    """Why the model's forward (or loss_fn) raised `error` on the first batch: floating tensors of the data in
    another dtype than the model's floating parameters `params` (float64 NumPy arrays, NumPy's and scikit-learn's
    default, for a float32 model). The data is not cast: a cast could change the results.

    None unless torch's message is about a pair of floating dtypes: it names two (one of them a dtype of the data
    that the parameters lack), or it names at most one in one of torch's mismatch phrasings (_MISMATCH_PHRASES) and
    is not about an index tensor (float ids given to an nn.Embedding want integers, not the model's dtype). None as
    well when every floating tensor of the data has one of the parameters' dtypes."""
    message = str(error)
    named = _floating_named(message)
    if len(named) < 2 and (not _MISMATCH_PHRASES.search(message) or _INDEX_WORDS.search(message)):
        return None
    model = sorted({p.dtype for p in params if p.is_floating_point()}, key=str)
    if not model:
        return None
    odd = [
        (path, leaf.dtype)
        for part, name in ((inputs, "inputs"), (targets, "targets"))
        for path, leaf in _named_leaves(part, name)
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype not in model
    ]
    if not odd or (len(named) >= 2 and not named & {dtype for _, dtype in odd}):
        return None
    listed = ", ".join(f"{path} {_dtype_name(dtype)}" for path, dtype in odd[:4]) + (", ..." if len(odd) > 4 else "")
    if len(model) == 1:
        name, method = _dtype_name(model[0]), _CASTS.get(model[0], f".to({model[0]})")
        array = f"torch.from_numpy(x){method}"
        if hasattr(np, name):  # NumPy has no bfloat16
            array = f"x.astype(np.{name}) (or {array})"
        fix = f"give the data in {name}: {array} for a NumPy array x, x{method} for a tensor"
    else:
        fix = "give the data in the dtype the model's layers take"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"data: batch 0 has floating tensors in another dtype than the model's parameters "
        f"({', '.join(map(_dtype_name, model))}): {listed}, and the model's forward or loss_fn failed on them "
        f"({type(error).__name__}: {first}). tracin does not cast the data (a cast could change the results); "
        f"{fix}, or a Dataset transform that casts each row"
        + (
            " (NumPy arrays and scikit-learn's data are float64 unless made otherwise)"
            if any(dtype == torch.float64 for _, dtype in odd)
            else ""
        )
    )


_INTEGER_NAMES = {
    "long": torch.int64,
    "int": torch.int32,
    "short": torch.int16,
    "byte": torch.uint8,
    "char": torch.int8,
}
_TARGET_DTYPE = re.compile(r"\btarget\b.*\b(?:long|byte|int)\b", re.IGNORECASE)


def integer_mismatch(params: Iterable[torch.Tensor], inputs: Tree, targets: Tree, error: RuntimeError) -> str | None:
    """Why the model's forward (or loss_fn) raised `error` on the first batch, where dtype_mismatch (floating data)
    has no answer: integer inputs meeting the model's floating parameters `params` (torch's mismatch naming an
    integer dtype of the inputs: "mat1 and mat2 must have the same dtype, but got Long and Float"), or floating
    targets for a loss wanting class indices (cross_entropy: "expected target dtype to be Long or Byte"). None
    otherwise. The data is not cast."""
    message = str(error)
    first = message.strip().splitlines()[0] if message.strip() else ""
    said = f"({type(error).__name__}: {first})"
    floating = [
        (path, leaf.dtype)
        for path, leaf in _named_leaves(targets, "targets")
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    ]
    if floating and _TARGET_DTYPE.search(message):
        listed = ", ".join(f"{path} {_dtype_name(dtype)}" for path, dtype in floating[:4])
        return (
            f"data: batch 0 has floating targets ({listed}), and loss_fn wants integer class indices {said}: give "
            "the targets as int64 (y.long() for a tensor, y.astype(np.int64) for a NumPy array)"
        )
    if not _MISMATCH_PHRASES.search(message) or not any(p.is_floating_point() for p in params):
        return None
    words = {w.lower().removesuffix("tensor").removesuffix("type") for w in re.findall(r"[A-Za-z0-9]+", message)}
    named = {_INTEGER_NAMES[w] for w in words if w in _INTEGER_NAMES}
    integer = [
        (path, leaf.dtype)
        for path, leaf in _named_leaves(inputs, "inputs")
        if isinstance(leaf, torch.Tensor) and leaf.dtype in named
    ]
    if not integer or not _floating_named(message):
        return None
    listed = ", ".join(f"{path} {_dtype_name(dtype)}" for path, dtype in integer[:4])
    return (
        f"data: batch 0 has integer inputs ({listed}) where the model computes in floating point, and its forward "
        f"failed on them {said}. tracin does not cast the data (a cast could change the results): give floating "
        "inputs in the model's dtype (x.float() for a float32 model); integer inputs are for index layers such as "
        "nn.Embedding"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Batches:
    """A re-iterable stream of (inputs, targets) batches of at most `max_rows` rows each.

    n_rows: total examples when known up front, else None.
    note: how the data was read, for errors raised on its first batch, when that may not be what was meant
        (TWO_BATCHES).
    """

    source: Iterable
    n_rows: int | None
    max_rows: int
    one_shot: bool
    note: str | None = None

    def __iter__(self) -> Iterator[tuple[int, Tree, Tree]]:
        """Yields (start row, inputs, targets); big incoming batches are split into max_rows pieces."""
        start = 0
        source = self.source.loader(self.max_rows) if isinstance(self.source, _InOrder) else self.source
        for i, batch in enumerate(source):
            pair = _split_pair(batch, f"batch {i}")
            _refuse_leaves_without_rows(pair, f"batch {i}")
            inputs, targets = (as_tensors(part) for part in pair)
            rows = batch_rows(targets, f"the targets of batch {i}")
            in_rows = batch_rows(inputs, f"the inputs of batch {i}")
            if in_rows != rows:
                raise ValueError(f"batch {i}: inputs have {in_rows} rows but targets have {rows}")
            for a in range(0, rows, self.max_rows):
                b = min(a + self.max_rows, rows)
                whole = a == 0 and b == rows
                yield (
                    start + a,
                    _usable(inputs if whole else slice_rows(inputs, a, b)),
                    _usable(targets if whole else slice_rows(targets, a, b)),
                )
            start += rows


def _usable(tree: Tree) -> Tree:
    """`tree` with tensors made under torch.inference_mode(), which autograd cannot use, copied."""
    if not any(t.is_inference() for t in tree_leaves(tree)):
        return tree
    return tree_map(lambda t: t.clone() if t.is_inference() else t, tree)


def _split_pair(batch: Any, name: str) -> tuple[Tree, Tree]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        hint = ""
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            hint = f" (data is read as an iterable of batches: {PAIR_RULE})"
        elif isinstance(batch, Mapping):
            label = next((k for k in ("labels", "label", "label_ids") if k in batch), None)
            hint = (
                " (split each item into (inputs, targets), e.g. ({'input_ids': ...}, labels), in the Dataset "
                "or a collate_fn"
            )
            if label is not None:  # a transformers Trainer-style batch: the targets under their own key
                hint += (
                    f"; it holds {label!r}, as a Trainer's dataset gives them: tracin calls model(**inputs) and "
                    f"loss_fn(outputs, targets), so for a DataLoader pass "
                    f"collate_fn=lambda items: (lambda b: (b, b.pop({label!r})))(default_collate(items)) "
                    "(torch.utils.data.default_collate)"
                )
            hint += ")"
        elif isinstance(batch, (tuple, list)) and len(batch) > 2:
            hint = f" ({EXTRA_ITEMS})"
        raise TypeError(
            f"{name} must be an (inputs, targets) pair of torch tensors (or NumPy arrays), "
            f"got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + hint
        )
    return batch[0], batch[1]


EXTRA_ITEMS = (
    "an item of more than two, such as a Dataset returning (x, y, index) or (x, y, weight), is not an (inputs, "
    "targets) pair: keep those two, in the Dataset's __getitem__ or, for a DataLoader, with collate_fn=lambda "
    "items: default_collate(items)[:2] (torch.utils.data.default_collate; a Dataset given as data can go in "
    "DataLoader(dataset, batch_size=64, collate_fn=...)); a model taking several inputs gets them as one tuple, "
    "((x1, x2), y)"
)


def _refuse_list_of_examples(data: list | tuple) -> None:
    """ValueError where `data`, a list (or tuple) read as batches, starts with one example's (inputs, target)
    pair: data[0]'s targets a 0-d tensor or array or a number (a class label, or a setting of the loss shared
    by a batch: both readings are given). A list of (image, label) examples would otherwise get the 0-d leaf's
    advice for a setting shared by every example alone, and _list_of_batches's note looks for 0-d / 1-d inputs
    only (an image has more dimensions). data[0] alone is read (a list subclass's __iter__ may count passes)."""
    if not data or not _is_pair(data[0]):
        return
    target = data[0][1]
    if isinstance(target, (torch.Tensor, np.ndarray)) and target.ndim == 0:
        got = f"a 0-d tensor ({_dtype_name(target.dtype)})" if isinstance(target, torch.Tensor) else "a 0-d array"
    elif _number(target) and not isinstance(target, bool):
        got = scalar_leaf_kind(target)
    else:
        return
    shapes = sorted({tuple(leaf.shape) for _, leaf in _named_leaves(data[0][0], "inputs") if hasattr(leaf, "shape")})
    inputs = f" and its inputs have shapes {', '.join(map(str, shapes))}" if shapes else ""
    raise ValueError(  # shapes alone cannot tell an example's image from a batch: both readings
        f"data, a list of {len(data)} (inputs, targets) pairs, is read as {len(data)} batches, each item's "
        f"dimension 0 its rows, but data[0]'s targets are {got}{inputs}, with no row per example: for a "
        "list of single examples, collate them into one pair first: torch.utils.data.default_collate(data), or "
        "pass DataLoader(data, batch_size=64); for batches whose target is one value shared by every example (a "
        "setting of the loss), it belongs with loss_fn, not in the data: functools.partial(loss_fn, setting=...)"
    )


PAIR_RULE = (
    "a tuple or list of two is one (inputs, targets) pair when every leaf of it is a tensor or array, unless "
    "both items are pairs (tuples / lists of two): that is a list of two batches (pass such inputs and "
    "targets as a list of one batch, [((x, k), (y, w))]); two dicts are one pair ({'input_ids': ...}, "
    "{'labels': ...}) when all their tensors share the size of dimension 0"
)


TWO_BATCHES = (
    "data, two pairs of tensors, was read as a list of two batches of (inputs, targets), data[0] and data[1] "
    "(PAIR_RULE); for one batch whose inputs and targets are tuples, pass a list of that one batch, "
    "[((x, k), (y, w))]"
)


def _listed_keys(data: Mapping) -> str:
    keys = [repr(k) for k in list(data)[:6]]
    return ", ".join(keys) + (" ..." if len(data) > 6 else "") if keys else "no keys"


def _list_of_batches(data: list | tuple) -> str | None:
    """How a list of more than two (inputs, targets) pairs was read, for errors raised on its first batch: each
    item a batch whose dimension 0 is its rows (a list of single examples, a tokenized example each, is read
    as batches whose rows are its tokens). None where data[0]'s arrays are not all 0-d or 1-d, as one
    example's are (a batch's inputs have rows)."""
    if len(data) <= 2 or not _is_pair(data[0]):  # data[0] alone: a list subclass's __iter__ may count passes
        return None
    leaves = [leaf for _, leaf in _named_leaves(data[0], "data[0]")]
    arrays = [leaf for leaf in leaves if isinstance(leaf, (torch.Tensor, np.ndarray))]
    if not arrays or any(leaf.ndim > 1 for leaf in arrays):  # batches of rows: no note on their errors
        return None
    shapes = sorted({tuple(leaf.shape) for leaf in arrays})
    return (
        f"data, a list of {len(data)} (inputs, targets) pairs, was read as {len(data)} batches, each item's "
        f"dimension 0 its rows (data[0]'s leaves have shapes {', '.join(map(str, shapes))}); for a list of "
        "single examples, collate them into one pair first: torch.utils.data.default_collate(data), or a "
        "DataLoader(data, batch_size=64)"
    )


def _is_pair(node: Any) -> bool:
    return isinstance(node, (tuple, list)) and len(node) == 2


def _is_tensor_pair(data: Any) -> bool:
    """(inputs, targets) tensors rather than a sequence of batches, by PAIR_RULE."""
    if not _is_pair(data) or all(_is_pair(d) for d in data):
        return False
    leaves = [leaf for _, leaf in _named_leaves(data, "data")]
    if not all(isinstance(leaf, (torch.Tensor, np.ndarray)) for leaf in leaves):
        return False
    # two dict batches could not be read (a batch is a pair): two dicts are one pair, if their rows agree
    return not all(isinstance(d, Mapping) for d in data) or len({leaf.shape[:1] for leaf in leaves}) == 1


def _refuse_ragged_dict_pair(data: Any) -> None:
    """ValueError naming a leaf whose dimension 0 differs when `data` is two dicts of tensors (or arrays)
    whose sizes of dimension 0 disagree: one pair with a stray leaf, as two dicts are never two batches."""
    if not (_is_pair(data) and all(isinstance(d, Mapping) for d in data)):
        return
    leaves = [*_named_leaves(data[0], "inputs"), *_named_leaves(data[1], "targets")]
    if not all(isinstance(leaf, (torch.Tensor, np.ndarray)) for _, leaf in leaves):
        return
    sizes = [leaf.shape[0] if leaf.ndim else None for _, leaf in leaves]
    common = Counter(sizes).most_common(1)[0][0]
    odd = next(((name, n) for (name, _), n in zip(leaves, sizes, strict=True) if n != common), None)
    if odd is None:
        return
    usual = next(name for (name, _), n in zip(leaves, sizes, strict=True) if n == common)

    def rows(n: int | None) -> str:
        return "no dimension 0" if n is None else f"{n} rows"

    raise ValueError(
        f"data is one (inputs, targets) pair of dicts, but {odd[0]} has {rows(odd[1])}, {usual} has "
        f"{rows(common)}: every leaf of a pair needs one row per example (dimension 0)"
    )


def _named_leaves(node: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(path, leaf) of every leaf under `node`, paths like inputs['x'][0]."""
    if isinstance(node, Mapping):
        for key, child in node.items():
            yield from _named_leaves(child, f"{name}[{key!r}]")
    elif isinstance(node, (tuple, list)):
        for i, child in enumerate(node):
            yield from _named_leaves(child, f"{name}[{i}]")
    else:
        yield name, node


def _target_rows(batch: Any, name: str) -> int:
    """The rows of the targets of `batch`, an (inputs, targets) pair whose every leaf has them."""
    pair = _split_pair(batch, name)
    _refuse_leaves_without_rows(pair, name)
    return batch_rows(as_tensors(pair[1]), f"the targets of {name}")


def _refuse_leaves_without_rows(pair: tuple[Tree, Tree] | list, where: str) -> None:
    """ValueError naming the first leaf of an (inputs, targets) pair that is not a tensor (or NumPy array)
    with a dimension 0 (a float temperature, a string, a 0-d tensor): `where` inputs['temperature'], what
    it is, and where a setting shared by every example goes instead (as tracin.jax.batches says)."""
    for part, name in ((pair[0], "inputs"), (pair[1], "targets")):
        for path, key, leaf, column in _keyed_leaves(part, name, None):
            if not isinstance(leaf, (torch.Tensor, np.ndarray)) or leaf.ndim == 0:
                raise ValueError(f"{where} {path}: {_not_rows(leaf, key, name, column, path)}")


def _keyed_leaves(
    node: Any, name: str, key: Any, column: tuple[str, str | None] | None = None
) -> Iterator[tuple[str, Any, Any, tuple[str, str | None] | None]]:
    """(path, key, leaf, column) of every leaf under `node` as _named_leaves, with the dict key (a str) or
    the position (an int) of the leaf in its parent, None for `node` itself a leaf; column: for a leaf in a
    Python list of numbers (a column of values, not an argument or setting: a tokenizer's lists,
    inputs['input_ids'][0][3], or targets [0, 1, 1]), (the list's path, its dict key or None), the outermost
    such list; None for other leaves (a float among the positional inputs, a dict's value)."""
    if column is None and _numbers_list(node):
        column = (name, str(key) if isinstance(key, str) else None)
    if isinstance(node, Mapping):
        for k, child in node.items():
            yield from _keyed_leaves(child, f"{name}[{k!r}]", k, column)
    elif isinstance(node, (tuple, list)):
        for i, child in enumerate(node):
            yield from _keyed_leaves(child, f"{name}[{i}]", i, column)
    else:
        yield name, key, node, column


def _number(leaf: Any) -> bool:
    return isinstance(leaf, (numbers.Number, np.generic))


def _numbers_list(node: Any) -> bool:
    """Whether `node` is a Python list of numbers or of such lists (or tuples) of numbers, none empty: values
    that torch.tensor(node) would make a tensor of (a tokenizer's output without return_tensors)."""
    return isinstance(node, list) and _numbers_tree(node)


def _numbers_tree(node: Any) -> bool:
    return bool(node) and all(
        _number(item) or (isinstance(item, (list, tuple)) and _numbers_tree(item)) for item in node
    )


def _not_rows(leaf: Any, key: Any, part: str, column: tuple[str, str | None] | None = None, path: str = "") -> str:
    """Why a leaf without a dimension 0 cannot be data, and what to pass instead: for the whole inputs or
    targets None, that a pair needs them; for another None, to leave it out; for numbers in a Python list of
    numbers (`column`: a tokenizer's output without return_tensors="pt"), a tensor of the list; otherwise (a
    scalar or 0-d tensor anywhere, among the positional inputs too) rows, or where a setting shared by every
    example goes."""
    expected = "expected an array or tensor with a leading batch dimension (one row per example)"
    if leaf is None and path == part == "targets":
        return (
            f"{expected}, got None: a torch (inputs, targets) pair needs targets, as tracin calls "
            "loss_fn(outputs, targets) with the batch's targets: pass the per-example targets; a loss that needs "
            "none can take a placeholder with one row per example, e.g. torch.zeros(n) for n examples"
        )
    if leaf is None and path == part == "inputs":
        return (
            f"{expected}, got None: a torch (inputs, targets) pair needs inputs, as tracin calls the model with "
            "them: pass the per-example inputs (a tensor, or a tuple or dict of tensors)"
        )
    if leaf is None:
        what = f"the key {key!r}" if isinstance(key, str) else "it"
        user = "the model's forward" if part == "inputs" else "loss_fn"
        return (
            f"{expected}, got None: leave {what} out of the data ({user} then uses its default), or pass a "
            "tensor with one row per example"
        )
    got = f"a 0-d tensor ({_dtype_name(leaf.dtype)})" if isinstance(leaf, torch.Tensor) else scalar_leaf_kind(leaf)
    if column is not None and _number(leaf):
        where_list, dict_key = column
        if dict_key is not None:
            return (
                f"{expected}, got {got} in the Python list of {dict_key!r}, which tracin reads as a tree of values, "
                f'not a tensor (what a tokenizer returns without return_tensors="pt"): call the tokenizer with '
                f'return_tensors="pt" (and padding=True for texts of different lengths), or pass '
                f"torch.tensor(...) of the list"
            )
        return (
            f"{expected}, got {got} in the Python list {where_list}, which tracin reads as a tree of values, not a "
            f"tensor: pass torch.tensor(...) of the list"
        )
    setting = key if isinstance(key, str) and key.isidentifier() else "setting"
    where = (
        f"with the model, not in the data: an attribute of the module or a default of its forward "
        f"(forward(self, ..., {setting}=...)), or, for loss_fn, functools.partial(loss_fn, {setting}=...)"
        if part == "inputs"
        else f"with loss_fn, not in the data: functools.partial(loss_fn, {setting}=...)"
    )
    return f"{expected}, got {got}; a setting shared by every example belongs {where}"


def check_sequential(loader: torch.utils.data.DataLoader) -> int | None:
    """ValueError unless the loader reads its map-style dataset in order, rows 0, 1, 2...: row i of the
    export must be example i of the dataset (top_k's indices are dataset indices). torch's own
    BatchSampler over a SequentialSampler (what shuffle=False builds) is taken as it is; a sampler that
    shuffles (RandomSampler, SubsetRandomSampler, WeightedRandomSampler, one with shuffle=True) is
    refused by its type; any other sampler or batch_sampler (a subclass too: a length-bucketing one,
    say) is iterated once, indices only (no data is read), and must hand out 0, 1, 2... in order (an
    item of several indices, a list, array or tensor that batch_size=None hands to __getitem__ at once,
    counts as those rows). A sampler that is an iterator (read once) is refused before it is used up.

    Returns the number of indices a batch_sampler handed out when it was iterated, the rows (None
    otherwise: without a batch_sampler, batch_size=None, each item is a batch of rows; and for an
    IterableDataset, whose order is its own: fingerprints check it)."""
    from torch.utils.data import (
        BatchSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    if isinstance(loader.dataset, IterableDataset):
        return None
    batched = loader.batch_sampler is not None
    sampler = loader.batch_sampler if batched else loader.sampler
    inner = getattr(sampler, "sampler", None) if type(sampler) is BatchSampler else sampler
    if type(inner) is SequentialSampler:
        return None
    chain, node = [], sampler
    while node is not None and len(chain) < 8:  # a batch_sampler, the sampler it wraps...
        chain.append(node)
        node = getattr(node, "sampler", None)
    shuffling = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    for node in chain:
        if isinstance(node, shuffling) or getattr(node, "shuffle", False) is True:
            _refuse_order(node, "")
    one_shot = next((node for node in chain if isinstance(node, Iterator)), None)
    if one_shot is not None:  # read once: iterating it here would leave the export nothing
        raise ValueError(
            f"data is a DataLoader drawing rows with {type(one_shot).__name__}, an iterator, read once; its order "
            "cannot be checked and the export reads the data once per checkpoint: "
            "give a sampler that can be iterated again (a list of indices, a Sampler), or shuffle=False and none"
        )
    count, wrong = 0, []
    for item in sampler:
        for index in _indices(item):
            try:
                index = operator.index(index)
            except TypeError:  # keys that are not integers: the dataset has no order of its own to check
                return None
            if index != count:
                wrong.append((count, index))
            count += 1
        if len(wrong) >= 8:
            break
    if wrong:
        shown = ", ".join(f"row {i} is example {j}" for i, j in wrong[:8])
        own = batched and type(sampler) is not BatchSampler  # else name the sampler torch's BatchSampler wraps
        kind = "a batch_sampler" if own else "a sampler"
        _refuse_order(
            sampler if own or not batched else inner,
            f" ({kind} handing out the dataset's examples out of order: {shown})",
        )
    return count if batched else None  # without a batch_sampler each index is an item, a batch of its own


def _indices(item: Any) -> list[Any]:
    """The dataset indices of one item of a sampler or batch_sampler: an index or key (a tuple is one
    key), or several: a list of them, or an array or tensor of indices (a boolean one: the rows it
    selects), which batch_size=None hands to the dataset's __getitem__ at once (a batch of those rows)."""
    if isinstance(item, list):
        return [i for part in item for i in (_array_indices(part) if _is_array(part) else [part])]
    return _array_indices(item) if _is_array(item) else [item]


def _is_array(item: Any) -> bool:
    return isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim > 0


def _array_indices(item: torch.Tensor | np.ndarray) -> list[Any]:
    flat = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item).reshape(-1)
    return np.flatnonzero(flat).tolist() if flat.dtype == np.bool_ else flat.tolist()


def _sampler_words(sampler: Any, batched: bool) -> str:
    return f"its {'batch_sampler' if batched else 'sampler'} {type(sampler).__name__}"


def _refuse_order(sampler: Any, detail: str) -> None:
    raise ValueError(
        f"data is a DataLoader drawing rows with {type(sampler).__name__}{detail}; rows must come in dataset order "
        "(0, 1, 2...), the same for every checkpoint, as row i of the export stands for example i of the dataset: "
        "build it with shuffle=False and no sampler (a SequentialSampler, or torch's BatchSampler over one), or "
        "reorder the dataset itself (torch.utils.data.Subset(dataset, order)) if another order is wanted"
    )


def _no_rows(n: int | None) -> int | None:
    if n == 0:
        raise ValueError("data has no rows")
    return n


def _loader_rows(loader: torch.utils.data.DataLoader) -> int | None:
    """The rows the loader hands out (None when unknown); a warning when drop_last (the loader's, or
    its batch_sampler's) leaves some out, or may: a dataset without len()."""
    size, drop = loader.batch_size, loader.drop_last
    if size is None:  # a batch_sampler given: its own batch size and drop_last, when it has them
        size = getattr(loader.batch_sampler, "batch_size", None)
        drop = bool(getattr(loader.batch_sampler, "drop_last", False))
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        if drop:
            _warn_dropping("the last rows (fewer than a batch) of its dataset, which has no len(), may not be exported")
        return None
    if not isinstance(size, int) or size < 1:  # rows per batch unknown
        return None
    if not drop or n % size == 0:
        return n
    kept = n - n % size
    _warn_dropping(f"its last {n - kept} of {n} rows are not exported (rows {kept} to {n - 1})")
    return kept


def _handed_out(loader: torch.utils.data.DataLoader, count: int) -> int:
    """`count`, the rows a sampler iterated by check_sequential handed out (0, 1, 2... in order); a
    warning when that leaves out the last rows of the dataset."""
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return count
    if 0 < count < n:
        batched = loader.batch_sampler is not None
        sampler = loader.batch_sampler if batched else loader.sampler
        drop = loader.drop_last or getattr(sampler, "drop_last", False) is True
        warnings.warn(
            f"data is a DataLoader whose {_sampler_words(sampler, batched)} hands out examples 0 to {count - 1} "
            f"of its dataset's {n}: the last {n - count} (rows {count} to {n - 1}) are not exported"
            + ("; build it with drop_last=False to export every row" if drop else ""),
            UserWarning,
            stacklevel=5,  # export_gradients' caller
        )
    return count


def _warn_iterable_workers(loader: torch.utils.data.DataLoader) -> None:
    """A UserWarning for a DataLoader running an IterableDataset in several worker processes: each runs
    the dataset's own iterator (its examples repeat unless it shards its stream) and the loader
    interleaves their batches; which of the two holds cannot be told from outside."""
    from torch.utils.data import IterableDataset

    workers = loader.num_workers
    if not isinstance(loader.dataset, IterableDataset) or workers <= 1:
        return
    warnings.warn(
        f"data is a DataLoader over an IterableDataset ({type(loader.dataset).__name__}) with num_workers="
        f"{workers}: each worker runs the dataset's iterator, so every example is exported once per worker "
        "unless its __iter__ splits the stream with torch.utils.data.get_worker_info(), and the loader "
        "interleaves the workers' batches; row i is the loader's i-th example, not the dataset's: build it with "
        "num_workers=0 or 1, or shard with get_worker_info() and read the rows in the loader's order",
        UserWarning,
        stacklevel=5,  # export_gradients' caller
    )


def _warn_dropping(what: str) -> None:
    warnings.warn(
        f"data is a DataLoader with drop_last=True: {what}; build it with drop_last=False to export every row",
        UserWarning,
        stacklevel=6,  # export_gradients' caller
    )


_END = object()


@dataclass
class _InOrder:
    """A map-style Dataset, read in order in batches of the size the export settles on."""

    dataset: torch.utils.data.Dataset

    def loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, shuffle=False)


class _ReadAhead:
    """An iterable whose first batch is read up front: its first pass goes on with the iterator that read
    it (no batch lost or read twice, whatever the iterable: a generator, a DataLoader over an
    IterableDataset handing out one stored generator...), later passes iterate the source anew."""

    def __init__(self, source: Iterable):
        self.source = source
        self._iterator: Iterator | None = iter(source)
        self.head = next(self._iterator, _END)

    def __iter__(self) -> Iterator:
        iterator, head = self._iterator, self.head
        self._iterator = self.head = None
        if iterator is None:
            yield from self.source
            return
        if head is not _END:
            yield head
        yield from iterator


def first_row(batches: Batches) -> tuple[Tree, Tree] | None:
    """(inputs, targets) of the first row of `batches` (None when it has no rows), read ahead without
    losing it: the first pass over `batches` goes on from the batch read here (a Dataset's first row
    is read from a pass of its own)."""
    if isinstance(batches.source, _InOrder):
        head = next(iter(batches.source.loader(1)), _END)
    else:
        batches.source = _ReadAhead(batches.source)
        head = batches.source.head
    if head is _END:
        return None
    _, inputs, targets = next(iter(Batches([head], None, 1, one_shot=False)))
    return inputs, targets


def as_batches(data: Any, max_rows: int) -> Batches:
    """Batches over `data` (see the module docstring), at most `max_rows` rows per batch."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"data must be an (inputs, targets) pair of torch tensors (or NumPy arrays), a Dataset, "
            f"a DataLoader or an iterable of (inputs, targets) batches; got one {type(data).__name__}"
        )
    if _is_pair(data) and not all(_is_pair(d) for d in data) and any(True for _ in _named_leaves(data, "data")):
        _refuse_leaves_without_rows(data, "data")  # can't be two batches (a batch is a pair): the leaf, named
    if _is_tensor_pair(data):
        pair = tuple(as_tensors(part) for part in data)
        n = _no_rows(batch_rows(pair[1], "data targets"))
        return Batches([pair], n, max_rows, one_shot=False)
    _refuse_ragged_dict_pair(data)
    if isinstance(data, DataLoader):
        _warn_iterable_workers(data)
        seen = check_sequential(data)
        n = _loader_rows(data) if seen is None else _handed_out(data, seen)
        return Batches(data, _no_rows(n), max_rows, one_shot=False)
    if isinstance(data, IterableDataset):
        raise TypeError(
            f"data is an IterableDataset ({type(data).__name__}); whether its items are examples or whole batches "
            "is its own: pass DataLoader(data, batch_size=64) when it yields single (input, target) examples "
            "(any batch size; the rows are the examples, in the order it yields them), or DataLoader(data, "
            "batch_size=None) when it yields (inputs, targets) batches"
        )
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError("data is a Dataset without __len__; wrap it in a DataLoader")
        return Batches(_InOrder(data), _no_rows(len(data)), max_rows, one_shot=False)
    if isinstance(data, Mapping):  # iterating it gives its keys: "batch 0 ... got str"
        raise TypeError(
            f"data is a {type(data).__name__} of {_listed_keys(data)}, the model's inputs alone: pass an (inputs, "
            "targets) pair, (data, labels), whose targets loss_fn(outputs, targets) takes (a causal LM's: the ids with "
            "-100 where no loss is wanted)"
        )
    if isinstance(data, Iterable):
        one_shot = iter(data) is data
        n = None
        if isinstance(data, (list, tuple)):
            _refuse_list_of_examples(data)
            n = _no_rows(sum(_target_rows(b, f"batch {i}") for i, b in enumerate(data)))
        two = _is_pair(data) and all(_is_pair(d) for d in data)
        two = two and all(isinstance(leaf, (torch.Tensor, np.ndarray)) for _, leaf in _named_leaves(data, "data"))
        note = TWO_BATCHES if two else _list_of_batches(data) if isinstance(data, (list, tuple)) else None
        return Batches(data, n, max_rows, one_shot=one_shot, note=note)
    raise TypeError(
        "data must be an (inputs, targets) pair of torch tensors (or NumPy arrays), a Dataset, a DataLoader or an "
        f"iterable of (inputs, targets) batches; got {type(data).__name__}"
    )
