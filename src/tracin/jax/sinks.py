"""Where exported gradient rows go: memory (Gradients / FactoredGradients) or a GradientStore."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..gradients import FactoredGradients, Gradients

Block = Any  # (rows, d) array, or a (left (rows, p), right (rows, q)) pair when factored


class MemorySink:
    """Collects each checkpoint's blocks and joins them into one in-memory gradient set."""

    def __init__(self, n_checkpoints: int, factored: bool):
        self._parts: list[list[Block]] = [[] for _ in range(n_checkpoints)]
        self._factored = factored

    def rows_done(self, checkpoint: int) -> int:
        return 0

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        self._parts[checkpoint].append(block)

    def close(self) -> None:
        self._parts = []

    def finish(self, weights: list[float], metadata: dict) -> Gradients | FactoredGradients:
        if self._factored:
            left = [np.concatenate([l for l, _ in parts]) for parts in self._parts]
            right = [np.concatenate([r for _, r in parts]) for parts in self._parts]
            return FactoredGradients(left, right, weights, metadata=metadata)
        return Gradients([np.concatenate(parts) for parts in self._parts], weights, metadata=metadata)


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
