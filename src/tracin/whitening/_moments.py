"""Streaming second moments of gradient rows, one pass over any gradient set (in memory or a store).

Full gradients: per checkpoint R_c = G_c^T G_c / n (d_c, d_c). Factored gradients: per checkpoint
the Kronecker factors B_c = E[left left^T] (p_c, p_c) and A_c = E[right right^T] (q_c, q_c).
Each block of at most BLOCK_ROWS rows is multiplied by BLAS (G^T G as a symmetric rank-k update,
multithreaded) and its partial sum added into a float64 accumulator. precision="float32" multiplies
in float32, as fast as NumPy's own float32 G.T @ G: the rounding of a partial stays within about
BLOCK_ROWS * 2^-24 * sum_i |g_ia g_ib| per entry (typically sqrt(BLOCK_ROWS) times less) and does
not grow with the number of blocks. A float32 partial that overflows, or of a block with a non-zero
column whose largest |value| is below TINY_PEAK (its products near float32's subnormal range), is
multiplied again with each column scaled by a power of two to a peak in [0.5, 1) and scaled back in
float64: exact, so the same bound holds at any finite scale, also for columns of mixed scales.
precision="float64" multiplies in float64 (exact products of the float32 values, float64 sums) at
about half the speed. NaN or Inf in a block raises the kernel's error, naming the
side, block and first rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import DTYPE_CODES
from .._memory import process_memory
from .._progress import check_progress, progress_bar
from ..gradients import GradientSet, non_finite_message, non_finite_rows
from ..store._convert import bfloat16_bits_to_float32
from ..store._store import _human

BLOCK_ROWS = 4096  # rows per float32 partial: large enough for BLAS to run at full speed (benchmarks/whitening.py)
BLOCK_BYTES = 128 * 2**20  # at most this many bytes of float32 rows per partial (wide rows get fewer rows)
RAM_FRACTION = 0.5  # default memory budget: this share of the memory the process may use
UNREPORTED_MEMORY_BUDGET = 8 * 2**30  # the default budget where the OS reports neither memory nor a limit
TINY_PEAK = 2.0**-50  # a block with a non-zero column peak below this has its float32 partial redone scaled
PRECISIONS = {"float32": np.float32, "float64": np.float64}  # the dtype of the block products


def default_max_bytes() -> int:
    """RAM_FRACTION of the memory this process may use in bytes (tracin._memory.process_memory: the least of
    physical memory, its cgroup's memory limit and RLIMIT_AS, where set), or UNREPORTED_MEMORY_BUDGET (8 GiB)
    where the OS reports none of them."""
    memory = process_memory()
    return UNREPORTED_MEMORY_BUDGET if memory is None else int(RAM_FRACTION * memory)


def matrix_sides(s: GradientSet) -> list[int]:
    """Side length of every accumulated matrix, in kernel block order (d_c, or p_c and q_c)."""
    return [int(x) for d in s.dims for x in (d if s.factored else (d,))]


def matrix_bytes(sides: list[int], copies: int, work: int) -> int:
    """Bytes of `copies` float64 sets of (side, side) matrices plus `work` more of the largest."""
    return 8 * (copies * sum(k * k for k in sides) + work * max(sides) ** 2)


def check_budget(sides: list[int], copies: int, max_bytes: int) -> None:
    """ValueError when `copies` float64 sets of (side, side) matrices plus the inversion's work
    space (three more of the largest) exceed max_bytes; it gives both in bytes and in units by size
    (store._store._human) and the max_bytes that would be enough."""
    need = matrix_bytes(sides, copies, 3)
    if need > max_bytes:
        raise ValueError(
            f"whitening keeps a float64 d x d matrix per checkpoint: dims {sides} need {need:,} bytes "
            f"({_human(need)}), above max_bytes={max_bytes} ({_human(max_bytes)}); project the gradients to "
            "fewer dimensions first (tracin.Projection, projection= on the exports), use factored gradients "
            f"(Kronecker-factored whitening), or raise max_bytes to at least {need}"
        )


def row_ranges(s: GradientSet, chunked: bool = True) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of `s` read at once: at most BLOCK_ROWS rows, BLOCK_BYTES of float32
    rows of the widest block, and (chunked) the set's own row_chunks() (a store maps that many rows per
    read). chunked=False: the ranges of second_moments' block products, the same for any chunk_bytes."""
    step = max(1, min(BLOCK_ROWS, BLOCK_BYTES // (4 * max(matrix_sides(s)))))
    if chunked and s.row_chunks():
        step = min(step, s.row_chunks())
    return [(a, min(a + step, s.n_rows)) for a in range(0, s.n_rows, step)]


def second_moments(s: GradientSet, bar: Any, precision: str, name: str = "train") -> list[np.ndarray]:
    """float64 (k, k) matrices E[x x^T] over the rows of `s` (called `name` in errors), one per kernel
    block, from block products in `precision` (see module docstring); `bar` advances by the rows done."""
    sides = matrix_sides(s)
    acc = [np.zeros((k, k)) for k in sides]
    chunk = s.row_chunks()
    for start, stop in row_ranges(s, chunked=False):
        if chunk and chunk < stop - start:
            # A store read in pieces smaller than a block product (a small chunk_bytes): the kernel blocks' rows
            # gathered into float32 buffers, so that R's products, and so its bits, are those of any chunk_bytes,
            # and a block's d x d product and float64 sum are not paid per piece (256 KiB pieces of 2048-wide
            # rows made the fit 13x slower). Blocks are gathered in groups of at most BLOCK_BYTES of buffers
            # (one block always fits: row_ranges), each group in one pass over the pieces: a piece read per
            # block would map (or read) every block's rows once per block.
            for group in _groups(sides, stop - start):
                xs = {b: np.empty((stop - start, sides[b]), dtype=np.float32) for b in group}
                for a in range(start, stop, chunk):
                    side = s.kernel_side(a, min(a + chunk, stop))
                    for b, x in xs.items():
                        x[a - start : a - start + chunk] = as_float32(side.blocks[b], side.dtypes[b])
                    del side
                for b in group:
                    _add_product(acc[b], xs.pop(b), precision, s, name)  # each buffer freed once multiplied
        else:
            side = s.kernel_side(start, stop)
            for total, block, code in zip(acc, side.blocks, side.dtypes, strict=True):
                _add_product(total, as_float32(block, code), precision, s, name)
            del side
        bar.update(stop - start)
    for total in acc:
        total /= s.n_rows
    return acc


def _groups(sides: list[int], rows: int) -> list[list[int]]:
    """Kernel block indices in order, cut into runs whose float32 (rows, side) buffers take at most
    BLOCK_BYTES together (a block above that alone in its run)."""
    groups: list[list[int]] = []
    used = BLOCK_BYTES
    for b, k in enumerate(sides):
        size = 4 * rows * k
        if used + size > BLOCK_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(b)
        used += size
    return groups


def _add_product(total: np.ndarray, x: np.ndarray, precision: str, s: GradientSet, name: str) -> None:
    """Adds the float64 x^T x of the float32 (rows, k) block x, multiplied in `precision`, into `total`;
    non_finite_error of `s` (called `name`) if x holds NaN or Inf."""
    if precision == "float64":
        x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # checked below
        product = x.T @ x  # NumPy computes a.T @ a as a symmetric rank-k update (half the work)
    finite = bool(np.isfinite(product).all())
    if not finite and (precision == "float64" or not np.isfinite(x).all()):
        raise non_finite_error(s, name)
    if precision == "float32" and not (finite and _no_tiny_column(x)):
        product = scaled_gram(x)
    total += product


def _no_tiny_column(x: np.ndarray) -> bool:
    """True unless a column of the float32 (n, k) block x is non-zero with its peak below TINY_PEAK."""
    peaks = np.maximum(x.max(axis=0, initial=0.0), -x.min(axis=0, initial=0.0))
    return not np.any((peaks > 0) & (peaks < TINY_PEAK))


def scaled_gram(x: np.ndarray) -> np.ndarray:
    """float64 x^T x of a finite float32 (n, k) block from a float32 product of x with each column scaled
    by a power of two to a peak in [0.5, 1), scaled back in float64 (every scaling exact)."""
    exponents = np.frexp(np.maximum(x.max(axis=0), -x.min(axis=0)))[1]
    y = np.ldexp(x, -exponents)
    product = (y.T @ y).astype(np.float64)
    scale = np.ldexp(1.0, exponents)
    product *= scale[:, None]
    product *= scale
    return product


def finite_float32(s: GradientSet, name: str, start: int, stop: int) -> list[np.ndarray]:
    """The kernel blocks of rows [start, stop) of `s` as float32 arrays (as_float32); ValueError
    (non_finite_error) if one holds NaN or Inf."""
    side = s.kernel_side(start, stop)
    blocks = [as_float32(block, code) for block, code in zip(side.blocks, side.dtypes, strict=True)]
    if not all(np.isfinite(x).all() for x in blocks):
        raise non_finite_error(s, name)
    return blocks


def non_finite_error(s: GradientSet, name: str) -> ValueError:
    """The C++ kernel's error for the first block of `s` holding NaN or Inf, with its first five rows
    (`s` read again, row range by row range)."""
    for b in range(len(matrix_sides(s))):
        rows: list[int] = []
        for start, stop in row_ranges(s):
            side = s.kernel_side(start, stop)
            rows.extend(start + r for r in non_finite_rows(side.blocks[b], side.dtypes[b], 5 - len(rows)))
            if len(rows) == 5:
                break
        if rows:
            return ValueError(non_finite_message(name, s.factored, b, rows))
    return ValueError(f"{name} contains NaN or Inf values")


def as_float32(block: np.ndarray, code: int) -> np.ndarray:
    """A C-contiguous, aligned float32 array of a kernel block (float32 kept as is unless byte-misaligned,
    float16 / bfloat16 bits converted): NumPy's matmul hands misaligned arrays to its own loop, not BLAS,
    whose other summation order would change R's bits for the same rows."""
    if code == DTYPE_CODES["bfloat16"]:
        return bfloat16_bits_to_float32(np.asarray(block))
    return np.require(block, dtype=np.float32, requirements=["C", "A"])


def check_precision(precision: Any) -> str:
    """`precision` if it names a block product dtype (TypeError / ValueError naming the argument)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise (ValueError if isinstance(precision, str) else TypeError)(
            f"precision must be 'float32' or 'float64' (the block products' dtype), got {precision!r}"
        )
    return precision


def fit_bar(total: int, progress: bool | None) -> Any:
    """The progress bar over the rows a fit reads."""
    check_progress(progress)
    return progress_bar(total, progress, "tracin whitening fit", unit="row")
