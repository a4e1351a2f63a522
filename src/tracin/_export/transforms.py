"""Row transforms: what happens to each batch of exported rows on the host, between the framework's
gradients and the sink: optimizer preconditioning (preconditioner.py), then random projection.

A transform maps a block (rows, d) float32 -> (rows, d') float32, or a factored (left (rows, p),
right (rows, q)) pair -> another pair, row by row (so any split of the rows into batches gives the
same result). The export driver applies a list of them in order, telling each which checkpoint and
sink slot (the layer, when factored; 0 for full rows) the rows are of (a preconditioner uses that
checkpoint's optimizer state); each records itself in the metadata under its `key`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .projection import project, projected_dims

Dims = Any  # int d, or (p, q) when factored
Block = Any  # (rows, d) array, or a (left (rows, p), right (rows, q)) pair when factored


class RowTransform(Protocol):
    """One step of the chain: `dims` maps the widths it is given to the widths it returns, `apply`
    a host block of checkpoint `checkpoint` (its index in the list) and slot `slot` to the transformed block,
    `to_dict` what the metadata records under `key`."""

    key: str

    def dims(self, dims: Dims) -> Dims: ...

    def apply(self, block: Block, checkpoint: int, slot: int) -> Block: ...

    def to_dict(self) -> dict: ...


class Projected:
    """A tracin.Projection as a row transform; `segments` are the parameter widths of a full row
    (for per-layer projections), None when factored."""

    key = "projection"

    def __init__(self, projection: Any, segments: Sequence[int] | None):
        self.projection, self.segments = projection, segments

    def dims(self, dims: Dims) -> Dims:
        return projected_dims(self.projection, dims, self.segments)

    def apply(self, block: Block, checkpoint: int, slot: int) -> Block:
        return project(self.projection, block, self.segments)

    def to_dict(self) -> dict:
        return self.projection.to_dict()


class Recorded:
    """A step the adapter has already taken while computing the rows (tracin.torch's per-token Kronecker
    projection, with the preconditioning folded into it): rows pass unchanged, the metadata records
    `spec` under `key` as for the host transform it replaces."""

    def __init__(self, key: str, spec: dict, dims: Dims):
        self.key, self.spec, self._dims = key, spec, dims

    def dims(self, dims: Dims) -> Dims:
        return self._dims

    def apply(self, block: Block, checkpoint: int, slot: int) -> Block:
        return block

    def to_dict(self) -> dict:
        return self.spec


def row_transforms(projection: Any, segments: Sequence[int] | None) -> list[RowTransform]:
    """The chain an export applies, in order, from its options."""
    return [] if projection is None else [Projected(projection, segments)]


def chained_dims(transforms: Sequence[RowTransform], dims: Dims) -> Dims:
    """The widths a block of `dims` has after every transform."""
    for t in transforms:
        dims = t.dims(dims)
    return dims


def apply_all(transforms: Sequence[RowTransform], block: Block, checkpoint: int, slot: int) -> Block:
    """`block` (rows of checkpoint `checkpoint`, sink slot `slot` of it) through every transform, in order."""
    for t in transforms:
        block = t.apply(block, checkpoint, slot)
    return block
