"""Random projections (Johnson-Lindenstrauss maps) of gradient matrices, computed by the C++ kernel.

A `Projection` stands for a dim x d matrix P whose entries are generated on the fly from
(seed, row, column) by a counter-based hash, so no such matrix is ever held and P's column k is
the same whatever d is. Inner products are preserved on average: E[<Pg, Pg'>] = <g, g'>.

Kinds:
    "rademacher"  entries +-1/sqrt(dim)
    "gaussian"    entries N(0, 1)/sqrt(dim)
    "sparse"      8 non-zeros +-1/sqrt(8) per input column, one in each eighth of the outputs;
                  dim/8 times fewer multiply-adds than the dense kinds, but hashing each column's
                  entries costs the same, so it is faster only for large dims and batches (measured
                  on 2 cores: 6x faster than rademacher at n=256, dim=4096; the same speed at n=64,
                  dim=1024; 4.6x slower at n=1, dim=8)

Results are bit-identical for a given (seed, kind, dim, d) whatever the batch size, the thread
count, the instruction set, or how the columns are split into pieces passed together; Kronecker
segments (below) too, their two products being computed by the same kernel (not by BLAS, whose
rounding changes with its thread count and CPU).

Kronecker projections (kronecker=True) project a layer's weight gradient G (rows x cols, the bias as
a last column) to P_rows G P_cols^T (k_rows x k_cols), two independent matrices of this kind per
layer, so that a per-example gradient sum_t b_t a_t^T over tokens projects token by token as
sum_t (P_rows b_t)(P_cols a_t)^T without the rows x cols matrix ever being formed (tracin.torch).
A factor is capped at its side's size (see `kronecker_dims`): a small side is kept as it is.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._arrays import DTYPE_CODES, as_matrix
from ._validate import capped_threads, thread_count
from .gradients import GradientSet
from .store._convert import bfloat16_bits_to_float32
from .store._format import short

KINDS = {"rademacher": 0, "gaussian": 1, "sparse": 2}
SPARSE_NONZEROS = 8
# Version of the entry generator (csrc/src/projection_kernels.hpp); a spec from another version
# describes another matrix.
GENERATOR_VERSION = 1
# Independent matrices drawn from one seed: stream 0 projects whole rows, 1 + j the j-th per-layer
# piece, and these two the left and right Kronecker factors; kronecker=True's segment j draws its
# row and column matrices from streams _KRONECKER_STREAM + 2j and + 2j + 1.
_LEFT_STREAM, _RIGHT_STREAM = 1 << 62, (1 << 62) + 1
_KRONECKER_STREAM = 1 << 61
_IDENTITY_ROWS = 256  # rows of the identity projected at a time to materialise a Kronecker factor
_BLOCK_BYTES = 64 * 2**20  # float32 intermediates of a Kronecker segment's rows projected at a time
# Kronecker factors (layer_factors) kept for reuse across checkpoints, least recently used dropped first.
_FACTOR_CACHE_BYTES = 64 * 2**20
_FACTOR_CACHE: OrderedDict[tuple[str, int, int, int, int], np.ndarray] = OrderedDict()
_FACTOR_LOCK = threading.Lock()

_View = tuple[np.ndarray, str]
_QUIET = threading.local()  # .on: apply / apply_factored do not warn of widening (see quiet_widening)
_OVERFLOW = "the projection of row {} is not finite: the input holds NaN or Inf, or its values overflow float32"


# The largest output dimension: a projection to more dims holds 8 GiB of float32 per projected row
# (it is meant to reduce d), and the factorisations of `factored_dims` / `kronecker_dims` search the
# divisors up to sqrt(dim) (at most 46341 candidates, a millisecond).
MAX_DIM = 2**31


class NonFiniteRowError(ValueError):
    """The projection of a row is not finite (the row holds NaN or Inf, or its projection is beyond float32):
    ValueError(message.format(row)), keeping `row` (its index among the rows projected or checked
    together) and `message`, so that an export can name the row in its data's numbering."""

    def __init__(self, message: str, row: int):
        super().__init__(message.format(row))
        self.message, self.row = message, row


@contextlib.contextmanager
def quiet_widening() -> Iterator[None]:
    """Within it (in this thread), apply and apply_factored do not warn when their output is no narrower than
    their input: for exports, which warn once, up front, for the whole export rather than at every batch."""
    before = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = before


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {_int_text(value)}")
    return value


def _int_text(value: int) -> str:
    """`value` for an error message: its digits, or for a huge one (a hostile spec's 4000-digit dim) its
    first 12 digits and its digit count, so the message stays one short line."""
    if abs(value) < 10**24:
        return str(value)
    digits = int(abs(value).bit_length() * math.log10(2)) + 1  # exact, or one too many
    digits -= abs(value) < 10 ** (digits - 1)
    return f"{'-' if value < 0 else ''}{abs(value) // 10 ** (digits - 12)}... ({digits} digits)"


def _as_matrix(x: Any, name: str) -> _View:
    """as_matrix(x, name), refusing a gradient set (whose rows are per checkpoint) by name first."""
    if isinstance(x, GradientSet):
        bits = " (bfloat16 rows are uint16 bits: .view(ml_dtypes.bfloat16) them)"
        if hasattr(x, "matrices"):
            how = f"project each checkpoint's rows, e.g. P.apply(g.matrices[c]){bits}"
        elif hasattr(x, "left"):
            how = f"project each checkpoint's factors, e.g. P.apply_factored(g.left[c], g.right[c]){bits}"
        else:
            how = "project it into a new store with P.apply_store(store, path)"
        raise TypeError(
            f"{name} is a {type(x).__name__}, a gradient set with rows per checkpoint, not a matrix: {how}; "
            "or export with projection=P to store projected rows"
        )
    return as_matrix(x, name)


def _views(matrix: Any) -> list[_View]:
    """Kernel views of one (n, d) matrix or of a sequence of (n, d_j) pieces taken side by side."""
    if isinstance(matrix, (list, tuple)):
        if not matrix:
            raise ValueError("matrix: an empty sequence of pieces")
        for j, piece in enumerate(matrix):  # a list of rows is not a sequence of pieces
            if isinstance(piece, GradientSet):
                _as_matrix(piece, f"matrix[{j}]")
            ndim = getattr(piece, "ndim", None)
            if ndim != 2:
                what = f"a {type(piece).__name__}" if ndim is None else f"of shape {tuple(piece.shape)}"
                raise (TypeError if ndim is None else ValueError)(
                    "matrix must be a 2-D array or a sequence of 2-D pieces taken side by side, got a "
                    f"{type(matrix).__name__} whose item {j} is {what} (rows given as a list: stack them "
                    "first, e.g. np.asarray(rows, dtype=np.float32))"
                )
        views = [_as_matrix(piece, f"matrix[{j}]") for j, piece in enumerate(matrix)]
        rows = {v.shape[0] for v, _ in views}
        if len(rows) != 1:
            raise ValueError(f"matrix: the pieces must have the same number of rows, got {sorted(rows)}")
        return views
    return [_as_matrix(matrix, "matrix")]


def _column_slice(views: list[_View], start: int, stop: int) -> list[_View]:
    """Columns [start, stop) of the pieces taken side by side, as views."""
    out, offset = [], 0
    for arr, dtype in views:
        lo, hi = max(start - offset, 0), min(stop - offset, arr.shape[1])
        if lo < hi:
            out.append((arr[:, lo:hi], dtype))
        offset += arr.shape[1]
    return out


@functools.lru_cache(maxsize=256)
def _balanced_factors(dim: int) -> tuple[int, int]:
    """(dl, dr) with dl * dr = dim, dr the largest divisor of dim not above sqrt(dim): one vectorised
    pass over the isqrt(dim) candidates (46340 at MAX_DIM; dims are checked against it first)."""
    candidates = np.arange(1, math.isqrt(dim) + 1, dtype=np.int64)
    dr = int(candidates[dim % candidates == 0][-1])
    return dim // dr, dr


def _check_index(index: Any) -> int:
    """A segment's position in a per_layer layout: apply makes at most dim <= MAX_DIM segments, and a
    larger index would draw from another matrix's stream (Kronecker factors, apply_factored's)."""
    return _check_int(index, "index", 0, MAX_DIM - 1)


def _check_dim(value: Any, name: str) -> int:
    """An output dimension in [1, MAX_DIM]; the error names `name`."""
    value = _check_int(value, name, 1)
    if value > MAX_DIM:
        raise ValueError(
            f"{name} must be at most 2**31 = {MAX_DIM} (a projection to more dims holds over 8 GiB of float32 "
            f"per row; it is meant to reduce the gradient's dims), got {_int_text(value)}"
        )
    return value


@dataclass(frozen=True)
class LayerMatrix:
    """A segment of a flat gradient row holding a layer's weight gradient as a `rows` x `cols` matrix
    (nn.Linear: out x in), for kronecker=True projections: the weight's entries row-major, or
    column-major when `transposed` (Hugging Face Conv1D stores its weight (in, out)), then when
    `bias` the bias gradient (rows,), taken as a last column: the matrix is rows x (cols + 1).
    The two layouts multiply in different orders, so the same G projects to the same values up to
    float32 rounding, not to the same bits (each layout's bits are fixed, whatever the threads or CPU)."""

    rows: int
    cols: int
    bias: bool = False
    transposed: bool = False

    def __post_init__(self) -> None:
        # NumPy integers and bools are stored as Python ones: to_dict() goes into JSON metadata.
        object.__setattr__(self, "rows", _check_int(self.rows, "LayerMatrix.rows", 1))
        object.__setattr__(self, "cols", _check_int(self.cols, "LayerMatrix.cols", 1))
        for name in ("bias", "transposed"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"LayerMatrix.{name} must be a bool, got {type(getattr(self, name)).__name__}")
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def width(self) -> int:
        """Columns of the flat row it covers."""
        return self.rows * (self.cols + int(self.bias))

    def to_dict(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "bias": bool(self.bias), "transposed": bool(self.transposed)}


Segment = int | LayerMatrix  # a plain segment's width, or a layer projected by a Kronecker product


class Projection:
    """A random projection to `dim` dimensions.

    Args:
        dim: output dimension, 1 to MAX_DIM = 2**31 (a larger dim is refused: each projected row
            would hold over 8 GiB of float32, and factoring it for `factored_dims` / `kronecker_dims`
            would be slow).
        seed: any int in [0, 2**64).
        kind: "rademacher", "gaussian" or "sparse".
        per_layer: project each segment of the columns (one per layer) on its own; see `apply`.
        kronecker: (needs per_layer) segments given as LayerMatrix are projected by a Kronecker
            product P_rows (x) P_cols (see `kronecker_dims`, `layer_factors`); tracin.torch then
            projects per token without forming per-example weight gradients. Plain segments are
            projected as with per_layer alone.
    """

    def __init__(
        self,
        dim: int,
        seed: int = 0,
        kind: str = "rademacher",
        *,
        per_layer: bool = False,
        kronecker: bool = False,
    ):
        self.dim = _check_dim(dim, "dim")
        self.seed = _check_int(seed, "seed", 0, 2**64 - 1)
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str, one of {sorted(KINDS)}, got {type(kind).__name__} {short(kind)}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {short(kind)}")
        self.kind = kind
        if not isinstance(per_layer, (bool, np.bool_)):
            raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
        self.per_layer = bool(per_layer)
        if not isinstance(kronecker, (bool, np.bool_)):
            raise TypeError(f"kronecker must be a bool, got {type(kronecker).__name__}")
        if kronecker and not per_layer:
            raise ValueError("kronecker=True projects layer by layer: pass per_layer=True with it")
        self.kronecker = bool(kronecker)

    @property
    def nonzeros(self) -> int | None:
        """Non-zeros per input column of the sparse kind (None for the dense kinds)."""
        return min(SPARSE_NONZEROS, self.dim) if self.kind == "sparse" else None

    @property
    def factored_dims(self) -> tuple[int, int]:
        """(dl, dr) of `apply_factored`: the most balanced factorisation dl * dr = dim, dl >= dr
        (dim = 2048 gives (64, 32)). Choose a dim with balanced factors: a prime dim gives (dim, 1)."""
        return _balanced_factors(self.dim)

    def segment_dims(self, n_segments: int) -> list[int]:
        """Output dims of the segments with per_layer=True: dim split as evenly as possible,
        the first dim % n_segments segments one larger. Needs n_segments <= dim."""
        n_segments = _check_int(n_segments, "number of segments", 1)
        if n_segments > self.dim:
            raise ValueError(
                f"per_layer projection: {n_segments} segments need dim >= {n_segments}, got dim={self.dim}"
            )
        base, extra = divmod(self.dim, n_segments)
        return [base + (j < extra) for j in range(n_segments)]

    @staticmethod
    def kronecker_dims(dim: int, layer: LayerMatrix | dict) -> tuple[int, int]:
        """(k_rows, k_cols) of a layer's segment of `dim` outputs: the most balanced factorisation of
        dim, its larger factor on the larger side of the matrix (rows, or cols + 1 with a bias); a
        factor above its side's size is capped at that size (the side is then kept as it is, see
        `layer_factors`) and the other factor takes dim // cap, up to its own side's size. So
        k_rows * k_cols = dim unless a side is small: the layer then fills the first k_rows * k_cols
        of its `dim` columns, the others are zero (a 64 -> 3 nn.Linear with bias given 1024 gets
        3 x 65, its exact gradient). Choose dim = n_segments * k with k of balanced factors (k = 4096:
        64 x 64)."""
        layer = _layer(layer, "layer")
        big, small = _balanced_factors(_check_dim(dim, "dim"))
        rows, cols = layer.rows, layer.cols + int(layer.bias)
        rows_big = rows >= cols
        k_big, k_small = big, small
        side_big, side_small = (rows, cols) if rows_big else (cols, rows)
        if k_small > side_small:
            k_small = side_small
            k_big = min(side_big, dim // k_small)
        elif k_big > side_big:
            k_big = side_big
            k_small = min(side_small, dim // k_big)
        return (k_big, k_small) if rows_big else (k_small, k_big)

    def layer_factors(self, index: int, layer: LayerMatrix | dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(P_rows (k_rows, rows), P_cols (k_cols, cols [+ 1])) float32, read-only: the two matrices
        of segment `index` (its position in the layout, 0 to MAX_DIM - 1) projecting `layer` (a LayerMatrix or its
        to_dict()) to `dim` outputs, (k_rows, k_cols) = kronecker_dims(dim, layer); a factor equal to
        its side's size is the identity. The segment's projection is P_rows G P_cols^T flattened
        row-major into its first k_rows * k_cols columns, G the rows x (cols [+ 1]) gradient."""
        if not self.kronecker:
            raise ValueError("layer_factors needs a Projection(..., per_layer=True, kronecker=True)")
        layer = _layer(layer, "layer")
        index = _check_index(index)
        k_rows, k_cols = self.kronecker_dims(dim, layer)
        stream = _KRONECKER_STREAM + 2 * index
        return (
            _factor(self.kind, self.seed, stream, k_rows, layer.rows),
            _factor(self.kind, self.seed, stream + 1, k_cols, layer.cols + int(layer.bias)),
        )

    def apply(
        self,
        matrix: Any,
        *,
        segments: Sequence[int] | None = None,
        column_offset: int = 0,
        num_threads: int | None = None,
    ) -> np.ndarray:
        """Projects the rows of `matrix`.

        Args:
            matrix: (n, d) float32/float16/bfloat16 array (NumPy, torch CPU tensor, JAX array), or a
                sequence of (n, d_j) pieces taken side by side (not copied; same bits as their
                concatenation).
            segments: with per_layer=True, the column widths of the layers (sum of widths = d;
                default: the widths of the pieces). Segment j is projected on its own matrix to
                `segment_dims(len(segments))[j]` dims, and the results are concatenated. With
                kronecker=True an entry may be a LayerMatrix (or its to_dict(), as the metadata of a
                Kronecker export records the layout under projection["segments"]): that segment is
                projected to P_rows G P_cols^T (see layer_factors) on the host, by two kernel
                products whose bits do not depend on threads or CPU; at the small factor sizes this
                costs more than a BLAS matmul, most for the sparse kind (measured on 2 cores: dense
                kinds about as fast, sparse 2.5-5x slower, 9x for a 2048 x 2049 layer). tracin.torch
                and tracin.jax exports do not take this path (they multiply layer_factors
                themselves). Refused with per_layer=False (which projects whole rows).
            column_offset: with per_layer=False, the columns of `matrix` are columns
                [column_offset, column_offset + d) of P: projecting the pieces of a row at their
                offsets and summing gives the projection of the whole row (up to rounding).
            num_threads: kernel threads (default: all cores; 1 to 4096, capped at the usable cores, as in scoring).

        Returns:
            (n, dim) float32. NonFiniteRowError (a ValueError) names the first row that holds NaN or
            Inf, or whose projection is beyond float32's range (a finite result is returned even when
            the kernel's unscaled sums pass FLT_MAX: such a row is summed again scaled by a power of two).
        """
        views = _views(matrix)
        threads = thread_count(num_threads)
        column_offset = _check_int(column_offset, "column_offset", 0)
        if column_offset and self.per_layer:
            raise ValueError("column_offset applies with per_layer=False only")
        if segments is not None and not self.per_layer:
            raise ValueError(
                "segments applies with per_layer=True only (this projection projects whole rows); "
                "pass segments=None, or use a Projection(..., per_layer=True)"
            )
        n = views[0][0].shape[0]
        d = sum(v.shape[1] for v, _ in views)
        if column_offset > 2**63 - 1 - d:  # the kernel's column numbers are int64
            raise ValueError(
                f"column_offset must be at most 2**63 - 1 - d = {2**63 - 1 - d} for a matrix of d = {d} "
                f"columns (its last column must be numbered below 2**63), got {column_offset}"
            )
        out = np.empty((n, self.dim), dtype=np.float32)
        if not self.per_layer:
            if d == 0:
                together = " (its pieces together)" if isinstance(matrix, (list, tuple)) else ""
                raise ValueError(f"matrix{together} has no columns: a row to project needs >= 1 column")
            if not column_offset:  # a piece at an offset is part of a wider row
                self._warn_widening("apply", "rows", self.dim, d, "the rows as they are, or a dim below {exact}")
            self._project(views, 0, self.dim, column_offset, out, threads)
            return out
        if segments is None:
            layout = [v.shape[1] for v, _ in views]
            if 0 in layout:
                name = f"matrix[{layout.index(0)}]" if isinstance(matrix, (list, tuple)) else "matrix"
                raise ValueError(
                    f"{name} has no columns: with per_layer=True and no segments each piece is a segment, "
                    "which needs >= 1 column"
                )
        else:
            layout = self._segments(segments, d)
        dims = self.segment_dims(len(layout))
        self._warn_widening("apply", "rows", self.dim, d, "the rows as they are, or a dim below {exact}")
        self._warn_unbalanced(layout, dims)
        start = out_start = 0
        for j, (segment, dim) in enumerate(zip(layout, dims, strict=True)):
            piece = _column_slice(views, start, start + _width(segment))
            self._project_segment(piece, j, segment, dim, out[:, out_start : out_start + dim], threads)
            start += _width(segment)
            out_start += dim
        return out

    def project_segment(
        self, matrix: Any, index: int, segment: Segment | dict, dim: int, *, num_threads: int | None = None
    ) -> np.ndarray:
        """Segment `index` (0 to MAX_DIM - 1) of a per_layer layout projected from its own columns alone:
        matrix (n, width) (dtypes as in `apply`) -> (n, dim) float32, the columns `apply` gives it when
        `dim` is its entry of segment_dims. For exports that compute some segments another way (tracin.torch)."""
        if not self.per_layer:
            raise ValueError("project_segment needs a Projection(..., per_layer=True)")
        view = _as_matrix(matrix, "matrix")
        segment = self._segment(segment)
        if view[0].shape[1] != _width(segment):
            raise ValueError(f"matrix has {view[0].shape[1]} columns, segment {segment!r} covers {_width(segment)}")
        threads = thread_count(num_threads)
        out = np.empty((view[0].shape[0], _check_dim(dim, "dim")), dtype=np.float32)
        self._project_segment([view], _check_index(index), segment, dim, out, threads)
        return out

    def apply_factored(self, left: Any, right: Any, *, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Projects a factored gradient (the row-wise outer product left (x) right) by the
        Kronecker product P_L (x) P_R, factor by factor: (P_L l) (x) (P_R r) = (P_L (x) P_R)(l (x) r).

        Args:
            left: (n, p) array; right: (n, q) array (dtypes as in `apply`).

        Returns:
            (left' (n, dl) float32, right' (n, dr) float32) with (dl, dr) = `factored_dims`.
            P_L and P_R are independent matrices of this kind scaled for dl and dr dims, so
            E[<l' (x) r', m' (x) s'>] = <l (x) r, m (x) s>.
            Refused for per_layer=True projections (kronecker=True included), which project full rows.
        """
        if self.kronecker:
            raise ValueError("a kronecker=True projection projects full rows layer by layer, not factored rows")
        if self.per_layer:
            raise ValueError(
                "a per_layer=True projection projects full rows segment by segment; factored rows (apply_factored, "
                "mode='factored' / 'last_layer' exports) take one pair of matrices: use "
                f"Projection({self.dim}, seed={self.seed}, kind={self.kind!r}) (per_layer=False), or mode='full' "
                "for per-layer maps"
            )
        lv, rv = _as_matrix(left, "left"), _as_matrix(right, "right")
        for name, (arr, _) in (("left", lv), ("right", rv)):
            if arr.shape[1] == 0:
                raise ValueError(f"{name} has no columns: a factor to project needs >= 1 column")
        if lv[0].shape[0] != rv[0].shape[0]:
            raise ValueError(
                f"left and right must have the same number of rows, got {lv[0].shape[0]} and {rv[0].shape[0]}"
            )
        threads = thread_count(num_threads)
        dl, dr = self.factored_dims
        widths = (lv[0].shape[1], rv[0].shape[1])
        advice = f"the factors as they are, or a dim whose factored_dims are below {widths}"
        for side, width, exact in zip(("left", "right"), (dl, dr), widths, strict=True):
            self._warn_widening("apply_factored", f"{side} factors", width, exact, advice)
        out_l = np.empty((lv[0].shape[0], dl), dtype=np.float32)
        out_r = np.empty((rv[0].shape[0], dr), dtype=np.float32)
        self._project([lv], _LEFT_STREAM, dl, 0, out_l, threads)
        self._project([rv], _RIGHT_STREAM, dr, 0, out_r, threads)
        return out_l, out_r

    def apply_store(
        self,
        source: Any,
        path: str | os.PathLike,
        *,
        segments: Sequence[Any] | None = None,
        dtype: str = "float32",
        progress: bool | None = None,
        overwrite: bool = False,
    ) -> Any:
        """Projects the rows of a finished GradientStore into a new store: store in, store out, for rows
        exported without projection= (projecting at export time is cheaper: the exact rows are never written).

        Args:
            source: a finished, unprojected GradientStore (or its path): full rows (float32, float16 or
                bfloat16, read a chunk of rows at a time) go through `apply`, factored ones through
                `apply_factored`.
            path: the new store's directory. A call interrupted (Ctrl-C, a crash) leaves an unfinished
                store there, which the same call resumes, projecting only the rows not written yet; one with
                another projection, source or dtype is refused, naming what differs, unless overwrite=True,
                which replaces it.
            segments: with per_layer=True, the layout (as in `apply`); default: one segment per parameter
                of source.metadata["params"], the layout of the adapters' per_layer exports. kronecker=True
                needs it (LayerMatrix entries), and records it under metadata["projection"]["segments"].
            dtype: the new store's element type, "float32" (default), "float16" or "bfloat16".
            progress: True, False or None, a bar over the rows as in the exports.

        Returns:
            The new GradientStore, opened. Its metadata is the source's with "projection" set to this
            projection's spec, so scoring refuses it against rows projected otherwise or not at all (as for
            exports with projection=). Its weights and ids are the source's; its rows are bit-identical to
            `apply` (or `apply_factored`) of the source's rows widened to float32: from a float32 source the
            same bits as exporting with projection=, from a 16-bit one not (an export projects its float32
            rows before rounding; here the rounded rows are projected). A row of the source
            whose projection is beyond float32 is a NonFiniteRowError naming the store, checkpoint and row.
        """
        from ._export.projection import project_store  # it imports this module

        return project_store(self, source, path, segments=segments, dtype=dtype, progress=progress, overwrite=overwrite)

    def _warn_widening(self, method: str, what: str, width: int, exact: int, advice: str) -> None:
        """RuntimeWarning at the caller of `method` when `what` of `exact` columns are projected to `width` >= exact
        (not within `quiet_widening`: an export warns once, up front). `advice` may name {exact}."""
        if width >= exact and not getattr(_QUIET, "on", False):
            warnings.warn(
                f"{self!r}.{method} projects {what} of width {exact} to {width} columns, not fewer: it widens them (or "
                f"keeps their width) and adds its approximation error; use {advice.format(exact=exact)}",
                RuntimeWarning,
                stacklevel=3,  # the caller of apply / apply_factored
            )

    def _warn_unbalanced(self, layout: list[Segment], dims: list[int]) -> None:
        """RuntimeWarning at apply's caller for the first LayerMatrix segment whose share factors so badly that
        an export refuses it (kronecker_share.check_balanced: a prime share projects a side to 1), with the
        dim the export would suggest."""
        from ._export.kronecker_share import balanced_share, unbalanced  # it imports this module

        layers = [s for s in layout if isinstance(s, LayerMatrix)]
        for j, (segment, share) in enumerate(zip(layout, dims, strict=True)):
            if isinstance(segment, LayerMatrix) and unbalanced(share, segment) is not None:
                k = balanced_share(layers, share, len(layout))
                warnings.warn(
                    f"{self!r}.apply: segment {j} ({segment!r}) gets {share} outputs, factored "
                    f"{self.kronecker_dims(share, segment)}: a factor below both its side's size and "
                    f"isqrt({share}) // 2, which tracin.torch / tracin.jax exports refuse; choose dim = "
                    f"{len(layout)} segments x k with k whose factors balance, e.g. {len(layout)} x {k} = "
                    f"{len(layout) * k}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return

    def _segments(self, segments: Sequence[Any], d: int) -> list[Segment]:
        try:
            if isinstance(segments, (str, bytes, bytearray, dict)):
                raise TypeError
            entries = list(segments)
        except TypeError:
            raise TypeError(
                "segments must be a sequence of the segments' widths (ints; LayerMatrix entries with "
                f"kronecker=True), one per layer, got {type(segments).__name__} {short(segments)}"
            ) from None
        layout = [self._segment(entry) for entry in entries]
        if not layout:
            raise ValueError("segments must hold at least one width")
        total = sum(_width(s) for s in layout)
        if total != d:
            raise ValueError(f"segments must sum to the number of columns {d}, got sum {total}")
        return layout

    def _segment(self, entry: Any) -> Segment:
        if isinstance(entry, dict):
            try:
                entry = LayerMatrix(**entry)
            except TypeError as e:
                raise ValueError(f"segments entry {short(entry)} is not a LayerMatrix spec: {short(e)}") from None
        if isinstance(entry, LayerMatrix):
            if not self.kronecker:
                raise ValueError("segments: a LayerMatrix entry needs a Projection(..., kronecker=True)")
            return entry
        return _check_int(entry, "segments entry", 1)

    def _project_segment(
        self, piece: list[_View], index: int, segment: Segment, dim: int, out: np.ndarray, threads: int
    ) -> None:
        if isinstance(segment, LayerMatrix):
            self._project_layer(piece, index, segment, dim, out, threads)
        else:
            self._project(piece, 1 + index, dim, 0, out, threads)

    def _project_layer(
        self, piece: list[_View], index: int, layer: LayerMatrix, dim: int, out: np.ndarray, threads: int
    ) -> None:
        """Writes P_rows G P_cols^T of each row's layer gradient G (flattened row-major, then zeros) into
        out (n, dim), a block of rows at a time (float32 copies and intermediates of about _BLOCK_BYTES).
        Both products are kernel projections (of G's rows by P_cols and of the columns by P_rows, in the
        order that reads G along its stored runs), so the bits do not depend on the batch, block or
        thread count, nor on the instruction set."""
        k_rows, k_cols = self.kronecker_dims(dim, layer)
        rows, cols, stream = layer.rows, layer.cols + int(layer.bias), _KRONECKER_STREAM + 2 * index
        steps = 3 * cols * k_rows if layer.transposed else 2 * rows * k_cols + k_rows * k_cols
        per_row = 4 * (2 * layer.width + steps + k_rows * k_cols)  # copies of G and W, the products
        block = max(1, _BLOCK_BYTES // per_row)
        out[:, k_rows * k_cols :] = 0
        for start in range(0, out.shape[0], block):
            stop = min(start + block, out.shape[0])
            parts = [_widened(v[start:stop], t) for v, t in piece]
            g = parts[0] if len(parts) == 1 else np.hstack(parts)
            _check_rows_finite(g, start, "matrix: row {} is not finite (NaN or Inf)")
            product = self._layer_product(g, layer, stream, k_rows, k_cols, threads)
            overflowed = np.flatnonzero(~_finite_rows(product))
            if overflowed.size:
                product[overflowed] = self._rescaled_layer_product(
                    g[overflowed], layer, stream, k_rows, k_cols, threads
                )
            _check_rows_finite(product, start, _OVERFLOW)
            out[start:stop, : k_rows * k_cols] = product

    def _layer_product(
        self, g: np.ndarray, layer: LayerMatrix, stream: int, k_rows: int, k_cols: int, threads: int
    ) -> np.ndarray:
        """(n, k_rows * k_cols) float32: P_rows G P_cols^T of each (finite, float32) row of g, flattened
        row-major; rows whose products overflow float32 are not finite."""
        rows, cols = layer.rows, layer.cols + int(layer.bias)
        n, weights = g.shape[0], layer.rows * layer.cols
        w = g[:, :weights].reshape(n * (layer.cols if layer.transposed else rows), -1)
        bias = [np.ascontiguousarray(g[:, weights:])] if layer.bias else []
        if layer.transposed:  # G's columns are contiguous: P_rows first, giving P_rows G row by row
            left = self._times([w], stream, k_rows, rows, threads).reshape(n, layer.cols, k_rows)
            if bias:
                left = np.concatenate([left, self._times(bias, stream, k_rows, rows, threads)[:, None]], axis=1)
            left = np.ascontiguousarray(left.transpose(0, 2, 1)).reshape(n * k_rows, cols)
            return self._times([left], stream + 1, k_cols, cols, threads).reshape(n, k_rows * k_cols)
        # G's rows are contiguous: P_cols first, then P_rows on the columns of G P_cols^T
        right = self._times([w, *(b.reshape(n * rows, 1) for b in bias)], stream + 1, k_cols, cols, threads)
        right = np.ascontiguousarray(right.reshape(n, rows, k_cols).transpose(0, 2, 1))
        both = self._times([right.reshape(n * k_cols, rows)], stream, k_rows, rows, threads)
        return both.reshape(n, k_cols, k_rows).transpose(0, 2, 1).reshape(n, k_rows * k_cols)

    def _rescaled_layer_product(
        self, g: np.ndarray, layer: LayerMatrix, stream: int, k_rows: int, k_cols: int, threads: int
    ) -> np.ndarray:
        """`_layer_product` of finite rows whose product overflowed float32 on the way (the first
        product, or the kernel's unscaled sums, can pass FLT_MAX while P_rows G P_cols^T does not):
        each row is taken times 2^-s, s the least shift that keeps every sum of both products below
        2^126 (|entry| < 8, so |sums| <= rows * 8 * cols * 8 * max|g|), and the result times 2^s.
        Powers of two commute with rounding, so this is the float32 result of the same products with
        an unbounded exponent (the entries 2^-s takes below the normal range excepted, which the large
        ones dominate). A result beyond float32 even so stays infinite, for the caller to name."""
        rows, cols = layer.rows, layer.cols + int(layer.bias)
        bound_bits = math.ceil(math.log2(rows * 8)) + math.ceil(math.log2(cols * 8))
        _, exponent = np.frexp(np.abs(g).max(axis=1).astype(np.float64))  # max|g| < 2^exponent
        shift = np.maximum(1, exponent.astype(np.int64) + bound_bits - 126)[:, None]
        scaled = np.ldexp(g.astype(np.float64), -shift).astype(np.float32)  # one rounding (subnormals only)
        product = self._layer_product(scaled, layer, stream, k_rows, k_cols, threads)
        with np.errstate(over="ignore"):
            return np.ldexp(product, shift.astype(np.int32))  # exact, or +-inf beyond float32

    def _times(self, views: list[np.ndarray], stream: int, k: int, side: int, threads: int) -> np.ndarray:
        """(m, k) float32: the (m, side) float32 columns of `views` side by side times P^T, P the (k, side)
        matrix of `stream` (layer_factors' factor; the identity when k == side). A non-finite result is
        returned as it is, for the caller to name its row."""
        if k == side:
            return views[0] if len(views) == 1 else np.hstack(views)
        out = np.empty((views[0].shape[0], k), dtype=np.float32)
        try:
            self._project([(v, "float32") for v in views], stream, k, 0, out, threads)
        except ValueError:  # a non-finite result (the kernel's check after filling out): the caller names the row
            if np.isfinite(out).all():
                raise
        return out

    def _project(
        self, views: list[_View], stream: int, dim: int, column_offset: int, out: np.ndarray, threads: int
    ) -> None:
        nonzeros = min(SPARSE_NONZEROS, dim)
        pieces = (False, [v for v, _ in views], [DTYPE_CODES[t] for _, t in views])
        try:
            _core.project(
                KINDS[self.kind],
                self.seed,
                stream,
                dim,
                nonzeros,
                pieces,
                column_offset,
                out,
                num_threads=capped_threads(threads),  # at most the usable cores, as in scoring
            )
        except ValueError as e:  # a non-finite result: out is filled, the row the kernel names is kept
            if str(e).startswith("the projection of row"):
                _check_rows_finite(out, 0, _OVERFLOW)
            raise

    # --- the spec: stored with projected gradients, compared when more are projected later ---

    def to_dict(self) -> dict:
        """A JSON-able spec; `Projection.from_dict` rebuilds the same matrix."""
        return {
            "type": "tracin.Projection",
            "generator": GENERATOR_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "per_layer": self.per_layer,
            **({"kronecker": True} if self.kronecker else {}),  # absent when False: older specs stay valid
        }

    @classmethod
    def from_dict(cls, spec: dict) -> Projection:
        if not isinstance(spec, dict) or spec.get("type") != "tracin.Projection":
            raise ValueError(f"not a tracin.Projection spec: {short(spec)}")
        if spec.get("generator") != GENERATOR_VERSION:
            raise ValueError(
                f"projection spec from generator version {short(spec.get('generator'))}; this "
                f"tracin generates version {GENERATOR_VERSION} and cannot reproduce it: use the "
                "tracin that wrote it, or export again with this one"
            )
        missing = {"kind", "dim", "seed", "per_layer"} - spec.keys()
        if missing:
            raise ValueError(f"projection spec lacks {sorted(missing)}")
        return cls(
            spec["dim"], spec["seed"], spec["kind"], per_layer=spec["per_layer"], kronecker=spec.get("kronecker", False)
        )

    def check_compatible(
        self, other: Projection | dict | None, what: str = "the other side", this: str | None = None
    ) -> None:
        """Raises ValueError naming every field in which `other` (a Projection, its spec, or None
        for unprojected gradients) differs from this projection. `what` names the side `other` is
        of in the message; `this`, if given, the side of this projection (else "here", "this side")."""
        if other is None:
            mine = "this side" if this is None else this
            raise ValueError(f"projection mismatch: {what} is not projected, {mine} uses {self!r}")
        here = "here" if this is None else f"in {this}"
        spec = other.to_dict() if isinstance(other, Projection) else other
        if not isinstance(spec, dict):
            raise TypeError(f"expected a Projection or its spec dict, got {type(spec).__name__}")
        mine = {**self.to_dict(), "kronecker": self.kronecker}
        spec = {**spec, "kronecker": spec.get("kronecker", False)}
        diffs = [
            f"{key}: {short(mine[key])} {here}, {short(spec.get(key, '<missing>'))} in {what}"
            for key in mine
            if spec.get(key, "<missing>") != mine[key]
        ]
        if diffs:
            raise ValueError(
                "projection mismatch (projected gradients are only comparable under "
                "the same projection): " + "; ".join(diffs)
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Projection) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.kind, self.dim, self.seed, self.per_layer, self.kronecker))

    def __repr__(self) -> str:
        extra = (", per_layer=True" if self.per_layer else "") + (", kronecker=True" if self.kronecker else "")
        return f"Projection(dim={self.dim}, seed={self.seed}, kind={self.kind!r}{extra})"


def _width(segment: Segment) -> int:
    return segment.width if isinstance(segment, LayerMatrix) else segment


def _layer(layer: Any, name: str) -> LayerMatrix:
    """A LayerMatrix from itself or its to_dict(); TypeError naming `name` for anything else."""
    if isinstance(layer, dict):
        try:
            return LayerMatrix(**layer)
        except TypeError as e:
            raise TypeError(f"{name}: {short(layer)} is not a LayerMatrix spec ({short(e)})") from None
    if not isinstance(layer, LayerMatrix):
        raise TypeError(f"{name} must be a LayerMatrix (or its to_dict()), got {type(layer).__name__}")
    return layer


def _check_rows_finite(a: np.ndarray, start: int, message: str) -> None:
    """NonFiniteRowError(message, row) for the first row of a (n, m) holding NaN or Inf, rows numbered
    from `start`."""
    finite = _finite_rows(a)
    if not finite.all():
        raise NonFiniteRowError(message, start + int(np.argmin(finite)))


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """(n,) bool: which rows of a (n, m) hold no NaN or Inf, found by row maxima and minima (NaN
    propagates), without an (n, m) temporary."""
    if a.shape[1] == 0:
        return np.ones(a.shape[0], bool)
    return np.isfinite(a.max(axis=1)) & np.isfinite(a.min(axis=1))


def _widened(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A kernel view as float32 (bfloat16 bits widened exactly; float32 not copied)."""
    return bfloat16_bits_to_float32(arr) if dtype == "bfloat16" else arr.astype(np.float32, copy=False)


def _factor(kind: str, seed: int, stream: int, dim: int, d: int) -> np.ndarray:
    """P (dim, d) float32 of one stream, read-only, kept in a cache of at most _FACTOR_CACHE_BYTES (the
    least recently used dropped first; a larger factor is not kept), so that the factors of an export's
    checkpoints are built once without holding memory for the life of the process."""
    key = (kind, seed, stream, dim, d)
    with _FACTOR_LOCK:
        if key in _FACTOR_CACHE:
            _FACTOR_CACHE.move_to_end(key)
            return _FACTOR_CACHE[key]
    p = _build_factor(kind, seed, stream, dim, d)
    with _FACTOR_LOCK:
        if p.nbytes <= _FACTOR_CACHE_BYTES:
            _FACTOR_CACHE[key] = p
            while sum(f.nbytes for f in _FACTOR_CACHE.values()) > _FACTOR_CACHE_BYTES:
                _FACTOR_CACHE.popitem(last=False)
    return p


def _build_factor(kind: str, seed: int, stream: int, dim: int, d: int) -> np.ndarray:
    """`_factor` computed: the projections of the unit vectors, a block of the identity at a time
    (column offsets), so memory stays O(dim * d); the identity when dim == d."""
    if dim == d:
        p = np.eye(d, dtype=np.float32)
        p.flags.writeable = False
        return p
    out = np.empty((d, dim), dtype=np.float32)
    nonzeros = min(SPARSE_NONZEROS, dim)
    for start in range(0, d, _IDENTITY_ROWS):
        rows = min(_IDENTITY_ROWS, d - start)
        eye = np.eye(rows, dtype=np.float32)
        pieces = (False, [eye], [DTYPE_CODES["float32"]])
        _core.project(KINDS[kind], seed, stream, dim, nonzeros, pieces, start, out[start : start + rows])
    p = np.ascontiguousarray(out.T)
    p.flags.writeable = False
    return p
