"""Gradient sets: per-checkpoint gradient matrices plus the learning-rate weights."""

from __future__ import annotations

import decimal
import numbers
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ._arrays import DTYPE_CODES, as_matrix, is_torch_tensor


class KernelSide(NamedTuple):
    """Rows of one gradient set as a scoring backend takes them.

    factored: blocks alternate left (n, p_c) and right (n, q_c) per checkpoint, else one (n, d_c)
    block per checkpoint. blocks: 2-D arrays with contiguous rows and a row stride of at least the
    row length (bfloat16 as uint16 bits), or torch tensors on a GPU (bfloat16 as torch.bfloat16).
    dtypes: per block its code in DTYPE_CODES.
    A plain (factored, blocks, dtypes) tuple is accepted wherever a KernelSide is.
    """

    factored: bool
    blocks: list[np.ndarray]
    dtypes: list[int]


def block_name(factored: bool, b: int) -> str:
    """The name the C++ kernel gives kernel block b of a side in its errors."""
    return f"{'left' if b % 2 == 0 else 'right'} factor of checkpoint {b // 2}" if factored else f"checkpoint {b}"


def non_finite_message(side: str, factored: bool, b: int, rows: Sequence[int]) -> str:
    """The C++ kernel's message for NaN or Inf in block b of `side` ("test" or "train"), first in `rows`."""
    return f"{side} {block_name(factored, b)} contains NaN or Inf values, first in rows [{', '.join(map(str, rows))}]"


FINITE_CHECK_BYTES = 64 * 2**20  # float32 rows checked at a time by non_finite_rows (bounds its temporaries)


def non_finite_rows(block: np.ndarray, code: int, limit: int = 5) -> list[int]:
    """The first `limit` rows (5: as many as the C++ kernel names) of a kernel block (bfloat16 as uint16
    bits, `code` in DTYPE_CODES) holding NaN or Inf, checked a piece of rows at a time: bfloat16 by its
    exponent bits (all ones: Inf or NaN), float16 and float32 as they are, so nothing is copied whole."""
    step = max(1, FINITE_CHECK_BYTES // (4 * max(1, block.shape[1])))
    found: list[int] = []
    for start in range(0, block.shape[0], step):
        if len(found) >= limit:
            break
        rows = block[start : start + step]
        if code == DTYPE_CODES["bfloat16"]:
            finite = ((rows & 0x7F80) != 0x7F80).all(axis=1)
        else:
            finite = np.isfinite(rows).all(axis=1)
        found += (start + np.flatnonzero(~finite)[: limit - len(found)]).tolist()
    return found


def _as_list(x: Any, name: str) -> list[Any]:
    """A list or tuple as one array per checkpoint, anything else as the only one. A list whose elements
    are all 1-D (per-example rows) is refused with the advice to stack them."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name} must hold at least one checkpoint")
        if all(_is_row(e) for e in x):
            stack = "np.asarray(rows, dtype=np.float32)"
            if hasattr(x[0], "ndim"):
                stack = "torch.stack(rows)" if is_torch_tensor(x[0]) else "np.stack(rows)"
            column = ""
            if hasattr(x[0], "ndim"):  # arrays: as likely width-1 columns, one per checkpoint, as rows
                column = (
                    "; if each is one checkpoint's width-1 gradients, one value per example (a binary logistic "
                    "regression's d loss / d logit), pass each as a column (g[:, None])"
                )
            raise ValueError(
                f"{name}: a {type(x).__name__} is read as one (rows, dims) array per checkpoint; got a "
                f"{type(x).__name__} of {len(x)} 1-D rows: stack them into one array first ({stack}){column}"
            )
        return list(x)
    return [x]


def _is_row(x: Any) -> bool:
    """Whether x is one 1-D row: an array with ndim 1, or a non-empty list or tuple of real numbers."""
    if hasattr(x, "ndim"):
        return x.ndim == 1
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(v, numbers.Real) for v in x)


def _check_not_path(x: Any, name: str | None) -> None:
    """TypeError pointing to GradientStore.open when `x` is a path (str or os.PathLike), not an array
    (the message starts with `name: ` unless name is None, for a caller that prefixes its own)."""
    if isinstance(x, (str, os.PathLike)):
        where = "" if name is None else f"{name}: "
        raise TypeError(f"{where}got a path ({os.fspath(x)!r}); open the store with tracin.GradientStore.open(path)")


def _weights(weights: Any, count: int) -> np.ndarray:
    """float64 (count,) from `weights`: real numbers only (NumPy integer or float arrays, bfloat16
    arrays, torch tensors, detached first, or elements that are numbers.Real or Decimal); text,
    bytes, bools, complex, dates and None are refused, not converted. A weight that is not 0 but
    becomes 0 in float64 (Decimal("1e-400")) is refused: its checkpoint would silently count for
    nothing. Negative and zero weights are kept."""
    if weights is None:
        return np.ones(count)
    bad = TypeError(f"weights must be a sequence of real numbers (one per checkpoint), got {weights!r}")
    if is_torch_tensor(weights):
        weights = _torch_values(weights)
    elif isinstance(weights, (list, tuple)):
        weights = [_torch_values(x) if is_torch_tensor(x) else x for x in weights]
    if isinstance(weights, (str, bytes, bytearray)) or (
        isinstance(weights, (list, tuple)) and any(_is_bool(x) for x in weights)
    ):  # NumPy would turn [1, True] into integers
        raise bad
    try:
        given = np.asarray(weights)
        if given.dtype.name == "bfloat16":  # ml_dtypes (JAX bfloat16 arrays): exact in float32
            given = given.astype(np.float32)
        if given.dtype.kind == "O":
            if not all(_real(x) for x in given.flat):
                raise bad
        elif given.dtype.kind not in "iuf":
            raise bad
    except (TypeError, ValueError):
        raise bad from None
    try:
        w = given.astype(np.float64)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"weights must be finite as float64, got {weights!r}") from None
    except ValueError:  # Decimal("sNaN"), which float() refuses
        raise ValueError(f"weights must be finite, got {weights!r}") from None
    if w.ndim == 0:
        w, given = w.reshape(1), given.reshape(1)
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D (one per checkpoint), got shape {w.shape}")
    if w.size != count:
        raise ValueError(f"weights: expected one per checkpoint ({count}), got {w.size}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    lost = np.flatnonzero((w == 0) & np.asarray(given != 0, dtype=bool))
    if lost.size:
        c = int(lost[0])
        raise ValueError(
            f"weights[{c}] = {given[c]!r} is not 0 but rounds to 0 in float64, so checkpoint {c} would count "
            "for nothing; scale the weights (and the scores) up"
        )
    return w


def _torch_values(t: Any) -> Any:
    """A torch tensor's values on the host as NumPy: detached (a learning rate kept as a tensor that
    requires grad), bfloat16 widened to float32 (exact); a 0-d tensor as a Python scalar, so that a
    bool inside a list is still seen as one."""
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    values = t.numpy()
    return values.item() if values.ndim == 0 else values


def _is_bool(x: Any) -> bool:
    """Whether an element of a list of weights is a bool: Python's, np.bool_, or an array of bool dtype (a 0-d
    NumPy or JAX array, which np.asarray would read as 1 or 0 beside numbers)."""
    return isinstance(x, (bool, np.bool_)) or getattr(getattr(x, "dtype", None), "kind", None) == "b"


def _real(x: Any) -> bool:
    """Whether an element of an object array is a real number (not a bool)."""
    return isinstance(x, (numbers.Real, decimal.Decimal)) and not isinstance(x, (bool, np.bool_))


def _metadata(metadata: Any) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (free-form provenance) or None, got {type(metadata).__name__}")
    return dict(metadata)


class GradientSet:
    """What every gradient set offers to the scoring functions.

    Subclasses hold per checkpoint either one (n, d_c) matrix or a (left, right) factor pair.
    `weights` is float64 (n_checkpoints,); `weights_given` says whether the user chose them (a set
    with default weights takes the weights of the set it is scored against).
    """

    factored: bool
    weights: np.ndarray
    weights_given: bool
    metadata: dict

    @property
    def n_rows(self) -> int:
        raise NotImplementedError

    @property
    def n_checkpoints(self) -> int:
        return len(self.weights)

    @property
    def dims(self) -> tuple:
        """Per checkpoint d_c (full) or (p_c, q_c) (factored)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_rows

    def row_chunks(self) -> int | None:
        """Preferred rows per kernel call when streaming (None: everything at once)."""
        return None

    def kernel_side(self, start: int = 0, stop: int | None = None) -> KernelSide:
        """(factored, blocks, dtype codes) for rows [start, stop), as the kernel takes them."""
        raise NotImplementedError


class _InMemory(GradientSet):
    """Shared code of Gradients and FactoredGradients: blocks of views plus their dtype names."""

    _blocks: list[np.ndarray]
    _dtypes: list[str]

    def _init_blocks(self, arrays: list[Any], names: list[str]) -> None:
        self._blocks, self._dtypes = [], []
        for arr, name in zip(arrays, names, strict=True):
            _check_not_path(arr, name)
            view, dtype = as_matrix(arr, name, device_arrays=True)
            self._blocks.append(view)
            self._dtypes.append(dtype)
        rows = {b.shape[0] for b in self._blocks}
        if len(rows) != 1:
            detail = ", ".join(f"{n}: {b.shape[0]}" for n, b in zip(names, self._blocks, strict=True))
            raise ValueError(f"every checkpoint must have the same number of rows ({detail})")

    @property
    def n_rows(self) -> int:
        return self._blocks[0].shape[0]

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(self._dtypes)

    def kernel_side(self, start: int = 0, stop: int | None = None) -> KernelSide:
        blocks = [b[start:stop] for b in self._blocks]
        return KernelSide(self.factored, blocks, [DTYPE_CODES[d] for d in self._dtypes])

    def _sliced(self, rows: slice):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._blocks = [b[rows] for b in self._blocks]
        return clone

    def __getitem__(self, rows: slice):
        """A view of a contiguous range of rows (step 1), e.g. grads[1000:2000]."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("gradient sets can be sliced by contiguous row ranges only, e.g. g[10:20]")
        return self._sliced(rows)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_rows={self.n_rows}, dims={list(self.dims)}, "
            f"dtypes={list(self.dtypes)}, weights={self.weights.tolist()})"
        )


class Gradients(_InMemory):
    """Full per-example gradients: one (n, d_c) matrix per checkpoint c.

    matrices: a 2-D array or a sequence of them (NumPy, np.memmap, torch tensors on the CPU or a
        GPU, JAX / CuPy arrays)
        in float32, float16 or bfloat16; d_c may differ between checkpoints. Views, not copies.
    weights: one learning-rate weight w_c per checkpoint (float64); default 1 each, taking the other side's weights
        when scored against a set given weights (weights given on both sides must be equal). Signed weights are
        taken as given (unlike the torch / jax exports, which refuse a negative learning rate): a negative
        one flips its checkpoint's contribution, and with it the self-influence ranking.
    metadata: free-form provenance (layers, projection, ...), kept with the set.
    """

    factored = False

    def __init__(self, matrices: Any, weights: Sequence[float] | None = None, *, metadata: dict | None = None):
        _check_not_path(matrices, None)  # the only array argument; scoring prefixes "test: " / "train: "
        arrays = _as_list(matrices, "matrices")
        self._init_blocks(arrays, [f"matrices[{c}]" for c in range(len(arrays))])
        self.weights = _weights(weights, len(arrays))
        self.weights_given = weights is not None
        self.metadata = _metadata(metadata)

    @property
    def matrices(self) -> tuple[np.ndarray, ...]:
        """Per checkpoint the (n, d_c) view (bfloat16 as its uint16 bits)."""
        return tuple(self._blocks)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(b.shape[1] for b in self._blocks)


class FactoredGradients(_InMemory):
    """Last-layer gradients as factors: per checkpoint c a left (n, p_c) and a right (n, q_c)
    matrix whose row-wise outer product left[i] (x) right[i] is example i's (p_c * q_c) gradient.

    For a linear layer y = W x + b, left is dL/dy and right is x with a 1 appended for the bias.
    """

    factored = True

    def __init__(self, left: Any, right: Any, weights: Sequence[float] | None = None, *, metadata: dict | None = None):
        _check_not_path(left, "left")
        _check_not_path(right, "right")
        lefts, rights = _as_list(left, "left"), _as_list(right, "right")
        if len(lefts) != len(rights):
            raise ValueError(f"left has {len(lefts)} checkpoints but right has {len(rights)}")
        arrays, names = [], []
        for c, (lf, rt) in enumerate(zip(lefts, rights, strict=True)):
            arrays += [lf, rt]
            names += [f"left[{c}]", f"right[{c}]"]
        self._init_blocks(arrays, names)
        self.weights = _weights(weights, len(lefts))
        self.weights_given = weights is not None
        self.metadata = _metadata(metadata)

    @property
    def left(self) -> tuple[np.ndarray, ...]:
        return tuple(self._blocks[0::2])

    @property
    def right(self) -> tuple[np.ndarray, ...]:
        return tuple(self._blocks[1::2])

    @property
    def dims(self) -> tuple[tuple[int, int], ...]:
        return tuple((lf.shape[1], rt.shape[1]) for lf, rt in zip(self.left, self.right, strict=True))
