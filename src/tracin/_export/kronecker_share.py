"""Whether a Kronecker layer's share of a projection's dim factors well enough to export, and the refusal
with a dim that does (framework-neutral: tracin.torch and tracin.jax's token projections share it).

A layer given `share` outputs is projected to (k_rows, k_cols) = Projection.kronecker_dims(share, layer);
a prime share p factors as p x 1, so every token's activation (or output gradient) on one side would be
projected to a single number. Refused: a factor below both its side's size (rows, or cols + 1 with a bias)
and isqrt(share) // 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..projection import MAX_DIM, LayerMatrix, Projection


def unbalanced(share: int, layer: LayerMatrix) -> tuple[int, int] | None:
    """The (k_rows, k_cols) of `layer` given `share` outputs when a factor is below both its side's size and
    isqrt(share) // 2, else None."""
    dims = Projection.kronecker_dims(share, layer)
    sides = (layer.rows, layer.cols + int(layer.bias))
    low = math.isqrt(share) // 2
    return dims if any(k < min(side, low) for k, side in zip(dims, sides, strict=True)) else None


def balanced_share(layers: Sequence[LayerMatrix], share: int, n_segments: int) -> int:
    """The k nearest `share` (the smaller of two as near) that none of `layers` factors badly (unbalanced),
    with n_segments * k <= the largest dim; k = 1 always does."""
    for distance in range(share):
        for k in (share - distance, share + distance):
            if k * n_segments <= MAX_DIM and all(unbalanced(k, layer) is None for layer in layers):
                return k
    return 1


def check_balanced(dim: int, shares: Sequence[tuple[str, int, LayerMatrix]], n_segments: int) -> None:
    """ValueError for the first (name, share, layer) of `shares` (every Kronecker layer of a projection of
    `dim` outputs over `n_segments` segments; name as the message shows it, e.g. "layer 'fc'") whose share
    factors badly: it says how many of the share's outputs (k_rows, k_cols) uses, the rule, and suggests
    dim = n_segments x k with k the nearest the share that factors well on every layer of `shares`."""
    for name, share, layer in shares:
        dims = unbalanced(share, layer)
        if dims is None:
            continue
        sides = (layer.rows, layer.cols + int(layer.bias))
        low = math.isqrt(share) // 2
        j = next(j for j in (0, 1) if dims[j] < min(sides[j], low))
        used, k = dims[0] * dims[1], balanced_share([s[2] for s in shares], share, n_segments)
        unused = f" (the other {share - used} stay zero)" if used < share else ""
        raise ValueError(
            f"projection: dim={dim} over {n_segments} segments gives {name} {share} "
            f"outputs for its {sides[0]} x {sides[1]} gradient; (k_rows, k_cols) = {dims}, the most balanced "
            f"factors of {share} within those sides, uses {used} of them{unused} and projects the gradient's "
            f"{sides[j]} {('rows', 'columns')[j]} to {dims[j]}: a factor below both its side's size and "
            f"isqrt({share}) // 2 = {low} is refused. Choose dim = {n_segments} segments x k with k whose factors "
            f"balance on every Kronecker layer, e.g. {n_segments} x {k} = {n_segments * k}"
        )
