"""Adam's "adam" preconditioner for factored rows, through a rank-one factorisation of v.

A factored row of a linear layer is a pair (left b (p,), right a (q,)) whose outer product b a^T is
the gradient of the layer's [weight | bias] matrix (p, q). Dividing it elementwise by sqrt(v_hat) + eps
would break the rank-one structure, so v_hat (bias-corrected, bias as the last column) plus eps^2 is
replaced by its Adafactor-style factorisation r c^T / s (Adafactor adds its eps1 to g^2 the same way),
r = row sums (p,), c = column sums (q,) of v_hat + eps^2, s = sum(r):

    b a^T / sqrt(r c^T / s)  =  (b * sqrt(s / r)) (a / sqrt(c))^T

so the left factor is scaled by sqrt(s / r) and the right by 1 / sqrt(c). eps^2 plays eps's part:
sqrt(v + eps^2) is within sqrt(2) of sqrt(v) + eps, and a row whose v is ~0 gets r_i ~ q eps^2, so
its entries' denominator is sqrt(q eps^2 c_j / s) ~ eps where c_j is a typical column's (c's mean
is s / q), as Adam's 1 / (0 + eps); likewise a column whose v is ~0 (an attention key's bias: its
gradient is 0 in exact arithmetic, v ~1e-18). Where v's entries are far above eps^2 the sums change by
eps^2 / v relatively, and a rank-one v is still factorised exactly to that. eps^2 bounds a row or a
column near 0, not an entry whose row and column are both near 0 (denominator ~eps^2 sqrt(pq / s)):
_scales warns where some entry's scale exceeds _OVER_ADAM times the most the full-row "adam" gives any
entry of its column (1 / eps, the eps of the column's parameter: a bias's group may have its own). Rows
and columns where v is exactly 0 are scaled by 0 (a parameter row or column that never
had a gradient: the embedding row of a token the training never held); the full-row "adam"
(preconditioner.py) divides a gradient there by eps, so it dominates its row. _scales warns
(RuntimeWarning, once per layer per checkpoint, from the sums: O(size of v)) when some of a layer's
v is 0, naming the layer, the zero entries, rows and columns and what each path does; and when all of
the weight's v is 0 (its part of every row is zero). An embedding's padding_idx row (no gradient ever,
masked in its rows) is left out of both warnings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._caller import user_stacklevel
from .preconditioner import AdamMoments

_OVER_ADAM = 100.0  # an entry scaled over this times 1 / eps, full Adam's largest weight, is warned about


def layer_groups(params: Sequence[tuple[str, Sequence[int]]], slot_dims: Sequence[Any]) -> list[tuple[int, bool, int]]:
    """Per factored slot (p, q): (index of its weight in `params`, whether a bias follows it, p).
    The weight is (p, q), or (p, q - 1) followed by a (p,) bias; ValueError otherwise."""
    groups, k = [], 0
    for p, q in slot_dims:
        shape = tuple(params[k][1]) if k < len(params) else None
        bias = k + 1 < len(params) and shape == (p, q - 1) and tuple(params[k + 1][1]) == (p,)
        if shape != (p, q) and not bias:
            raise ValueError(
                f"the factored layer of dims {(p, q)} has no (out, in) weight in params "
                f"{[name for name, _ in params]}: the rank-one preconditioner cannot place it"
            )
        groups.append((k, bias, p))
        k += 2 if bias else 1
    return groups


class RankOneAdam:
    """The "adam" preconditioner as a row transform on factored (left, right) blocks.

    moments(checkpoint) -> the AdamMoments of every parameter in `params` order (once per
    checkpoint); groups: layer_groups of the sink slots; settings: as for Preconditioned; names:
    the parameters' names in that order, for the warning about a layer whose v is all zero (its
    rows are then all zero: a float16 optimizer state that underflowed, or a layer with no gradient
    before the checkpoint).
    """

    key = "preconditioner"

    def __init__(
        self,
        moments: Callable[[int], list[AdamMoments]],
        groups: list[tuple[int, bool, int]],
        settings: Mapping[str, Any],
        names: Sequence[str] = (),
    ):
        self._moments, self.groups, self.settings = moments, groups, dict(settings)
        self.names = list(names)
        self._checkpoint: int | None = None
        self._scales: list[tuple[np.ndarray, np.ndarray]] = []
        self._warned: set[int] = set()  # checkpoints whose zero v have been warned about

    def dims(self, dims: Any) -> Any:
        return dims

    def to_dict(self) -> dict:
        # of v_hat + eps^2; "v" as earlier versions recorded it (resume and scoring compare this record)
        return {
            "kind": "adam",
            "factored": "rank-one r c^T / sum(r) of v + eps^2 (exact for Adafactor, approximate for Adam)",
            **self.settings,
        }

    def apply(self, block: Any, checkpoint: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(left (rows, p), right (rows, q)) float32 -> the scaled pair, float32."""
        if checkpoint != self._checkpoint:
            moments = self._moments(checkpoint)
            names = [repr(self.names[k]) if k < len(self.names) else f"parameter {k}" for k, _, _ in self.groups]
            warn, self._warned = checkpoint not in self._warned, self._warned | {checkpoint}
            self._scales = [
                _scales(moments, k, bias, p, name, checkpoint, warn)
                for (k, bias, p), name in zip(self.groups, names, strict=True)
            ]
            self._checkpoint = checkpoint
        left_scale, right_scale = self._scales[slot]
        left, right = block
        return (
            (np.asarray(left, np.float64) * left_scale).astype(np.float32),
            (np.asarray(right, np.float64) * right_scale).astype(np.float32),
        )


def _scales(
    moments: list[AdamMoments],
    k: int,
    bias: bool,
    p: int,
    name: str | None = None,
    checkpoint: int | None = None,
    warn: bool = True,
    padding_row: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(s / r), 1 / sqrt(c)) of v_hat + eps^2 (+ eps_root) of the layer of p outputs whose weight
    is moments[k] (its bias moments[k + 1] when `bias`); rows and columns whose v is all 0 are scaled by
    0. With `warn` (the callers pass it the first time they scale the layer in a checkpoint: one warning
    per layer per checkpoint) it warns (_warn_zero_v) when some or all of the layer's v is 0, and
    (_warn_over_adam) when some entry's scale is over _OVER_ADAM / eps, naming it `name` (else by its
    shape) and `checkpoint`; row `padding_row` (an nn.Embedding's padding_idx, whose row never has
    gradient and is masked by the caller) is left out of both."""
    parts = [moments[k], moments[k + 1]] if bias else [moments[k]]
    v = np.hstack([np.asarray(m.v, np.float64).reshape(p, -1) / (1 - m.b2**m.step) for m in parts])
    floor = np.hstack([np.full((1, np.size(m.v) // p), m.eps**2 + m.eps_root) for m in parts])
    r, c = v.sum(1), v.sum(0)
    rows, cols = (v + floor).sum(1), (v + floor).sum(0)
    left = np.where(r > 0, np.sqrt(rows.sum() / rows), 0.0)
    right = np.where(c > 0, 1 / np.sqrt(cols), 0.0)
    if not warn:
        return left, right
    w = moments[k]
    counted = v if padding_row is None else np.delete(v, padding_row, axis=0)
    zero = counted.size - int(np.count_nonzero(counted))
    where = f" in checkpoint {checkpoint}" if checkpoint is not None else ""
    what = name if name is not None else f"a layer of {p} x {v.shape[1] - bias} (out, in)"
    if padding_row is not None:
        what += f" (its padding_idx row {padding_row} left out: it never has gradient)"
    if zero:
        _warn_zero_v(what, where, counted, counted.sum(1), counted.sum(0), zero, bias, w.eps, w.eps_root)
    kept = left if padding_row is None else np.delete(left, padding_row)
    # per column, its parameter's 1 / (sqrt(eps_root) + eps): a weight and its bias may be in groups of other eps
    bound = np.hstack([np.full(np.size(m.v) // p, 1 / (np.sqrt(m.eps_root) + m.eps)) for m in parts])
    _warn_over_adam(what, where, kept, right, bound, bias)
    return left, right


def _warn_over_adam(name: str, where: str, left: np.ndarray, right: np.ndarray, bound: Any, bias: bool) -> None:
    """The RuntimeWarning about the rows and columns of a layer whose rank-one scale of some entry,
    left_i right_j, is over _OVER_ADAM times `bound` (a number, or one per column), the most the full-row
    "adam" weighs any entry of that column (1 / (sqrt(eps_root) + eps) of its parameter): a row and a column
    of v both near 0, where eps^2 bounds neither."""
    over = right / np.broadcast_to(np.asarray(bound, np.float64), right.shape)  # each column's scale / its bound
    top = left.max(initial=0.0) * over.max(initial=0.0)
    if top <= _OVER_ADAM:
        return
    far_rows = left * over.max() > _OVER_ADAM
    far_cols = over * left.max() > _OVER_ADAM
    bias_col = " (the bias's, the last, among them)" if bias and far_cols[-1] else ""
    warnings.warn(
        f"preconditioner='adam': the rank-one factorisation of the second moments (v) of {name}{where} weighs "
        f"gradient entries in {int(far_rows.sum())} of {left.size} rows and {int(far_cols.sum())} of {right.size} "
        f"columns{bias_col} by up to {top:.1e} times the most the full-row 'adam' weighs any entry "
        f"(1 / eps): their v is near 0 in both the row and the column, where eps^2 added to v bounds neither "
        "sum. A gradient there (rounding of one that is 0 in exact arithmetic, or a small real one) then "
        "outweighs the layer's other entries far more than Adam itself would; where those scores matter, leave "
        "the layer out of layers= or export without preconditioner='adam'",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _warn_zero_v(
    name: str,
    where: str,
    v: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    zero: int,
    bias: bool,
    eps: float,
    eps_root: float = 0.0,
) -> None:
    """The RuntimeWarning about a layer's v ((p, q) [| bias]) holding `zero` zeros: all of the weight's
    (its part of every row is zero), or some (the rows and columns of v that are all 0 are scaled by 0,
    where the full-row "adam" divides those entries by eps, or sqrt(eps_root) + eps). O(size of v) from its sums
    r, c."""
    p, q = v.shape
    if not r.any() or not c[: q - bias].any():  # all of v, or the weight's, is 0
        warnings.warn(
            f"preconditioner='adam': every second moment (v) of {name} is 0{where}, so its part of every "
            "row is zero (a float16 optimizer state that underflowed, or a layer that had no gradient "
            "before the checkpoint)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return
    rows, cols = int(np.count_nonzero(r == 0)), int(np.count_nonzero(c == 0))
    rest = zero - (rows * q + cols * p - rows * cols)
    others = f"; its {rest} other zero entries get r c^T / s > 0" if rest else ""
    divisor = f"eps={eps:g}" if not eps_root else f"sqrt(eps_root) + eps={np.sqrt(eps_root) + eps:g}"
    warnings.warn(
        f"preconditioner='adam': {zero} of {v.size} second moments (v) of {name}{' (bias as the last column)' * bias} "
        f"are 0{where}: {rows} of {p} rows and {cols} of {q} columns of v are all 0 (no gradient before it, as for "
        "tokens the training never held). The rank-one factorisation scales those rows and columns by 0, so a "
        f"gradient there adds nothing{others}; the full-row 'adam' (no or a flat projection) divides those entries "
        f"by {divisor} instead, so they dominate the rows with gradient there",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
