"""Adam's "adam" preconditioner for factored rows, through a rank-one factorisation of v.

A factored row of a linear layer is a pair (left b (p,), right a (q,)) whose outer product b a^T is
the gradient of the layer's [weight | bias] matrix (p, q). Dividing it elementwise by sqrt(v_hat)
would break the rank-one structure, so v_hat (bias-corrected, bias as the last column) is replaced
by its Adafactor-style factorisation r c^T / sum(r), r = row sums (p,), c = column sums (q,):

    b a^T / sqrt(r c^T / s)  =  (b * sqrt(s) / sqrt(r)) (a / sqrt(c))^T,   s = sum(r)

so the left factor is scaled by sqrt(s / r) and the right by 1 / sqrt(c). This equals the full
"adam" row when v is exactly rank one and eps is 0 (as for a model trained with Adafactor's
factored second moments); for Adam's full v it is an approximation, and eps is left out. Entries
where r or c is 0 are scaled by 0 (a parameter row or column that never had a gradient: the
embedding row of a token the training never held). The full-row "adam" (preconditioner.py) does
the opposite there: it divides a gradient on a zero v by eps, so it dominates its row. _scales
warns (RuntimeWarning, once per layer per checkpoint, from the sums r and c: O(size of v)) when
some of a layer's v is 0, naming the layer, the zero entries, rows and columns and what each path
does; and when all of the weight's v is 0 (its part of every row is zero). An embedding's padding_idx
row (no gradient ever, masked in its rows) is left out of that count. eps is left out because it cannot
bound the rank-one scales: a row or column of v near 0 but not 0 (the bias of an attention key, whose
gradient is 0 in exact arithmetic: v ~1e-18 against ~1e-3) gets a scale millions of times its layer's
median, so that float32 rounding of its ~0 gradient dominates the layer's rows; a floor of eps^2 on r
and c still leaves it 1e6 times the median. _scales warns about such rows and columns instead (over
_NEAR_ZERO times the median: float32 rounding of a typical entry there is over 0.1% of a typical scaled
one), in the same call as the zero-v warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._caller import user_stacklevel
from .preconditioner import AdamMoments

_NEAR_ZERO = 1e4  # a rank-one scale over this times its layer's median: float32 rounding becomes 0.1% of an entry


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
        return {
            "kind": "adam",
            "factored": "rank-one r c^T / sum(r) of v (exact for Adafactor, approximate for Adam, eps left out)",
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
    """(sqrt(s / r), 1 / sqrt(c)) of the layer of p outputs whose weight is moments[k] (its bias
    moments[k + 1] when `bias`). With `warn` (the callers pass it the first time they scale the layer
    in a checkpoint: one warning per layer per checkpoint) it warns (_warn_zero_v) when some or all of
    the layer's v is 0, and (_warn_near_zero_v) when some of its rows or columns are near 0 but not 0,
    naming it `name` (else by its shape) and `checkpoint`; row `padding_row` (an nn.Embedding's
    padding_idx, whose row never has gradient and is masked by the caller) is left out of both."""
    w = moments[k]
    v = np.asarray(w.v, np.float64).reshape(p, -1) / (1 - w.b2**w.step)
    if bias:
        b = moments[k + 1]
        v = np.hstack([v, np.asarray(b.v, np.float64).reshape(p, 1) / (1 - b.b2**b.step)])
    r, c = v.sum(1), v.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 where every v is 0: scaled by 0
        left = np.where(r > 0, np.sqrt(r.sum() / r), 0.0)
        right = np.where(c > 0, 1 / np.sqrt(c), 0.0)
    if not warn:
        return left, right
    counted = v if padding_row is None else np.delete(v, padding_row, axis=0)
    zero = counted.size - int(np.count_nonzero(counted))
    where = f" in checkpoint {checkpoint}" if checkpoint is not None else ""
    what = name if name is not None else f"a layer of {p} x {v.shape[1] - bias} (out, in)"
    if padding_row is not None:
        what += f" (its padding_idx row {padding_row} left out: it never has gradient)"
    if zero:
        _warn_zero_v(what, where, counted, counted.sum(1), counted.sum(0), zero, bias, w.eps)
    rows = left if padding_row is None else np.delete(left, padding_row)
    _warn_near_zero_v(what, where, _outliers(rows), _outliers(right), len(rows), bias)
    return left, right


def _outliers(scales: np.ndarray) -> np.ndarray:
    """Each of `scales` over the median of the positive ones (0 where a scale is 0: v all 0 there)."""
    positive = scales[scales > 0]
    return scales / np.median(positive) if positive.size else np.zeros_like(scales)


def _warn_near_zero_v(name: str, where: str, rows: np.ndarray, cols: np.ndarray, p: int, bias: bool) -> None:
    """The RuntimeWarning about the rows and columns of a layer's v whose rank-one scales are over _NEAR_ZERO
    times the layer's median (`rows`, `cols`: each scale over that median): a v sum 1e8 times smaller than
    typical, as for a gradient that is 0 in exact arithmetic and only float32 rounding in practice."""
    far_rows, far_cols = rows > _NEAR_ZERO, cols > _NEAR_ZERO
    if not far_rows.any() and not far_cols.any():
        return
    q = cols.size
    bias_col = " (the bias's, the last, among them)" if bias and far_cols[-1] else ""
    warnings.warn(
        f"preconditioner='adam': {int(far_rows.sum())} of {p} rows and {int(far_cols.sum())} of {q} columns"
        f"{bias_col} of the second moments (v) of {name} are near 0 but not 0{where}: the rank-one factorisation "
        f"scales them by up to {max(rows.max(), cols.max()):.1e} times the layer's median scale (warned over "
        f"{_NEAR_ZERO:.0e}: a row or column sum of v 1e8 times the median's or less), so float32 rounding there "
        "(eps 1.2e-7 of a typical entry) weighs over 0.1% of a typical scaled entry. Where their gradient is 0 in "
        "exact arithmetic (the bias of an attention key: softmax is shift-invariant), the layer's rows are then "
        "mostly amplified rounding noise; where it is small but real (a token last seen long before the "
        "checkpoint), mostly those entries. Leave those parameters out of layers= (a key bias adds nothing), or "
        "export with preconditioner=None",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _warn_zero_v(
    name: str, where: str, v: np.ndarray, r: np.ndarray, c: np.ndarray, zero: int, bias: bool, eps: float
) -> None:
    """The RuntimeWarning about a layer's v ((p, q) [| bias]) holding `zero` zeros: all of the weight's
    (its part of every row is zero), or some (the rows and columns of v that are all 0 are scaled by 0,
    where the full-row "adam" divides those entries by eps). O(size of v) from its sums r, c."""
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
    warnings.warn(
        f"preconditioner='adam': {zero} of {v.size} second moments (v) of {name}{' (bias as the last column)' * bias} "
        f"are 0{where}: {rows} of {p} rows and {cols} of {q} columns of v are all 0 (no gradient before it, as for "
        "tokens the training never held). The rank-one factorisation scales those rows and columns by 0, so a "
        f"gradient there adds nothing{others}; the full-row 'adam' (no or a flat projection) divides those entries "
        f"by eps={eps:g} instead, so they dominate the rows with gradient there",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
