"""Where exported rows go: in memory (Gradients / FactoredGradients) or a GradientStore on disk.

A sink takes per checkpoint c blocks of rows (CPU tensors in the stored dtype; a (left, right) pair
when factored) at a start row, and says how many leading rows of a checkpoint are already done.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..gradients import FactoredGradients, Gradients

Block = Any  # torch.Tensor (rows, d) or a (left, right) pair of them


class MemorySink:
    """Collects rows in memory: preallocated when the row count is known, else concatenated."""

    complete = False

    def __init__(self, n_rows: int | None, n_checkpoints: int, factored: bool, weights: list[float],
                 metadata: dict):
        self.n_rows, self.factored = n_rows, factored
        self.weights, self.metadata = weights, metadata
        self._parts: list[list[tuple[int, Block]]] = [[] for _ in range(n_checkpoints)]
        self._full: list[list[torch.Tensor] | None] = [None] * n_checkpoints

    def rows_done(self, checkpoint: int) -> int:
        return 0

    def destination(self, checkpoint: int, start: int, rows: int, width: int,
                    dtype: torch.dtype) -> torch.Tensor | None:
        """Where rows [start, start + rows) of a full checkpoint will be kept, for writing in place
        (None when the rows are collected another way)."""
        if self.factored or self.n_rows is None:
            return None
        if self._full[checkpoint] is None:
            self._full[checkpoint] = [torch.empty((self.n_rows, width), dtype=dtype)]
        full = self._full[checkpoint][0]
        return full[start:start + rows] if full.dtype == dtype and full.shape[1] == width else None

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        pieces = block if self.factored else (block,)
        if self.n_rows is None:
            self._parts[checkpoint].append((start, pieces))
            return
        if self._full[checkpoint] is None:
            self._full[checkpoint] = [torch.empty((self.n_rows, p.shape[1]), dtype=p.dtype) for p in pieces]
        for dest, p in zip(self._full[checkpoint], pieces):
            dest[start:start + p.shape[0]] = p

    def finish(self) -> Gradients | FactoredGradients:
        per_ckpt = []
        for c, full in enumerate(self._full):
            if full is None:  # row count was unknown: join the pieces in row order
                pieces = [p for _, p in sorted(self._parts[c], key=lambda sp: sp[0])]
                full = [torch.cat([p[k] for p in pieces]) for k in range(len(pieces[0]))]
            per_ckpt.append(full)
        if self.factored:
            return FactoredGradients([f[0] for f in per_ckpt], [f[1] for f in per_ckpt], self.weights,
                                     metadata=self.metadata)
        return Gradients([f[0] for f in per_ckpt], self.weights, metadata=self.metadata)


class StoreSink:
    """Writes rows into a GradientStore as they come; reopening the same spec resumes it."""

    def __init__(self, path: str | os.PathLike, n_rows: int | None, dims: list, dtype: str, factored: bool,
                 weights: list[float], metadata: dict):
        from ..store import GradientStore

        if n_rows is None:
            raise ValueError(
                "store= needs the number of examples up front, and it cannot be known for this data: "
                "pass (inputs, targets) tensors, a Dataset or DataLoader with len(), or a list of batches")
        self.factored = factored
        self._writer = GradientStore.create(path, n_rows, dims, weights=weights, dtype=dtype,
                                            factored=factored, metadata=metadata)

    @property
    def complete(self) -> bool:
        return self._writer.complete

    def rows_done(self, checkpoint: int) -> int:
        return self._writer.rows_done(checkpoint)

    def write(self, checkpoint: int, start: int, block: Block) -> None:
        self._writer.write(checkpoint, start, block)

    def finish(self):
        return self._writer.finalize()
