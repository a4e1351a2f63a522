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
    without a projection. A tracin.Projection whose apply is Projection.apply gives its dim (whatever
    the layout; a per_layer layout is checked against d now, as apply would check it: widths >= 1
    summing to d, no more segments than dim), and one whose apply_factored is Projection's, the
    widths of a one-column pair, which do not depend on (p, q). Anything else (another object, or a
    subclass overriding the method, whose width may differ) is probed by projecting one zero row of
    `dims`."""
    if projection is None:
        return dims
    if isinstance(dims, tuple):
        if isinstance(projection, Projection) and type(projection).apply_factored is Projection.apply_factored:
            dims = (1, 1)
        left, right = project(projection, tuple(np.zeros((1, d), np.float32) for d in dims), None)
        return left.shape[1], right.shape[1]
    if isinstance(projection, Projection) and type(projection).apply is Projection.apply:
        if projection.per_layer:
            layout = projection._segments([dims] if segments is None else list(segments), dims)
            projection.segment_dims(len(layout))  # too many segments for dim: refused now
        return projection.dim
    return project(projection, np.zeros((1, dims), np.float32), segments).shape[1]
