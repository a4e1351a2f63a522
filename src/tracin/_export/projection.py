"""Random projection of exported rows on the host (a tracin.Projection), and the widths it gives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..projection import Projection


def check_projection(projection: Any, factored: bool) -> None:
    """TypeError unless `projection` is None or has what the mode needs (.apply or .apply_factored,
    and .to_dict for the metadata)."""
    need = "apply_factored" if factored else "apply"
    if projection is not None and not (
        callable(getattr(projection, need, None)) and callable(getattr(projection, "to_dict", None))
    ):
        raise TypeError(
            f"projection must be a tracin.Projection (with .{need} and .to_dict), got {type(projection).__name__}"
        )


def project(projection: Any, block: Any, segments: Sequence[int] | None) -> Any:
    """A host block projected: (rows, d) float32 -> (rows, k) float32 with the parameter widths
    `segments`, or a (left (rows, p), right (rows, q)) pair through apply_factored."""
    if isinstance(block, tuple):
        left, right = projection.apply_factored(*(np.asarray(b, np.float32) for b in block))
        return np.asarray(left), np.asarray(right)
    kwargs = {"segments": list(segments)} if segments is not None else {}
    return np.asarray(projection.apply(np.asarray(block, np.float32), **kwargs))


def projected_dims(projection: Any, dims: int | tuple[int, int], segments: Sequence[int] | None) -> Any:
    """Per-checkpoint widths of what is stored: `dims` (d, or (p, q) when factored) unchanged
    without a projection. A tracin.Projection gives its dim (whatever the layout; the segments are
    checked against it), or when factored the widths of a one-column pair, which do not depend on
    (p, q); any other object is probed by projecting one zero row of `dims`."""
    if projection is None:
        return dims
    if isinstance(projection, Projection):
        if isinstance(dims, tuple):
            dims = (1, 1)
        else:
            if projection.per_layer and segments is not None:
                projection.segment_dims(len(segments))  # too many segments for dim: refused now
            return projection.dim
    if isinstance(dims, tuple):
        left, right = project(projection, tuple(np.zeros((1, d), np.float32) for d in dims), None)
        return left.shape[1], right.shape[1]
    return project(projection, np.zeros((1, dims), np.float32), segments).shape[1]
