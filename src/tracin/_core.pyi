"""Type stub of tracin._core, the pybind11 module over the C++ kernel (csrc/python/bindings.cpp).

Internal: use the functions of the tracin package. A side is (factored, blocks, dtype codes):
full gradients one (rows, d_c) block per checkpoint, factored ones (left_0, right_0, left_1, ...);
blocks are 2-D buffers with contiguous rows in native byte order, of the format their code names
(0 float32; 1 float16, or its uint16 bits; 2 bfloat16 as uint16 bits; another is a ValueError).
Every call releases the GIL and answers Ctrl-C (KeyboardInterrupt) within about 0.1 s
(about a second for a top_k of tens of millions of kept candidates per row).
Errors: ValueError (bad input, NaN / Inf, float32 overflow), MemoryError, RuntimeError.
isa: "auto", "generic", "avx2" or "avx512"; a set the CPU lacks runs as resolve_isa(isa).
normalize: 0 plain scores; L > 0 cosine scores, each row unit-normalised over every run of L
consecutive checkpoints (float64 norms, a zero gradient scores 0); L must divide the checkpoints.
"""

from collections.abc import Sequence
from typing import SupportsFloat, SupportsIndex

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

Side = tuple[bool, Sequence[Buffer], Sequence[SupportsIndex]]

def scores(
    test: Side,
    train: Side,
    weights: Sequence[SupportsFloat],
    *,
    num_threads: SupportsIndex = 0,
    train_block: SupportsIndex = 0,
    test_block: SupportsIndex = 0,
    isa: str = "auto",
    normalize: SupportsIndex = 0,
) -> npt.NDArray[np.float32]:
    """Dense scores, float32 (test rows, train rows)."""

def top_k(
    test: Side,
    train: Side,
    weights: Sequence[SupportsFloat],
    k: SupportsIndex,
    side: SupportsIndex,
    *,
    num_threads: SupportsIndex = 0,
    train_block: SupportsIndex = 0,
    test_block: SupportsIndex = 0,
    isa: str = "auto",
    normalize: SupportsIndex = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(proponent values, proponent indices, opponent values, opponent indices), each (m, k);
    side 0 proponents, 1 opponents, 2 both; a side not asked for is (0, k). 0 <= k <= train rows
    (a ValueError before any output is made)."""

def self_influence(
    train: Side,
    weights: Sequence[SupportsFloat],
    *,
    num_threads: SupportsIndex = 0,
    train_block: SupportsIndex = 0,
    test_block: SupportsIndex = 0,
    isa: str = "auto",
    normalize: SupportsIndex = 0,
) -> npt.NDArray[np.float32]:
    """float32 (train rows,): sum_c w_c |g_c(i)|^2; normalize must be 0."""

def aggregate(
    test: Side,
    train: Side,
    weights: Sequence[SupportsFloat],
    *,
    num_threads: SupportsIndex = 0,
    train_block: SupportsIndex = 0,
    test_block: SupportsIndex = 0,
    isa: str = "auto",
    normalize: SupportsIndex = 0,
) -> npt.NDArray[np.float64]:
    """float64 (train rows,): influence of each train row summed over the test rows."""

def column_sums(
    test: Side,
    sums: Sequence[Buffer],
    *,
    num_threads: SupportsIndex = 0,
    train_block: SupportsIndex = 0,
    test_block: SupportsIndex = 0,
    isa: str = "auto",
    normalize: SupportsIndex = 0,
) -> None:
    """Full gradients' aggregate, first step: adds the test rows (each times its inverse norm over
    each run for normalize) to sums, one writable contiguous float64 (d_c,) array per checkpoint,
    each column in row order (threads take bands of columns): sums carried over chunks of rows in
    order get the bits of one call over all of them. Factored sides are refused."""

def aggregate_sums(
    sums: Sequence[Buffer],
    train: Side,
    weights: Sequence[SupportsFloat],
    *,
    num_threads: SupportsIndex = 0,
    train_block: SupportsIndex = 0,
    test_block: SupportsIndex = 0,
    isa: str = "auto",
    normalize: SupportsIndex = 0,
) -> npt.NDArray[np.float64]:
    """Full gradients' aggregate, second step: float64 (train rows,), each row's dot products with the
    column sums of column_sums times the weights; with every test row summed, aggregate's bits."""

def project(
    kind: SupportsIndex,
    seed: SupportsIndex,
    stream: SupportsIndex,
    dim: SupportsIndex,
    nonzeros: SupportsIndex,
    pieces: Side,
    column_offset: SupportsIndex,
    out: Buffer,
    *,
    num_threads: SupportsIndex = 0,
    isa: str = "auto",
) -> None:
    """Writes into out, a writable float32 (rows, dim) buffer with contiguous rows, the random
    projection of the column-wise concatenation of pieces (not factored) whose first column is
    column column_offset of the matrix; kind 0 rademacher, 1 gaussian, 2 sparse."""

def detect_isa() -> str:
    """The instruction set the kernel uses on this CPU: "avx512", "avx2" or "generic"."""

def resolve_isa(isa: str) -> str:
    """The instruction set a call with isa=... runs with on this CPU."""
