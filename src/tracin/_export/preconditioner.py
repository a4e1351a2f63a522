"""Optimizer-aware gradients: Adam's second-moment preconditioning of exported rows.

TracIn as published weights plain gradients by the learning rate, which is what SGD does. A model
trained with Adam moves along preconditioned gradients instead. Two row transforms, applied before
any projection, use the optimizer state saved with each checkpoint (step t, betas b1 / b2, eps,
first and second moments m and v, per parameter):

    "adam"         g / (sqrt(v / (1 - b2^t) + eps_root) + eps) on BOTH sides (TrackStar's optimizer
                   correction, for attribution: which training examples a prediction leans on).
    "adam_update"  the direction of one Adam step from the saved state, for TRAIN rows only:
                   m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,
                   (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1)) + eps_root) + eps)
                   scored against PLAIN test gradients (preconditioner=None), as LESS selects
                   training data for a target task.

eps_root is optax's (scale_by_adam's eps_root, added under the square root); torch.optim.Adam has none
(0). The rank-one factorisation of rank_one.py adds it to v_hat with eps^2 (v_hat + eps_root + eps^2).

Weight decay (AdamW) is not part of the direction; the torch adapter refuses optimizer states
whose steps are not Adam's (amsgrad, maximize, RAdam, NAdam; SparseAdam for "adam_update": its step
skips the rows a gradient misses) and chosen parameters of param groups with different learning
rates (a row has one weight, the checkpoint's learning rate). Factored rows take "adam" through a
rank-one factorisation of v (rank_one.py, an approximation for Adam); "adam_update" needs full rows
(m' is not rank one).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._caller import user_stacklevel

PRECONDITIONERS = ("adam", "adam_update")
ADAM_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}  # optax.adam's and torch.optim.Adam's defaults
EPS_ROOT = "eps_root"  # optax's term under the square root: an option of its own, default 0 (kept only when not 0)


@dataclass(frozen=True)
class AdamMoments:
    """One parameter's Adam state: m, v flattened row-major (shape (size,), the optimizer's float
    dtype), the number of steps taken `step` (>= 1), and the optimizer's b1, b2, eps; `sparse`: the
    optimizer steps only the rows a gradient reaches (torch.optim.SparseAdam); eps_root: optax's term
    added to v_hat under the square root (0 for torch)."""

    m: np.ndarray
    v: np.ndarray
    step: float
    b1: float
    b2: float
    eps: float
    sparse: bool = False
    eps_root: float = 0.0


class OptimizerState(Protocol):
    """A checkpoint's optimizer state as an adapter wraps it."""

    def digest(self) -> str:
        """Fingerprint of the state (for the metadata, compared on resume)."""

    def moments(self, params: Sequence[tuple[str, Sequence[int]]]) -> list[AdamMoments]:
        """The Adam moments of `params` ((name, shape) in row order), one per parameter."""


def check_preconditioner(preconditioner: Any, mode: str) -> None:
    """ValueError unless `preconditioner` is None or one of PRECONDITIONERS ("adam_update" with mode="full")."""
    if preconditioner is None:
        return
    if not isinstance(preconditioner, str) or preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be None, 'adam' or 'adam_update', got {preconditioner!r}")
    if mode != "full" and preconditioner != "adam":
        raise ValueError(
            f"preconditioner={preconditioner!r} needs mode='full' (full gradient rows): the next "
            f"step's direction is not rank one, so mode={mode!r} cannot keep it"
        )


class Preconditioned:
    """The Adam preconditioner as a row transform on full float32 rows.

    kind: "adam" or "adam_update"; moments(checkpoint) -> the AdamMoments of each parameter of the
    row, in row order (called once per checkpoint, the first time a block of it comes);
    settings: what the metadata records besides the kind (the hyperparameters or where they
    come from); names, shapes: the parameters' names and shapes in that order, for the warning about
    entries whose v is 0 ("adam" divides them by eps, so a row with gradient there is that entry's, where the
    rank-one factorisation of rank_one.py scales whole zero rows and columns by 0: warn_zero_v). It warns once
    per parameter per checkpoint, and only when a block has a row with non-zero gradient on such entries (a
    token the training never held that a row does hold), not for zeros no row reaches (padding_idx rows,
    positions beyond the exported texts' length).
    """

    key = "preconditioner"

    def __init__(
        self,
        kind: str,
        moments: Callable[[int], list[AdamMoments]],
        settings: Mapping[str, Any],
        names: Sequence[str] = (),
        shapes: Sequence[Sequence[int]] = (),
        sixteen_bit: bool = True,
    ):
        self.kind, self._moments, self.settings = kind, moments, dict(settings)
        self.sixteen_bit = sixteen_bit  # False: the adapter knows the gradients are float32 (no rounding check)
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self._checkpoint: int | None = None
        self._state: list[tuple[slice, tuple]] = []
        self._zero_v: list[_ZeroV] = []  # this checkpoint's parameters with zero v not yet warned about
        self._warned: set[tuple[int, int]] = set()  # (checkpoint, parameter) warned about
        self._rounding_warned = False  # warn_rounding has warned in this export (once per export)
        self._outsized_warned = False  # warn_outsized has warned in this export (once per export)
        self._rounding_flagged: set[int] = set()  # parameters warn_rounding named: not warned about again as outsized

    def dims(self, dims: Any) -> Any:
        return dims

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.settings}

    def apply(self, block: Any, checkpoint: int, slot: int) -> np.ndarray:
        """(rows, d) float32 -> (rows, d) float32, one parameter's columns at a time, in float32 with
        per-element constants computed in float64."""
        if checkpoint != self._checkpoint:
            moments = self._moments(checkpoint)
            self._state = self._segments(moments, block.shape[1])
            self._checkpoint = checkpoint
            self._zero_v = self._zero_entries(moments, checkpoint) if self.kind == "adam" else []
            check = self.kind == "adam" and self.sixteen_bit and not self._rounding_warned
            rounding = moments if check else None
            outsized = moments if self.kind == "adam" and not self._outsized_warned else None
        else:
            rounding = outsized = None
        if self._zero_v:
            self._warn_zero_v(block, checkpoint)
        g_all = np.asarray(block, np.float32)
        out = np.empty(g_all.shape, np.float32)
        for cols, consts in self._state:
            g, o = g_all[:, cols], out[:, cols]
            if self.kind == "adam":
                np.multiply(g, consts[0], out=o)
                continue
            m_part, m_rate, v_part, v_rate, eps = consts  # (m_part + m_rate g) / (sqrt(v_part + v_rate g^2) + eps)
            den = np.square(g)
            den *= v_rate
            den += v_part
            np.sqrt(den, out=den)
            den += eps
            np.multiply(g, m_rate, out=o)
            o += m_part
            o /= den
        if rounding is not None:
            self._check_rounding(g_all, out, rounding, checkpoint)
        if outsized is not None:
            self._check_outsized(g_all, out, outsized, checkpoint)
        return out

    def _check_outsized(self, g: np.ndarray, out: np.ndarray, moments: list[AdamMoments], checkpoint: int) -> None:
        """The first block of a checkpoint: warn_outsized (once per export) about the parameters whose
        preconditioned entries, g / (sqrt(v_hat) + eps), have an RMS over the block's non-zero gradients above
        OUTSIZED and above OUTSIZED_RATIO times that of the other parameters' entries (the exported gradients far
        larger than any the optimizer saw there, where the rest of the row's are not: a Conv2d bias before a
        BatchNorm2d has almost none in training mode, a real one in the export's eval mode; a model trained to
        near-zero loss scored on examples it gets wrong has all its parameters' gradients outgrow v alike, which
        layers= would not mend) when together they make over half of the rows' norm^2 (a CNN of several such
        layers splits it among their biases). Entries whose v is 0 are left to warn_zero_v. O(block): a
        pass over each parameter's columns row by row (plus the columns whose v is 0)."""
        squares, counts = [], []
        for (cols, _), a in zip(self._state, moments, strict=True):
            # row by row: contiguous pieces (a BLAS dot, a count) run ~5x faster than reductions over the 2-D view
            square = sum(float(np.dot(r, r)) for r in out[:, cols])
            count = sum(int(np.count_nonzero(r)) for r in g[:, cols])
            zero = np.flatnonzero(np.asarray(a.v).reshape(-1) == 0)
            if zero.size:  # warn_zero_v's entries: out of the RMS and of the share
                oz = out[:, cols.start + zero]
                square -= float(np.einsum("ij,ij->", oz, oz, dtype=np.float64))
                count -= int(np.count_nonzero(g[:, cols.start + zero]))
            squares.append(max(square, 0.0))
            counts.append(count)
        total = sum(squares)
        if not total > 0:
            return
        rms = [np.sqrt(q / c) if c else 0.0 for q, c in zip(squares, counts, strict=True)]
        # the parameters warn_rounding named (their 16-bit rounding, amplified) are neither warned about nor the rest
        big = [k for k, r in enumerate(rms) if r > OUTSIZED and k not in self._rounding_flagged]
        others = [k for k in range(len(rms)) if k not in big and k not in self._rounding_flagged]
        rest_count = sum(counts[k] for k in others)
        if not big or not rest_count:  # no other parameters to tell the outsized ones from: silence
            return
        rest = float(np.sqrt(sum(squares[k] for k in others) / rest_count))
        big = [k for k in big if rms[k] > OUTSIZED_RATIO * rest]
        if self.sixteen_bit:  # 16-bit rounding of a gradient ~0 in exact arithmetic (autocast): not this warning's
            big = [k for k in big if not self._rounding_level(g, out, k, OUTSIZED_RATIO * rest)]
        if sum(squares[k] for k in big) / total <= 0.5:
            return
        self._outsized_warned = True
        flagged = [
            (repr(self.names[k]) if k < len(self.names) else f"parameter {k} of the row", rms[k], squares[k] / total)
            for k in big
        ]
        warn_outsized(flagged, checkpoint, rest)

    def _rounding_level(self, g: np.ndarray, out: np.ndarray, k: int, above: float) -> bool:
        """Whether parameter k's entries of `out` above `above` have gradients at a 16-bit format's rounding: a
        median under OUTSIZED_ROUNDING times the RMS of the row's gradients on the other parameters of k's module
        (an attention key's bias under torch.autocast: ~1e-3, where a bias before BatchNorm has ~1). False when
        the module has no other parameter. O(the module's columns)."""
        names = [self.names[j] if j < len(self.names) else str(j) for j in range(len(self._state))]
        module = _module(names[k])
        others = [self._state[j][0] for j in range(len(names)) if j != k and _module(names[j]) == module]
        if not others:
            return False
        square = sum(np.einsum("ij,ij->i", g[:, c], g[:, c], dtype=np.float64) for c in others)
        count = sum(np.count_nonzero(g[:, c], axis=1) for c in others)
        scale = np.sqrt(square / np.maximum(count, 1))
        rows, cols = np.nonzero(np.abs(out[:, self._state[k][0]]) > above)
        if not rows.size:
            return False
        ratio = np.abs(g[rows, self._state[k][0].start + cols].astype(np.float64)) / np.maximum(scale[rows], 1e-300)
        return bool(np.median(ratio) < OUTSIZED_ROUNDING)

    def _check_rounding(self, g: np.ndarray, out: np.ndarray, moments: list[AdamMoments], checkpoint: int) -> None:
        """The first block of a checkpoint: warn_rounding (once per export) about the parameters whose gradients
        are 16-bit and whose estimated rounding noise, amplified by 1 / (sqrt(v_hat) + eps), makes over
        ROUNDING_SHARE of the preconditioned rows' norm^2 (mean over the block's rows: a row whose 16-bit sum came
        out exact has none). A parameter's format is rounding_unit's of the coarsest other parameter of its module
        (its name up to the last "/" or "."), its own only when it has none: a cancelling float32 sum leaves few
        bits too, and under autocast a bias may be summed in float32 from 16-bit terms. The noise of an entry with
        gradient is the unit roundoff times the RMS of the row's non-zero gradients over the module: an entry
        that is 0 in exact arithmetic (an attention key's bias) carries the rounding of the terms that cancel
        there. Entries whose v is 0 are left to warn_zero_v. O(block)."""
        total = np.einsum("ij,ij->i", out, out, dtype=np.float64)
        rows = total > 0
        if not rows.any():
            return
        names = [self.names[k] if k < len(self.names) else str(k) for k in range(len(self._state))]
        units = [rounding_unit(g[:, cols]) for cols, _ in self._state]
        if all(u is None for u in units):  # float32 gradients throughout: nothing to estimate
            return
        modules: dict[str, list[int]] = {}
        for k, name in enumerate(names):
            modules.setdefault(_module(name), []).append(k)
        square = [np.einsum("ij,ij->i", g[:, c], g[:, c], dtype=np.float64) for c, _ in self._state]
        count = [np.count_nonzero(g[:, c], axis=1) for c, _ in self._state]
        flagged = []
        for module in modules.values():
            mean_square = sum(square[j] for j in module) / np.maximum(sum(count[j] for j in module), 1)
            for k in module:
                others = [units[j] for j in module if j != k] or [units[k]]
                unit = max((u for u in others if u is not None), default=None)
                if unit is None:
                    continue
                cols, consts = self._state[k]
                weight = np.square(np.broadcast_to(np.asarray(consts[0], np.float64), (cols.stop - cols.start,)))
                weight = np.where(np.asarray(moments[k].v).reshape(-1) > 0, weight, 0.0)
                noise = (g[:, cols] != 0) @ weight * unit**2 * mean_square
                share = float(np.mean(noise[rows] / total[rows]))
                if share > ROUNDING_SHARE:
                    label = repr(names[k]) if k < len(self.names) else f"parameter {k} of the row"
                    flagged.append((k, label, unit, share))
        if flagged:
            self._rounding_warned = True
            self._rounding_flagged.update(f[0] for f in flagged)
            warn_rounding([f[1:] for f in sorted(flagged)], checkpoint)

    def _zero_entries(self, moments: list[AdamMoments], checkpoint: int) -> list[_ZeroV]:
        """The parameters of the row whose v has entries that are exactly 0 (one O(size of v) pass), but for
        those already warned about in this checkpoint."""
        out, start = [], 0
        for k, a in enumerate(moments):
            v = np.asarray(a.v).reshape(-1)
            if (checkpoint, k) not in self._warned and np.count_nonzero(v) < v.size:
                name = repr(self.names[k]) if k < len(self.names) else f"parameter {k} of the row"
                shape = self.shapes[k] if k < len(self.shapes) else None
                mask = v == 0
                out.append(_ZeroV(k, name, start + np.flatnonzero(mask), mask, a.eps, shape, a.eps_root))
            start += v.size
        return out

    def _warn_zero_v(self, block: Any, checkpoint: int) -> None:
        """One RuntimeWarning per parameter per checkpoint, once a block has rows with non-zero gradient on
        entries whose v is 0 (divided by eps, those dominate the row); a gradient of 0 there is harmless.
        O(block): the zero entries of each row (gathered by index), a few rows at a time."""
        g = np.asarray(block)
        for z in list(self._zero_v):
            zero = z.columns.size
            step = max(1, (1 << 22) // zero)
            touch = sum(
                int(np.count_nonzero((g[i : i + step, z.columns] != 0).any(axis=1))) for i in range(0, len(g), step)
            )
            if not touch:
                continue
            self._zero_v.remove(z)
            self._warned.add((checkpoint, z.index))
            warn_zero_v(z, touch, len(g), zero, checkpoint)

    def _segments(self, moments: list[AdamMoments], width: int) -> list[tuple[slice, tuple]]:
        """Per parameter its columns and float32 constants: "adam" (1 / (sqrt(v_hat + eps_root) + eps),);
        "adam_update" (b1 m / c1, (1 - b1) / c1, b2 v / c2 + eps_root, (1 - b2) / c2, eps), c = 1 - b^(t + 1)."""
        total = sum(a.v.size for a in moments)
        if total != width:
            raise ValueError(f"the optimizer state has {total} entries for a row of {width}")
        if self.kind == "adam_update" and any(a.sparse for a in moments):
            raise ValueError(
                "preconditioner='adam_update' cannot follow torch.optim.SparseAdam: its step leaves the rows an "
                "example's gradient does not reach as they are, while the exported direction moves every row by "
                "its momentum; use preconditioner='adam'"
            )
        out, start = [], 0
        for a in moments:
            m, v = np.asarray(a.m, np.float64), np.asarray(a.v, np.float64)
            if self.kind == "adam":
                consts: tuple = (1.0 / (np.sqrt(v / (1 - a.b2**a.step) + a.eps_root) + a.eps),)
            else:
                c1, c2 = 1 - a.b1 ** (a.step + 1), 1 - a.b2 ** (a.step + 1)
                consts = (a.b1 * m / c1, (1 - a.b1) / c1, a.b2 * v / c2 + a.eps_root, (1 - a.b2) / c2, a.eps)
            out.append(
                (
                    slice(start, start + v.size),
                    tuple(np.float32(c) if np.ndim(c) == 0 else np.asarray(c, np.float32) for c in consts),
                )
            )
            start += v.size
        return out


def adam_settings(options: Any) -> dict[str, float]:
    """{"b1", "b2", "eps"[, "eps_root"]} from a user's preconditioner_options (None: ADAM_DEFAULTS;
    missing keys take their default; "eps_root" (optax's, default 0) is kept only when not 0, so the
    metadata of an export without it is as before); ValueError / TypeError naming the bad key."""
    if options is None:
        return dict(ADAM_DEFAULTS)
    if not isinstance(options, Mapping):
        raise TypeError(
            f"preconditioner_options must be a dict with keys b1, b2, eps, eps_root, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - {*ADAM_DEFAULTS, EPS_ROOT}, key=str)
    if unknown:
        raise ValueError(f"preconditioner_options: unknown keys {unknown}; expected b1, b2, eps, eps_root")
    settings = {**ADAM_DEFAULTS, EPS_ROOT: 0.0, **options}
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"preconditioner_options[{key!r}] must be a real number, got {value!r}")
        low_ok = value > 0 if key == "eps" else value >= 0
        below_one = key in ("eps", EPS_ROOT) or value < 1
        if not (low_ok and below_one and np.isfinite(value)):
            allowed = {"eps": "(0, inf)", EPS_ROOT: "[0, inf)"}.get(key, "[0, 1)")
            raise ValueError(f"preconditioner_options[{key!r}] must be in {allowed}, got {value!r}")
    return {k: float(v) for k, v in settings.items() if k != EPS_ROOT or v != 0}


def check_moments(name: str, shape: Sequence[int], m: Any, v: Any, step: Any, where: str, hint: str = "") -> None:
    """ValueError naming the parameter unless m and v have its shape (`hint` appended to that message),
    step is a count >= 1, every entry of m is finite (a NaN or infinite one makes "adam_update"'s rows NaN
    there) and every entry of v is finite and >= 0 (Adam's running mean of squares: a negative or NaN
    entry makes every row NaN there, an infinite one zero)."""
    for label, a in (("first moment", m), ("second moment", v)):
        if tuple(np.shape(a)) != tuple(shape):
            raise ValueError(
                f"{where}: the {label} of {name} has shape {tuple(np.shape(a))}, the parameter has {tuple(shape)}"
                + hint
            )
    if not np.isfinite(step) or step < 1:
        raise ValueError(f"{where}: the step count of {name} is {step}; Adam state after at least one step is needed")
    bad = int(np.count_nonzero(~np.isfinite(m)))
    if bad:
        raise ValueError(
            f"{where}: the first moment of {name} has {bad} NaN or infinite entries of {np.size(m)}; Adam's is a "
            "running mean of gradients: the training diverged or the state is damaged"
        )
    bad = int(np.count_nonzero(~(np.asarray(v) >= 0) | ~np.isfinite(v)))
    if bad:
        raise ValueError(
            f"{where}: the second moment of {name} has {bad} negative, NaN or infinite entries of {np.size(v)}; "
            "Adam's is a running mean of squared gradients (>= 0): the training diverged or the state is not Adam's"
        )


# warn_outsized: an RMS of g / (sqrt(v_hat) + eps) above this over a parameter's entries with gradient (the exported
# per-example gradients OUTSIZED times the RMS of the training gradients Adam's v recorded; per-example gradients of
# mislabelled rows reach some hundreds where the training batches averaged them, on every parameter alike, which
# OUTSIZED_RATIO tells apart) marks a parameter whose v does not describe the exported gradients. 1e3, not 1e4: a
# CNN trained in bfloat16 has its BatchNorm-followed bias's v at bfloat16 rounding, ~3e3 (100% of the rows)
OUTSIZED = 1e3
# warn_outsized: ... and above this times the RMS of the other parameters' entries (a model trained to near-zero loss,
# scored on rows it gets wrong, has every parameter's g / sqrt(v) in the thousands, within a few times of each other)
OUTSIZED_RATIO = 100.0
# warn_outsized: of 16-bit (or autocast) gradients, an outsized parameter whose outsized entries' gradients are in
# median under this times the RMS of its module's other gradients is 16-bit rounding amplified (an attention key's
# bias under autocast: ~1e-3; a bias before BatchNorm: ~1), which the 16-bit and autocast warnings describe
OUTSIZED_ROUNDING = 2.0**-5
ROUNDING_SHARE = 0.1  # warn_rounding: estimated rounding noise's share of the "adam" rows' norm^2 warned about


def rounding_unit(g: np.ndarray) -> float | None:
    """The unit roundoff of the 16-bit format that every non-zero entry of float32 `g` fits exactly: 2^-8 for
    bfloat16 (the low 16 bits of each float32 0), 2^-11 for float16 (the low 13), else None (float32, or fewer
    than 8 non-zero entries to tell by: a float32 entry fits by chance with probability 2^-13)."""
    first = np.ascontiguousarray(g[:1], np.float32).view(np.uint32)
    if np.bitwise_or.reduce(first & 0x1FFF, axis=None):  # float32 bits in the first row: None, no full pass
        return None
    bits = np.ascontiguousarray(g, np.float32).view(np.uint32)
    bits = bits[(bits & 0x7FFFFFFF) != 0]
    if bits.size < 8:
        return None
    low = np.bitwise_or.reduce(bits & 0xFFFF)
    if not low:
        return 2.0**-8
    return 2.0**-11 if not low & 0x1FFF else None


def _module(name: str) -> str:
    """A parameter's module: its name up to the last "/" (JAX paths) or "." (torch names)."""
    return name[: max(name.rfind("/"), name.rfind("."), 0)]


def warn_outsized(flagged: list[tuple[str, float, float]], checkpoint: int, rest: float) -> None:
    """The "adam" RuntimeWarning about parameters (name, RMS of their preconditioned entries, share of the rows'
    norm^2) whose exported gradients are far larger than the training gradients their v recorded; `rest`: the RMS
    of the other parameters' preconditioned entries."""
    listed = ", ".join(f"{name} ({rms:.3g}, {100 * share:.0f}%)" for name, rms, share in flagged)
    together = sum(share for _, _, share in flagged)
    warnings.warn(
        f"preconditioner='adam': in checkpoint {checkpoint} the exported gradients of {listed} are far larger than "
        "the gradients the optimizer's second moment (v) recorded in training: g / (sqrt(v_hat) + eps) has the RMS "
        f"in parentheses over their entries with gradient, {rest:.3g} over the other parameters', so they make "
        f"{100 * together:.0f}% of the rows' squared norm (each its share in parentheses). A Conv2d (or Linear) "
        "with a bias followed by BatchNorm gets almost no gradient "
        "on that bias in training mode and a real one in the export's eval mode: leave such parameters out with "
        "layers= (name the others, e.g. 'conv.weight', or 'conv/kernel' in JAX), or build those layers without a "
        "bias (torch: bias=False; flax: use_bias=False)",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def warn_rounding(flagged: list[tuple[str, float, float]], checkpoint: int) -> None:
    """The RuntimeWarning of Preconditioned._check_rounding: (name, unit roundoff, share) per flagged parameter."""
    kinds = {2.0**-8: "bfloat16", 2.0**-11: "float16"}
    listed = ", ".join(
        f"{name} ({kinds[unit]}, {'~' + format(share, '.0%') if share <= 1 else 'over 100%'})"
        for name, unit, share in flagged
    )
    warnings.warn(
        f"preconditioner='adam': the 16-bit gradients of {listed} are near their rounding where their second "
        f"moment v is far smaller (checkpoint {checkpoint}: a parameter whose gradient is ~0 in exact arithmetic, "
        "such as an attention key's bias, trained at a higher precision): g / (sqrt(v_hat) + eps) amplifies their "
        "rounding noise to about the share of the rows' norm^2 in parentheses (an estimate, mean over the first "
        "batch's rows), so the scores follow that noise. Drop them with layers=, or export for 'adam' with the "
        "params in float32 (outside torch.autocast), the training's precision",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


@dataclass(frozen=True, eq=False)
class _ZeroV:
    """A parameter of the row whose v has zeros: its index and name, the row's columns where its v is 0
    (int64), where its v is 0 (bool, flattened), eps, its shape (or None) and eps_root."""

    index: int
    name: str
    columns: np.ndarray
    mask: np.ndarray
    eps: float
    shape: tuple[int, ...] | None
    eps_root: float = 0.0


def warn_zero_v(z: _ZeroV, touch: int, rows: int, zero: int, checkpoint: int) -> None:
    """The full-row "adam"'s RuntimeWarning: `touch` of the `rows` rows of a block have gradient on the `zero`
    entries of z's parameter whose v is 0, which g / (sqrt(0) + eps) makes nearly all of those rows. With
    a shape of 2-D or more it counts the parameter's rows (first axis) whose v is all 0 too."""
    size, extra = z.mask.size, ""
    divisor = f"eps={z.eps:g}" if not z.eps_root else f"sqrt(eps_root) + eps={np.sqrt(z.eps_root) + z.eps:g}"
    if z.shape is not None and len(z.shape) >= 2 and int(np.prod(z.shape)) == size:
        all_zero = int(np.count_nonzero(z.mask.reshape(z.shape[0], -1).all(axis=1)))
        extra = f"; {all_zero} of its {z.shape[0]} rows all 0"
    warnings.warn(
        f"preconditioner='adam': {touch} of the {rows} rows of a batch have gradient where the second moment (v) "
        f"of {z.name} is 0 in checkpoint {checkpoint} ({zero} of {size} entries{extra}: no gradient before it, "
        f"as for tokens the training never held); 'adam' divides a gradient there by {divisor}, so it "
        "dominates those rows' scores (a Kronecker or factored projection scales whole zero rows and columns "
        "of v by 0 instead)",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
