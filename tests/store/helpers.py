"""Small builders shared by the store tests."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

import tracin
from store_files import write_with_nonfinite

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def random_blocks(n: int, dims: list, dtype: str, factored: bool, seed: int = 0) -> list:
    """Per checkpoint an (n, d) array, or a (left, right) pair, of the given dtype (NumPy/ml_dtypes)."""
    rng = np.random.default_rng(seed)
    cast = NUMPY_DTYPES[dtype]
    if factored:
        return [(rng.standard_normal((n, p)).astype(cast), rng.standard_normal((n, q)).astype(cast)) for p, q in dims]
    return [rng.standard_normal((n, d)).astype(cast) for d in dims]


def write_store(
    path: Path, blocks: list, weights=None, dtype: str = "float32", factored: bool = False, step: int = 10, **kwargs
) -> tracin.GradientStore:
    """A finished store holding `blocks`, written in row blocks of `step`, checkpoints interleaved.
    NaN / Inf values, which writers refuse, are planted into the data files (write_with_nonfinite),
    for tests of how readers and scoring treat such a store."""
    n = len(blocks[0][0] if factored else blocks[0])
    dims = [(b[0].shape[1], b[1].shape[1]) if factored else b.shape[1] for b in blocks]
    writer = tracin.GradientStore.create(path, n, dims, weights, dtype, factored=factored, **kwargs)
    for start in range(0, n, step):
        for c, b in enumerate(blocks):
            part = (b[0][start : start + step], b[1][start : start + step]) if factored else b[start : start + step]
            write_with_nonfinite(writer, c, start, part)
    return writer.finalize()


def in_memory(blocks: list, weights=None, factored: bool = False):
    if factored:
        return tracin.FactoredGradients([left for left, _ in blocks], [r for _, r in blocks], weights)
    return tracin.Gradients(blocks, weights)


def read_rows(store: tracin.GradientStore) -> list[np.ndarray]:
    """Every block of the store as an in-memory copy (bfloat16 as uint16 bits)."""
    _, blocks, _ = store.kernel_side()
    return [np.array(b) for b in blocks]
