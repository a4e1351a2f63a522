"""Where exported gradient rows go: memory (Gradients / FactoredGradients) or a GradientStore."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..gradients import FactoredGradients, Gradients

Block = Any  # (rows, d) array, or a (left (rows, p), right (rows, q)) pair when factored


class MemorySink:
    """Keeps each checkpoint's rows in memory: written into preallocated arrays when the row count
    is known (no second copy at the end), else collected and joined in row order."""

    def __init__(self, n_checkpoints: int, factored: bool, n_rows: int | None = None):
        self._parts: list[list[tuple[int, Block]]] = [[] for _ in range(n_checkpoints)]
        self._full: list[tuple[np.ndarray, ...] | None] = [None] * n_checkpoints
        self._factored, self._n_rows = factored, n_rows

    def rows_done(self, checkpoint: int) -> int:
        return 0

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        pieces = block if self._factored else (block,)
        if self._n_rows is None:
            self._parts[checkpoint].append((start, pieces))
            return
        if self._full[checkpoint] is None:
            self._full[checkpoint] = tuple(np.empty((self._n_rows, p.shape[1]), p.dtype) for p in pieces)
        for dest, p in zip(self._full[checkpoint], pieces):
            dest[start:start + p.shape[0]] = p

    def close(self) -> None:
        self._parts, self._full = [], []

    def finish(self, weights: list[float], metadata: dict) -> Gradients | FactoredGradients:
        per_ckpt = []
        for full, parts in zip(self._full, self._parts):
            if full is None:
                pieces = [p for _, p in sorted(parts, key=lambda sp: sp[0])]
                full = tuple(np.concatenate([p[k] for p in pieces]) for k in range(len(pieces[0])))
                parts.clear()
            per_ckpt.append(full)
        if self._factored:
            return FactoredGradients([f[0] for f in per_ckpt], [f[1] for f in per_ckpt], weights, metadata=metadata)
        return Gradients([f[0] for f in per_ckpt], weights, metadata=metadata)


class StoreSink:
    """Writes blocks into a GradientStore as they come; reopening the same spec resumes it."""

    def __init__(self, path: str | os.PathLike, n_rows: int, dims: list, weights: list[float], dtype: str,
                 factored: bool, metadata: dict):
        from .. import GradientStore

        self._writer = GradientStore.create(path, n_rows, dims, weights, dtype, factored=factored,
                                            metadata=metadata)
        self._n_rows = n_rows

    def rows_done(self, checkpoint: int) -> int:
        return self._n_rows if self._writer.complete else self._writer.rows_done(checkpoint)

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        self._writer.write(checkpoint, start, block)

    def close(self) -> None:
        """Releases the store after a failure; the rows written so far stay for a resume."""
        self._writer.close()

    def finish(self, weights: list[float], metadata: dict):
        return self._writer.finalize()
