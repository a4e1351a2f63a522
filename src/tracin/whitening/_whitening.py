"""tracin.Whitening: the train gradients' second moment, damped and inverted, applied to the test side."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import stat
import warnings
import zipfile
import zlib
from types import SimpleNamespace
from typing import IO, Any

import numpy as np

from .._caller import user_stacklevel
from .._progress import check_progress, progress_bar
from .._validate import flag, positive_int
from .._whole_file import whole_file
from ..gradients import FactoredGradients, Gradients, GradientSet, block_name
from ..store._format import MAX_JSON_DEPTH, json_depth, metadata_problem
from ._conditioning import eigenvalue_ends, warn_if_ill_conditioned
from ._inverse import check_damping, check_top_eigenvalue, damped_inverse, mean_eigenvalue
from ._moments import (
    PRECISIONS,
    check_budget,
    check_precision,
    default_max_bytes,
    finite_float32,
    fit_bar,
    matrix_bytes,
    matrix_sides,
    row_ranges,
    second_moments,
)
from ._threads import blas_threads

# fit's default damping: among 0.1, 1, 3, 10, 30, 100, within noise of the quality suite's best by mean LDS
# rank and by mean LDS (3 and 30 are first by each; benchmarks/results/quality.json, README "Whitened TracIn").
DEFAULT_DAMPING = 10.0
# metadata naming the gradient space; with the checkpoints' (and optimizer states') digests (_space), compared as
# scoring compares sides
_SPACE_KEYS = (
    "mode",
    "preconditioner",
    "projection",
    "framework",
    "params",
    "checkpoint_sources",
    "optimizer_state_sources",
)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # float32's smallest normal number, 2^-126 (about 1.2e-38)
_SCORE_FLOOR = (
    _FLOAT32_TINY * 2.0**24
)  # mean whitened self-influence below which fit refuses the damping (_check_scale)
_MIX_WEIGHT = 0.5  # fit's default mix_weight (the mix set's share of R); another one without mix= is refused


@dataclasses.dataclass(frozen=True)
class WhiteningSpec:
    """What a Whitening was fitted with; recorded as metadata["whitening"] of the sets it whitens.

    kind: "full" (exact (R + lambda I)^-1) or "kfac" (Kronecker-factored, for factored gradients).
    damping: lambda as a multiple of the mean eigenvalue trace(R) / d. precision: dtype of the block
    products R was summed from (see Whitening.fit). lambdas: per checkpoint lambda
    (full) or [lambda_B, lambda_A] (kfac). dims: per checkpoint d_c or [p_c, q_c]. n_rows / mix_rows:
    rows fitted on (train, mix set); mix_weight: the mix set's share of R. fingerprint: sha256 (16 hex
    digits) of the float64 second moments before damping (their bits follow fit's num_threads at
    rounding level, not a store's chunk_bytes: see Whitening.fit). fitted_on: the train store's id (None in
    memory). space: the train set's metadata naming its gradient space (mode, projection, ...) and its
    checkpoints (fingerprints["checkpoints"], checkpoint_sources) and, with a preconditioner, their
    optimizer states (fingerprints["optimizer_states"], optimizer_state_sources), checked against the
    sets it whitens.
    """

    kind: str
    damping: float
    precision: str
    lambdas: list
    dims: list
    n_rows: int
    mix_rows: int
    mix_weight: float
    fingerprint: str
    fitted_on: str | None
    space: dict


class Whitening:
    """Covariance-whitened TracIn: score = sum_c w_c g_c(test)^T (R_c + lambda_c I)^-1 g_c(train), with
    R_c = G_c^T G_c / n the second moment of the train gradients at checkpoint c (TrackStar's R,
    close to TRAK's kernel). Only the test side is transformed (apply), so train stores stay as
    they are; self_influence applies it on both sides.

    Full gradients: exact up to rounding, which (R + lambda I)^-1 amplifies by up to its condition number
    cond = (largest eigenvalue of R + lambda) / (smallest + lambda), at most (largest + lambda) / lambda,
    which it reaches when the train rows do not span all d directions (fewer rows than dims). It
    amplifies R's float32 partial products (fit's precision) and, whatever the precision, the whitened
    test rows (float32) and the float32 scores made from them.
    The latter keep each score within the contract's bound of 1e-5 |g(t) (R + lambda I)^-1| |g(i)|,
    but relative to the scores themselves the error can reach up to about (4 + sqrt(d) / 2) x cond x 2^-24
    (when test rows lie much in directions the train rows lack, as with fewer train rows than dims; the
    float32 sums over d products grow with d: measured up to 1.8, 6.8 and 9.1 x cond x 2^-24 at d = 50,
    200 and 1000, see _conditioning; for K-FAC, whose factors are applied and rounded each on its own, the sum of
    the two factors' such terms, with their own sides and conds, never a product): 3e-3 to 1.2e-2
    of the largest score at cond 5e4 (5 train rows of 200 dims, damping 0.001; 10 seeds, either precision),
    4e-7 with 20,000 rows (where (largest + lambda) / lambda is 5e3).
    Scored with precision="tf32" (CUDA), the GEMM inputs are rounded to TF32's 10-bit mantissa, 2^-11
    instead of 2^-24, and that rounding is amplified by the same cond: by analysis up to about
    (4 + sqrt(d) / 2) x cond x 2^-11 of the largest score, 2^13 times the float32 figure, and fit's
    warning (calibrated at 2^-24) does not cover it. Not measured on a GPU; emulating TF32's input rounding
    on the CPU (review127), 1024 dims at damping 0.1 with 124 and 50 train rows gave 1e-2 and 4.5e-2 of the
    largest score (unwhitened TF32 3e-4, whitened float32 9e-6 and 3e-5), at damping 10 with 124 rows
    5e-4 (unwhitened 3e-4). Score whitened rows with precision="float32" (the default) unless the damping is
    large or that error is acceptable.
    Factored gradients (left (n, p), right (n, q) per checkpoint): a Kronecker-
    factored approximation R ~ B (x) A with B = E[left left^T], A = E[right right^T] (K-FAC), damped
    per factor with lambda_B = sqrt(damping) * trace(B) / p and lambda_A = sqrt(damping) * trace(A) / q
    (pi-damping: lambda_B * lambda_A = damping * mean eigenvalue of B (x) A), so that the whitened set
    stays factored: left' = left (B + lambda_B I)^-1, right' = right (A + lambda_A I)^-1. That is
    exact for (B + lambda_B I) (x) (A + lambda_A I), an approximation of (R + lambda I).

    Use Whitening.fit(train), then tracin.scores / top_k / aggregate(w.apply(test), train) and
    w.self_influence(train); w.with_damping(d) gives the same R at another damping without a second
    pass. Keeps two float64 d_c x d_c matrices per checkpoint (R and its damped inverse): project wide
    gradients.
    """

    def __init__(self, moments: list[np.ndarray], inverses: list[np.ndarray], spec: WhiteningSpec):
        """moments: the undamped float64 second moments in kernel block order, (d_c, d_c) per checkpoint
        (full) or (p_c, p_c), (q_c, q_c) per checkpoint (kfac); inverses: their damped inverses, same
        shapes; spec: as fitted. Use fit() or load(). It keeps read-only copies of the arrays (`inverses`
        hands them out, with_damping shares the moments), so the caller's arrays stay theirs to change."""
        self._own([np.array(m, copy=True) for m in moments], [np.array(m, copy=True) for m in inverses], spec)

    @classmethod
    def _owned(cls, moments: list[np.ndarray], inverses: list[np.ndarray], spec: WhiteningSpec) -> Whitening:
        """As __init__, without the copies: for arrays no one else holds (fit, load) or already read-only
        (the moments with_damping shares). They are made read-only in place."""
        w = cls.__new__(cls)
        w._own(moments, inverses, spec)
        return w

    def _own(self, moments: list[np.ndarray], inverses: list[np.ndarray], spec: WhiteningSpec) -> None:
        for m in (*moments, *inverses):
            m.flags.writeable = False
        self._moments = list(moments)
        self._inverses = list(inverses)
        self.spec = spec

    def __setstate__(self, state: dict) -> None:
        """pickle and copy.deepcopy restore the arrays as new writeable ones, without __init__: read-only
        again here (a private copy's arrays, made read-only in place)."""
        self._own(state["_moments"], state["_inverses"], state["spec"])

    # -- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        train: Any,
        *,
        damping: float = DEFAULT_DAMPING,
        mix: Any = None,
        mix_weight: float = _MIX_WEIGHT,
        precision: str = "float32",
        max_bytes: int | None = None,
        progress: bool | None = None,
        num_threads: int | None = None,
    ) -> Whitening:
        """Fits the whitening to the train gradients (Gradients, FactoredGradients, a GradientStore or
        arrays) in one streaming pass over their rows, never loading a store whole.

        damping: lambda_c = damping * trace(R_c) / d_c (default 10: within noise of the quality suite's
            best by mean LDS rank and by mean LDS, 3 and 30 being first by each; 1-3 did best where train
            rows outnumber dimensions, 30-100 where they are fewer; see the README). with_damping gives
            other dampings without a second pass. A damping so small that float32 scores may be off by
            more than about 1e-2 of the largest warns (fit and with_damping alike), stating the worst case
            (4 + sqrt(d) / 2) x cond x 2^-24 (see the class docstring; for K-FAC the sum of that over its two
            factors, each with its side and its cond) and naming a damping that keeps that within 4e-3. cond is
            R + lambda I's own (its largest over its smallest eigenvalue; above 256 dims, Lanczos's
            estimate). Whether it warns is decided on
            (4 + sqrt(d) / 2) x min(cond, sqrt((largest + lambda) / smallest)) x 2^-24 > 1e-2
            (whitening._conditioning): a rank-deficient R (fewer rows than dims) warns as its cond grows
            (d = 1024: above about 8e3), a full-rank R, whose test rows' whitened range is about sqrt of
            its eigenvalue spread, only where that spread is below about 1e-7 (d = 1024), at any damping.
            A damping so large that the whitened scores or rows would fall into float32's subnormal range (the
            scores, about d / damping, from about 1e31 x d whatever the gradients' scale; rows, about
            1 / (damping x scale), earlier for large gradients) is a ValueError naming a damping that is not
            (fit and with_damping); apply and self_influence whiten a row that small to float32 subnormals or
            0, as scoring it unwhitened would (see apply).
        mix: an optional second gradient set of the same checkpoints and dims (e.g. evaluation
            gradients, TrackStar's task-specific R): R = (1 - mix_weight) R_train + mix_weight R_mix
            (mix_weight default 0.5; without mix=, a mix_weight other than 0.5 or 0 is a ValueError).
        precision: "float32" (default) accumulates R in float64 from float32 products of up to 4096
            rows each (BLAS syrk, near the speed of NumPy's float32 G.T @ G), each entry within about
            4096 * 2^-24 * mean_i |g_ia g_ib| of the float64 value (typically 64 times less), which
            (R + lambda I)^-1 amplifies by up to its condition number (at most 1 + d / damping);
            "float64" multiplies in float64 (exact to float64 rounding) at about half the speed. At
            small damping it makes the whitened rows accurate (5 rows of 200 dims, damping 0.001: 5e-8
            against 8e-4 relative error), not the scores: those keep the float32 error of the class
            docstring (up to (4 + sqrt(d) / 2) x cond x 2^-24 of the scores), whatever the precision. Both hold at any
            finite scale of the gradients (see _moments). Where R's rounding exceeds lambda (R + lambda I
            not positive definite, or an inverse eigenvalue found above 1.01 / lambda, which no positive
            semidefinite R allows) fit and with_damping raise ValueError, advising precision="float64"
            when R was summed in float32.
        max_bytes: memory allowed for the float64 matrices (default half of the memory the process may use:
            the least of the physical RAM, its cgroup's memory limit (a container's) and RLIMIT_AS, where set;
            8 GiB where the OS reports none); above it a ValueError points to projection.
        progress: tqdm bars over the rows, then over the matrices inverted (None: each after a few
            seconds, if tqdm is installed).
        num_threads: BLAS threads (None: BLAS's default, all cores; a number needs threadpoolctl).
        Reproducibility: R, and so the fingerprint, lambdas, inverses and whitened scores, is the same
        bits for the same rows, precision and num_threads, whether in memory or in a store opened with
        any chunk_bytes: the block products are of _moments.row_ranges(chunked=False) (BLOCK_ROWS rows,
        fewer for wide rows), a store's smaller pieces gathered into them. Another BLAS thread count with
        precision="float32" changes R at rounding level (the float32 product's rounding follows how BLAS splits
        it among threads; num_threads=None on machines of other core counts is such a change). The scores then differ
        by about 1e-7 of the largest (1.3e-7 measured: 9000 x 300 rows, damping 10, 1 or 2 threads),
        amplified at small damping as R's other rounding is (see the class docstring); fit with a fixed
        num_threads where fingerprints must match.
        Using a fitted whitening (apply, self_influence, scoring against its output) is the same bits for
        any thread count and chunk_bytes.
        NaN or Inf in a row raises the scoring kernel's ValueError (set, checkpoint, first rows), as do
        apply and self_influence.
        """
        from ..scoring import as_gradient_set

        damping = check_damping(damping)
        precision = check_precision(precision)
        train = as_gradient_set(train, "train")
        sets = [("train", train)]
        if mix is not None:
            mix = _matching(as_gradient_set(mix, "mix"), train, "mix", "train")
            sets.append(("mix", mix))
        mix_weight = _check_mix_weight(mix_weight)
        if mix is None and mix_weight not in (_MIX_WEIGHT, 0.0):  # 0.0: what the spec records without a mix
            raise ValueError(
                f"mix_weight={mix_weight!r} is the mix set's share of R, but no mix= was given; pass mix= too, "
                "or leave mix_weight out"
            )
        for name, s in sets:
            if s.n_rows == 0:
                raise ValueError(f"{name} has no rows; whitening needs at least one gradient to fit")
            problem = metadata_problem(s.metadata)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
            if "whitening" in s.metadata:
                raise ValueError(f"{name} is already whitened (metadata['whitening']); fit on unwhitened gradients")
        for i, side in enumerate(matrix_sides(train)):
            if side == 0:
                raise ValueError(
                    f"train {_what(i, train.factored)} has 0 columns (dims {_dims_list(train)}); whitening needs "
                    f"at least one column per {'factor' if train.factored else 'checkpoint'}: "
                    "drop the empty checkpoint from train" + ("" if mix is None else " and mix")
                )
        max_bytes = default_max_bytes() if max_bytes is None else positive_int(max_bytes, "max_bytes")
        check_budget(matrix_sides(train), len(sets) + 1, max_bytes)  # moments, then inverses
        bar = fit_bar(sum(s.n_rows for _, s in sets), progress)
        try:  # closed before the inversion, so that its time and rate are the row pass's
            with blas_threads(num_threads):
                moments = [second_moments(s, bar, precision, name) for name, s in sets]
        finally:
            bar.close()
        blended = (
            moments[0]
            if mix is None
            else [(1.0 - mix_weight) * r + mix_weight * e for r, e in zip(*moments, strict=True)]
        )
        del moments
        fingerprint = _fingerprint(blended)
        with blas_threads(num_threads):
            inverses, lambdas = _invert(blended, damping, train.factored, precision, progress)
        spec = WhiteningSpec(
            kind="kfac" if train.factored else "full",
            damping=damping,
            precision=precision,
            lambdas=lambdas,
            dims=[list(d) if train.factored else int(d) for d in train.dims],
            n_rows=train.n_rows,
            mix_rows=0 if mix is None else mix.n_rows,
            mix_weight=mix_weight if mix is not None else 0.0,
            fingerprint=fingerprint,
            fitted_on=getattr(train, "store_id", None),
            space=_space(train.metadata),
        )
        return cls._owned(blended, inverses, spec)

    def with_damping(self, damping: float, *, progress: bool | None = None) -> Whitening:
        """The same fitted R at another damping (lambda_c = damping * trace(R_c) / d_c, as in fit),
        without reading the gradients again: only the damped inverses are recomputed (one Cholesky
        per matrix). Its spec differs in damping and lambdas; the fingerprint of R is the same.
        progress: tqdm bar over the matrices inverted and checked, as in fit."""
        damping = check_damping(damping)
        check_progress(progress)
        inverses, lambdas = _invert(self._moments, damping, self.factored, self.spec.precision, progress)
        return Whitening._owned(
            self._moments, inverses, dataclasses.replace(self.spec, damping=damping, lambdas=lambdas)
        )

    # -- using it -------------------------------------------------------------------------------
    @property
    def factored(self) -> bool:
        """Whether it whitens FactoredGradients (Kronecker-factored) rather than full gradients."""
        return self.spec.kind == "kfac"

    @property
    def inverses(self) -> tuple[np.ndarray, ...]:
        """float64 damped inverses in kernel block order: per checkpoint (R_c + lambda_c I)^-1, or
        (B_c + lambda_B I)^-1 then (A_c + lambda_A I)^-1 (factored). Read-only (copy one to change it):
        they are the matrices apply, self_influence and save use."""
        return tuple(self._inverses)

    def apply(
        self, test: Any, *, progress: bool | None = None, num_threads: int | None = None
    ) -> Gradients | FactoredGradients:
        """The test gradients times (R_c + lambda_c I)^-1 per checkpoint (float64 products, float32
        rows; ValueError if one overflows float32. A row whose own gradient is tiny, e.g. 1e-38 of the others, may
        whiten to float32 subnormals or 0, as it would unwhitened; a damping that would do so to every row is refused
        by fit, with_damping and load), in memory: Gradients (or FactoredGradients) with
        test's weights and metadata plus metadata["whitening"] (spec.to_dict()) and, test being a gradient
        store, metadata["whitened_store"] (its id). Score them against the untouched train side. progress:
        tqdm bar over rows (None: after a few seconds, if tqdm is installed), as in fit: n x d_c^2 multiply-adds
        per checkpoint, long for large stores."""
        test = self._accept(test, "test")
        check_progress(progress)
        out = [np.empty((test.n_rows, inv.shape[0]), dtype=np.float32) for inv in self._inverses]
        bar = progress_bar(test.n_rows, progress, "tracin whitening apply", unit="row")
        try:
            with blas_threads(num_threads):
                for start, stop in row_ranges(test):
                    blocks = finite_float32(test, "test", start, stop)
                    for b, (dst, inv, x) in enumerate(zip(out, self._inverses, blocks, strict=True)):
                        white = x.astype(np.float64) @ inv
                        if not np.all(np.abs(white) <= _FLOAT32_MAX):
                            raise ValueError(
                                f"whitened test {block_name(self.factored, b)} overflowed float32 (rows from "
                                f"{start}) although every input is finite; rescale the gradients or raise damping"
                            )
                        dst[start:stop] = white
                    bar.update(stop - start)
        finally:
            bar.close()
        weights = test.weights if test.weights_given else None
        metadata = {**test.metadata, "whitening": self.to_dict()}
        if isinstance(store_id := getattr(test, "store_id", None), str):  # rows of the store fitted on: W g_train
            metadata["whitened_store"] = store_id
        if self.factored:
            return FactoredGradients(out[0::2], out[1::2], weights, metadata=metadata)
        return Gradients(out, weights, metadata=metadata)

    def self_influence(
        self, train: Any, *, per_checkpoint: bool = False, progress: bool | None = None, num_threads: int | None = None
    ) -> np.ndarray:
        """float32 (n,): sum_c w_c g_c(i)^T (R_c + lambda_c I)^-1 g_c(i) per train row, in float64,
        streaming the rows (factored: the product of the left and right quadratic forms).
        per_checkpoint: float32 (n, C) instead, column c holding checkpoint c's term. ValueError where a term
        overflows float32. A row whose own gradient is tiny beside the others (a memorised example's, 1e-20 of them)
        has a term that float32 rounds to a subnormal or 0, as plain self_influence does; a damping that would do so
        to every row is refused by fit, with_damping and load."""
        from ..scoring import check_self_influence_rows, fitted_elsewhere

        train = self._accept(train, "train")
        check_self_influence_rows(train)
        if (store_id := fitted_elsewhere(self.spec.fitted_on, train)) is not None:
            warnings.warn(
                f"the whitening was fitted on another gradient store (id {self.spec.fitted_on}) than the train store "
                f"{train.path} (id {store_id}); its self-influence is whitened by that store's second moment: fit the "
                "whitening on these gradients (Whitening.fit(train)) unless that was meant (a subset or a copy "
                "re-exported)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        per_checkpoint = flag(per_checkpoint, "per_checkpoint")
        check_progress(progress)
        result = np.empty((train.n_rows, train.n_checkpoints) if per_checkpoint else train.n_rows, dtype=np.float32)
        beyond = []  # (first row, its rows' |result| > float32's largest) of the blocks holding such a row
        bar = progress_bar(train.n_rows, progress, "tracin whitened self_influence", unit="row")
        try:
            with blas_threads(num_threads):
                for start, stop in row_ranges(train):
                    forms = []
                    blocks = finite_float32(train, "train", start, stop)
                    for inv, x in zip(self._inverses, blocks, strict=True):
                        x = x.astype(np.float64)
                        forms.append(np.einsum("ij,ij->i", x @ inv, x))
                    terms = [a * b for a, b in zip(forms[0::2], forms[1::2], strict=True)] if self.factored else forms
                    with np.errstate(over="ignore", invalid="ignore"):  # checked below (Inf - Inf: NaN)
                        total = np.stack(terms, axis=1) * train.weights  # float64 (rows, C), this block only
                        if not per_checkpoint:
                            total = total.sum(axis=1)
                        result[start:stop] = total
                    over = ~(np.abs(total) <= _FLOAT32_MAX)  # NaN (Inf - Inf) counts too
                    if over.any():
                        beyond.append((start, over))
                    bar.update(stop - start)
        finally:
            bar.close()
        if beyond:
            _overflowed(beyond, per_checkpoint)
        return result

    def _accept(self, s: Any, name: str) -> GradientSet:
        """`s` as a gradient set of the fitted kind, dims and gradient space, not already whitened."""
        from ..scoring import _check_same_hyperparameters, _check_same_optimizer_states, as_gradient_set

        s = as_gradient_set(s, name)
        if "whitening" in s.metadata:
            raise ValueError(f"{name} is already whitened (metadata['whitening']); whiten only unwhitened gradients")
        fitted = SimpleNamespace(
            factored=self.factored, dims=self._dims(), metadata=self.spec.space, n_checkpoints=len(self.spec.dims)
        )
        if name == "test":  # scored against the train side: the pairings scoring allows (e.g. LESS's)
            return _matching(s, fitted, name)
        problem = metadata_problem(s.metadata)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
        both_recorded = "mode" in s.metadata and "mode" in self.spec.space  # else "preconditioner" is not read
        kinds = [
            (m.get("preconditioner") or {}).get("kind") if both_recorded else None
            for m in (s.metadata, self.spec.space)
        ]
        if kinds[0] != kinds[1]:
            raise ValueError(
                f"{name} gradients are preconditioner={kinds[0]!r} but the whitening was fitted on "
                f"preconditioner={kinds[1]!r}{MATCHING_ADVICE}"
            )
        if kinds[0] is not None:  # the records left out of _matching below: the preconditioner's settings and states
            names = (name, "the gradients the whitening was fitted on")
            _check_same_hyperparameters(s.metadata, self.spec.space, names)
            _check_same_optimizer_states(s.metadata, self.spec.space, names)
        plain = [{k: v for k, v in m.items() if k != "preconditioner"} for m in (s.metadata, self.spec.space)]
        _matching(
            SimpleNamespace(factored=s.factored, dims=s.dims, metadata=plain[0], n_checkpoints=s.n_checkpoints),
            SimpleNamespace(**{**vars(fitted), "metadata": plain[1]}),
            name,
        )
        return s

    def _dims(self) -> tuple:
        return tuple(tuple(d) for d in self.spec.dims) if self.factored else tuple(self.spec.dims)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The spec as JSON-serialisable plain values (what metadata['whitening'] records)."""
        return dataclasses.asdict(self.spec)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the spec, the float64 inverses and the undamped moments (for with_damping) to one
        .npz file at exactly `path` (no suffix is added; load(path) reads it back). It is written to a
        temporary file beside `path` (a symbolic link's target), with the permissions of the file it
        replaces, and renamed over it once complete, so an error or interrupt leaves `path` as it was.
        A file a rename cannot replace (other hard links, an owner or group this process cannot give,
        a folder refusing new files) is rewritten in place from a complete temporary copy: only an
        interrupt or error during that final copy leaves it partly written. A FIFO or device is
        written directly (tracin._whole_file). PermissionError naming `path` when it exists and may
        not be written."""
        arrays = {f"inverse_{i}": inv for i, inv in enumerate(self._inverses)}
        arrays.update({f"moment_{i}": m for i, m in enumerate(self._moments)})
        with whole_file(path, binary=True) as f:  # a file, not a name: np.savez(name) would append ".npz"
            np.savez(f, spec=np.array(json.dumps(self.to_dict())), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Whitening:
        """A Whitening saved by save(). ValueError naming the file if it is not one: not an .npz
        archive (or a damaged one: unknown compression, encrypted, bad deflate data), a spec nested
        deeper than 64 levels or with a field fit would not record (kind, dims, damping, precision, row
        counts, mix_weight, fingerprint, space: its 'preconditioner' and 'params' as scoring reads
        them), matrices missing, of other shapes or dtypes (read
        from their headers, before their data), not finite, moments of another fingerprint, lambdas
        that are not finite positive numbers or not damping times the moments' mean eigenvalues (to 1e-9
        relative; the recomputed ones are used), or stored inverses that fail the
        O(d^2) checks of _checked_inverses (symmetry, positive diagonals, the residual of (R + lambda
        I) X v = v on a few random v, within float64 rounding): the inverses are kept as stored, not
        recomputed, except where the damping is so small that rounding hides a wrong inverse from the
        residual (tol * |R + lambda I| / lambda > 1e-6): those are recomputed from the moments (O(d^3),
        as with_damping does), so a file holding another damping's inverse still whitens correctly.
        Either way the inverses pass fit's rounding guard (check_top_eigenvalue: no eigenvalue above
        1.01 / lambda): a file an older version saved at a damping below R's rounding is a ValueError
        saying so, and to refit with precision='float64' or a larger damping. So does one saved at a damping
        so large that fit refuses it (whitened scores or rows in float32's subnormal range: fit's ValueError
        naming the damping, and one that is enough). ValueError too if the matrices (moments and inverses,
        plus one more of the largest) exceed fit's default max_bytes (half the memory the process may use),
        or if `path` is not a regular file (a FIFO, device or directory: refused before it is opened, so a FIFO
        cannot hang it). A file in the first format (saved before 2026-12-02: no 'precision', no moments) is a
        ValueError saying so and to fit again. OSError if it cannot be opened."""
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{os.fspath(path)} is not a saved tracin.Whitening (not a regular file)")
        with open(path, "rb", opener=_open_nonblocking) as file:
            try:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # replaced since the stat above
                    raise ValueError("not a regular file")
                moments, inverses, spec = _read_saved(file)
            except _TooLarge as e:
                raise ValueError(f"{os.fspath(path)}: {e}") from None
            except _FirstFormat as e:
                raise ValueError(f"{os.fspath(path)} is a tracin.Whitening saved by an older version: {e}") from None
            except _BelowRounding as e:
                raise ValueError(
                    f"{os.fspath(path)} is a tracin.Whitening saved at a damping below the rounding of its second "
                    f"moments (by a version that did not check it), so it would whiten wrongly: {e}. Its inverses "
                    "cannot be used and load takes no other damping: refit it from the train gradients "
                    "(Whitening.fit) as advised"
                ) from None
            except _NOT_SAVED as e:
                reason = str(e) or type(e).__name__
                raise ValueError(f"{os.fspath(path)} is not a saved tracin.Whitening ({reason})") from None
        try:  # fit's check: a file an older version saved at a damping that whitens every row to subnormals
            _check_scale(moments, inverses, _flat(spec.lambdas), spec.damping, spec.kind == "kfac", spec.precision)
        except ValueError as e:
            raise ValueError(
                f"{os.fspath(path)} is a tracin.Whitening saved (by a version that did not check it) at a damping "
                f"fit refuses: {e}. Refit it from the train gradients (Whitening.fit) at such a damping"
            ) from None
        return cls._owned(moments, inverses, spec)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Whitening(kind={s.kind!r}, damping={s.damping}, dims={s.dims}, n_rows={s.n_rows}, "
            f"fingerprint={s.fingerprint!r})"
        )


def _overflowed(beyond: list[tuple[int, np.ndarray]], per_checkpoint: bool) -> None:
    """Raises self_influence's overflow error from its blocks' masks (first row, (rows,) or (rows, C) bools):
    the first rows (per_checkpoint: of the first checkpoint with such a term, as the unwhitened message)."""
    where = ""
    if per_checkpoint:
        checkpoint = min(int(np.flatnonzero(over.any(axis=0))[0]) for _, over in beyond)
        where, beyond = f" in checkpoint {checkpoint}", [(start, over[:, checkpoint]) for start, over in beyond]
    rows = np.concatenate([start + np.flatnonzero(over) for start, over in beyond])[:5].tolist()
    raise ValueError(
        f"whitened self-influence overflowed float32{where} for train rows {rows} "
        "although every input is finite; rescale the gradients (or the learning-rate weights) or raise damping"
    )


# what to do, in Python, where rows do not match a whitening's kind, checkpoints or dims (the command line
# replaces it with its options' advice)
MATCHING_ADVICE = "; apply a whitening fitted on gradients exported the same way: Whitening.fit(train)"
_MIX_ADVICE = "; give mix= gradients exported the same way as train (model, checkpoints, layers, mode, projection)"


def _matching(s: GradientSet, fitted: Any, name: str, against: str = "the whitening") -> GradientSet:
    """`s` if it has the kind, checkpoints, dims and gradient space of `fitted` (named `against` in
    messages); ValueError otherwise (against a whitening: with MATCHING_ADVICE)."""
    from ..scoring import _check_same_gradient_space, _slots_text

    advice = MATCHING_ADVICE if against == "the whitening" else _MIX_ADVICE
    if s.factored != fitted.factored:
        kinds = ("full", "factored")
        raise ValueError(
            f"{name} gradients are {kinds[s.factored]} but {against} is for {kinds[fitted.factored]} gradients{advice}"
        )
    if s.n_checkpoints != fitted.n_checkpoints:
        raise ValueError(f"{name} has {_slots_text(s)} but {against} has {_slots_text(fitted)}{advice}")
    if tuple(s.dims) != tuple(fitted.dims):
        raise ValueError(f"{name} dims {list(s.dims)} differ from {against}'s dims {list(fitted.dims)}{advice}")
    fitted_on = against if against == "train" else f"the gradients {against} was fitted on"
    _check_same_gradient_space(s, fitted, (name, fitted_on))
    return s


def _space(metadata: dict) -> dict:
    """The metadata of a train set that a whitening records (WhiteningSpec.space)."""
    space = {k: metadata[k] for k in _SPACE_KEYS if k in metadata}
    fingerprints = metadata.get("fingerprints")
    if isinstance(fingerprints, dict) and "checkpoints" in fingerprints:
        space["fingerprints"] = {"checkpoints": fingerprints["checkpoints"]}
        if "optimizer_states" in fingerprints:  # a preconditioner's: scoring compares "adam" sides' states too
            space["fingerprints"]["optimizer_states"] = fingerprints["optimizer_states"]
    return space


def _dims_list(s: GradientSet) -> list:
    """The set's dims as plain lists of ints, for messages."""
    return [list(map(int, d)) if s.factored else int(d) for d in s.dims]


def _what(i: int, factored: bool) -> str:
    """The name of matrix `i` (kernel block order) in errors."""
    return f"checkpoint {i // 2} ({('left', 'right')[i % 2]} factor)" if factored else f"checkpoint {i}"


def _lambdas(moments: list[np.ndarray], damping: float, factored: bool) -> list:
    """lambda per checkpoint (full) or [lambda_B, lambda_A] per checkpoint (kfac), as WhiteningSpec.lambdas."""
    scale = math.sqrt(damping) if factored else damping
    flat = []
    for i, r in enumerate(moments):
        mean = mean_eigenvalue(r, _what(i, factored))
        lam = scale * mean
        if not (math.isfinite(lam) and lam > 0):  # damping * mean eigenvalue overflowed or underflowed float64
            raise ValueError(
                f"damping {damping!r} gives {_what(i, factored)} lambda = {lam!r} (damping x the mean eigenvalue "
                f"{mean:.6g} of R), not a finite positive float64; choose a damping that keeps lambda in range"
            )
        flat.append(lam)
    return [flat[i : i + 2] for i in range(0, len(flat), 2)] if factored else flat


def _flat(lambdas: list) -> list[float]:
    """The lambdas in kernel block order, one per matrix."""
    return [x for v in lambdas for x in (v if isinstance(v, list) else [v])]


def _invert(
    moments: list[np.ndarray], damping: float, factored: bool, precision: str, progress: bool | None
) -> tuple[list[np.ndarray], list]:
    """Damped inverses and the lambdas, per checkpoint (see Whitening); `moments` are left as they are.
    `precision` (fit's) is named in the advice of damped_inverse's errors. Warns when the damping
    leaves float32 scores rounding beyond _conditioning.SCORE_ERROR (a smaller damping than R allows).
    progress: a bar over the matrices, each counted once inverted and its eigenvalue ends found."""
    lambdas = _lambdas(moments, damping, factored)
    inverses, ends = [], []
    bar = progress_bar(len(moments), progress, "tracin whitening invert", unit="matrix", unit_scale=False)
    try:
        for i, (r, lam) in enumerate(zip(moments, _flat(lambdas), strict=True)):
            inverses.append(damped_inverse(r, lam, _what(i, factored), precision))
            ends.append(eigenvalue_ends(r))
            bar.update(1)
    finally:
        bar.close()
    _check_scale(moments, inverses, _flat(lambdas), damping, factored, precision)
    warn_if_ill_conditioned(
        ends, inverses, damping, lambda d: _flat(_lambdas(moments, d, factored)), 2 if factored else 1
    )
    return inverses, lambdas


def _check_scale(
    moments: list[np.ndarray],
    inverses: list[np.ndarray],
    lambdas: list[float],
    damping: float,
    factored: bool,
    precision: str,
) -> None:
    """ValueError naming `damping` if it leaves a checkpoint's whitened scores or rows in float32's subnormal range
    (damping >= about 1e40 would give all-zero scores and self-influence silently):
    - scores: the train rows' mean self-influence tr(R (R + lambda I)^-1) (for K-FAC the product of the two factors'
      traces) below _SCORE_FLOOR (2^24 x float32's smallest normal number, so that scores down to 2^-24 of it stay
      normal). Far above R's eigenvalues it is about d / damping whatever the gradients' scale.
    - rows: a lower bound on the root mean square entry of a whitened train row, sqrt(tr(R X) / ((lambda + tr R) d))
      (tr(X R X) >= tr(R X) / (lambda + largest eigenvalue) >= tr(R X) / (lambda + tr R)), below float32's smallest
      normal number: about sqrt(mean eigenvalue) / lambda at such dampings, so it depends on the gradients' scale
      (1e15: damping 1e23).
    Both fall as 1 / damping there (a K-FAC factor's row as 1 / sqrt(damping)), from which the damping advised.
    Where the rows' bound stays below float32's smallest normal number even as damping -> 0 (_log_rows_limit:
    gradients of scale about 1e37 and more) no damping is advised: the gradients must be rescaled. `precision`:
    fit's, whose rounding of R sets the eigenvalues _log_rows_limit counts."""
    traces = [float(np.einsum("ij,ij->", r, x)) for r, x in zip(moments, inverses, strict=True)]
    per = 2 if factored else 1
    for c in range(len(traces) // per):
        problems = []  # (the largest damping that would do, what is too small)
        mean = float(np.prod(traces[c * per : (c + 1) * per]))
        if mean < _SCORE_FLOOR:
            problems.append(
                (
                    damping * mean / _SCORE_FLOOR,
                    f"whitened scores at about {mean:.3g} (the train rows' mean self-influence), too near "
                    f"float32's smallest normal number ({_FLOAT32_TINY:.2g}), below which scores round to subnormals "
                    f"or 0 (it must be at least {_SCORE_FLOOR:.2g}, 2^24 x that, for scores down to 2^-24 of it to "
                    "stay normal)",
                )
            )
        for i in range(c * per, (c + 1) * per):
            r, lam = moments[i], lambdas[i]
            # in logarithms: at dampings near float64's range the square root's argument underflows float64
            log_rms = 0.5 * (math.log(max(traces[i], 1e-300)) - math.log(lam + float(np.trace(r))) - math.log(len(r)))
            if log_rms < math.log(_FLOAT32_TINY):
                rows = f"{('left', 'right')[i % 2]} factor's rows" if factored else "rows"
                what = (
                    f"whitened {rows} at about {math.exp(log_rms):.3g} an entry (root mean square, at least), "
                    f"below float32's smallest normal number ({_FLOAT32_TINY:.2g}): subnormals or 0"
                )
                log_limit = _log_rows_limit(r, precision)
                if log_limit < math.log(_FLOAT32_TINY):  # no damping lifts them: the gradients are too large
                    raise ValueError(
                        f"damping {damping!r} leaves checkpoint {c}'s {what}; no damping avoids it (as damping -> 0 "
                        f"that bound rises only to {math.exp(log_limit):.3g}, about 1 / the gradients' scale): "
                        f"rescale the gradients, multiplying them by about "
                        f"{0.95 * math.exp(log_rms - math.log(_FLOAT32_TINY)):.2g} or less for this damping (the "
                        "whitened rows scale as 1 / the gradients, the whitened scores not at all)"
                    )
                problems.append(
                    (damping * math.exp((log_rms - math.log(_FLOAT32_TINY)) * (2 if factored else 1)), what)
                )
        if problems:
            most, what = min(problems)
            raise ValueError(
                f"damping {damping!r} leaves checkpoint {c}'s {what}; use a damping of about {0.95 * most:.2g} or less"
            )  # 0.95: rounding to 2 digits never goes above the damping that would do


def _log_rows_limit(r: np.ndarray, precision: str) -> float:
    """log of _check_scale's row bound sqrt(tr(R X) / ((lambda + tr R) d)) as damping -> 0, where tr(R X) -> the
    rank of R (its eigenvalues above d x the epsilon of `precision`, the dtype R was summed in, of the largest:
    below that they are R's rounding, which fit refuses a lambda under): the most any damping gives. O(d^3),
    only where the bound failed."""
    eigenvalues = np.linalg.eigvalsh(r)
    epsilon = np.finfo(PRECISIONS[precision]).eps
    rank = int(np.count_nonzero(eigenvalues > len(r) * epsilon * eigenvalues[-1]))
    return 0.5 * (math.log(max(rank, 1)) - math.log(float(np.trace(r))) - math.log(len(r)))


_PROBES = 4  # random vectors each stored inverse is checked on at load
_ROUNDING = 4  # load's bars on asymmetry and residual, in units of d x float64 epsilon (measured: below 5 eps)
_UNRESOLVED = 1e-6  # tol * |R + lambda I| / lambda above which the residual cannot vouch for X: recomputed
_STRIP = 256  # rows per strip when checking symmetry (no d x d temporary)


def _checked_inverses(
    moments: list[np.ndarray],
    inverses: list[np.ndarray],
    lambdas: list[float],
    damping: float,
    factored: bool,
    precision: str | None = None,
) -> list[np.ndarray]:
    """The stored inverses, each checked to look like the damped inverse (R + lambda I)^-1 of its
    moment R (ValueError otherwise), in O(d^2): R and X symmetric to within tol = _ROUNDING * d * eps of
    their largest entry, R + lambda I and X with positive diagonals and X v . v > 0, and, for _PROBES
    random v (fixed seed), the backward error |(R + lambda I) X v - v| <= tol * (norm * |X v| + |v|),
    norm >= |R + lambda I| (the least of trace and largest absolute row sum, plus lambda). A float64
    inverse meets that whatever the condition number, BLAS or thread count; it is a check of what save
    wrote, not a proof of positive definiteness. Where tol * norm / lambda > _UNRESOLVED the residual
    of an inverse at another damping (or with a flipped null-space eigenvalue) is within that bar too:
    such an X is replaced by damped_inverse(R). Either way X must pass check_top_eigenvalue, as in fit
    (_BelowRounding otherwise, as for a failed damped_inverse)."""
    rng = np.random.default_rng(0)
    checked = list(inverses)
    for i, (r, x, lam) in enumerate(zip(moments, inverses, lambdas, strict=True)):
        d = r.shape[0]
        tol = _ROUNDING * d * np.finfo(np.float64).eps
        row_sum = _strips(r, lambda rows: np.abs(rows).sum(axis=1).max())
        for name, m in (("moment", r), ("inverse", x)):
            peak, off = _strips(m, lambda rows: np.abs(rows).max()), _asymmetry(m)
            if off > tol * peak:
                raise ValueError(f"{name}_{i} is not symmetric (largest |M - M^T| {off:.3g}, largest |M| {peak:.3g})")
        if not (np.diagonal(r).min() + lam > 0 and np.diagonal(x).min() > 0):
            raise ValueError(f"{_what(i, factored)}: R + lambda I is not positive definite (lambda = {lam})")
        norm = min(float(np.trace(r)), row_sum) + lam
        if tol * norm / lam > _UNRESOLVED:
            try:
                checked[i] = damped_inverse(r, lam, _what(i, factored), precision)
            except ValueError as e:
                raise _BelowRounding(f"at damping {damping}, {e}") from None
            continue
        v = rng.standard_normal((d, _PROBES))
        y = x @ v
        residual = np.linalg.norm(r @ y + lam * y - v, axis=0)
        bar = tol * (norm * np.linalg.norm(y, axis=0) + np.linalg.norm(v, axis=0))
        if not (np.all(np.einsum("ij,ij->j", y, v) > 0) and np.all(residual <= bar)):
            raise ValueError(
                f"inverse_{i} is not the damped inverse of moment_{i} at damping {damping}: residual "
                f"|(R + lambda I) X v - v| {residual.max():.3g}, above float64 rounding ({bar.min():.3g})"
            )
        try:  # the inverse of R + lambda I, but R's rounding may exceed lambda: fit's guard
            check_top_eigenvalue(x, lam, _what(i, factored), precision)
        except ValueError as e:
            raise _BelowRounding(f"at damping {damping}, {e}") from None
    return checked


def _strips(m: np.ndarray, reduce: Any) -> float:
    """The largest of reduce(rows) over strips of _STRIP rows of `m` (no temporary as large as `m`)."""
    return max(float(reduce(m[a : a + _STRIP])) for a in range(0, m.shape[0], _STRIP))


def _asymmetry(m: np.ndarray) -> float:
    """max |m - m^T|, by tiles of _STRIP x _STRIP (cache-friendly, no temporary as large as `m`)."""
    d, off = m.shape[0], 0.0
    for a in range(0, d, _STRIP):
        for b in range(a, d, _STRIP):
            off = max(off, float(np.abs(m[a : a + _STRIP, b : b + _STRIP] - m[b : b + _STRIP, a : a + _STRIP].T).max()))
    return off


class _TooLarge(ValueError):
    """A saved whitening whose matrices exceed the memory load allows."""


class _BelowRounding(ValueError):
    """A saved whitening whose damping is below its moments' rounding (fit and with_damping refuse it)."""


class _FirstFormat(ValueError):
    """A whitening saved in the first format (a spec without 'precision', inverses without the moments)."""


# The spec fields of the first format (d302db9): today's but 'precision'.
_FIRST_FORMAT_FIELDS = frozenset(
    {"kind", "damping", "lambdas", "dims", "n_rows", "mix_rows", "mix_weight", "fingerprint", "fitted_on", "space"}
)


# What reading a damaged or crafted file raises: zipfile's own errors, and RuntimeError for an encrypted
# member (NotImplementedError, a RuntimeError, for an unknown compression method), zlib.error for bad deflate
_NOT_SAVED = (
    OSError,
    EOFError,
    KeyError,
    TypeError,
    ValueError,
    MemoryError,
    OverflowError,
    RuntimeError,
    zipfile.BadZipFile,
    zlib.error,
)


def _open_nonblocking(path: str, flags: int) -> int:
    """os.open with O_NONBLOCK (open()'s opener): a FIFO swapped in after the check cannot block the open."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


_READ_BYTES = 16 * 2**20  # a member's data is read in pieces of this size (zipfile copies each piece)
_SPEC_MAX_CHARS = 1 << 20  # a saved spec is a few kB of JSON; a header claiming more is not one save wrote
_HEX = frozenset("0123456789abcdef")


def _read_saved(file: IO[bytes]) -> tuple[list[np.ndarray], list[np.ndarray], WhiteningSpec]:
    """The moments, inverses and spec of a file written by Whitening.save (ValueError, KeyError,
    TypeError or the archive's own errors otherwise). Every member's .npy header is checked against
    the spec (shape, float64) before its data is read; the spec against the moments (fingerprint,
    lambdas); the stored inverses against the moments (_checked_inverses). _TooLarge if the matrices
    exceed default_max_bytes()."""
    if not zipfile.is_zipfile(file):  # else np.load would read .npy files, and suggest unpickling others
        raise ValueError("not a complete .npz archive")
    file_bytes = file.seek(0, os.SEEK_END)
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        text = str(_read_member(archive, "spec", (), "U", file_bytes=file_bytes)[()])
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"spec is JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
        fields = json.loads(text)
        if isinstance(fields, dict) and set(fields) == _FIRST_FORMAT_FIELDS:
            raise _FirstFormat(
                "its spec records no 'precision' and it holds no second moments, as files saved by tracin before "
                "2026-12-02 (a9b3c6d); without the moments it cannot be checked or re-damped: fit it again from "
                "the train gradients (Whitening.fit) and save that"
            )
        spec = _checked_spec(WhiteningSpec(**fields))
        sides = [k for d in spec.dims for k in (d if isinstance(d, list) else [d])]
        need, budget = matrix_bytes(sides, 2, 1), default_max_bytes()  # moments, inverses, a copy to hash
        if need > budget:
            raise _TooLarge(
                f"its float64 matrices (dims {sides}) need {need / 2**30:.2f} GiB, above the {budget / 2**30:.2f} GiB "
                "load allows (half the memory this process may use: the least of the physical memory, its cgroup's "
                "limit and RLIMIT_AS; 8 GiB where the OS reports none); load it where more memory is allowed"
            )
        moments, stored = (
            [_read_member(archive, f"{kind}_{i}", (k, k), "f", spec.dims, file_bytes) for i, k in enumerate(sides)]
            for kind in ("moment", "inverse")
        )
    if not all(np.all(np.isfinite(m)) for m in (*stored, *moments)):
        raise ValueError("a matrix holds NaN or Inf")
    fingerprint = _fingerprint(moments)
    if fingerprint != spec.fingerprint:
        raise ValueError(f"the moments' fingerprint is {fingerprint}, but the spec records {spec.fingerprint}")
    factored = spec.kind == "kfac"
    lambdas = _lambdas(moments, spec.damping, factored)
    recorded = np.asarray(spec.lambdas, dtype=np.float64)
    # relative only: an absolute tolerance would pass any lambdas of gradients of small scale (lambda ~1e-9)
    if recorded.shape != np.shape(lambdas) or not np.allclose(recorded, lambdas, rtol=1e-9, atol=0.0):
        raise ValueError(f"lambdas {spec.lambdas} are not damping {spec.damping} times the moments' mean eigenvalues")
    spec = dataclasses.replace(spec, lambdas=lambdas)  # the recomputed ones (fit's, bit for bit) from here on
    inverses = _checked_inverses(moments, stored, _flat(lambdas), spec.damping, factored, spec.precision)
    return moments, inverses, spec


def _numbers(values: Any) -> bool:
    """Whether `values` is a list of real numbers or of lists of them (no bools, strings, dicts)."""
    items = [x for v in values for x in (v if isinstance(v, list) else [v])] if isinstance(values, list) else None
    return items is not None and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in items)


def _checked_spec(spec: WhiteningSpec) -> WhiteningSpec:
    """`spec` if every field is what fit records (ValueError or TypeError naming the field otherwise)."""
    if spec.kind not in ("full", "kfac"):
        raise ValueError(f"kind {spec.kind!r} is neither 'full' nor 'kfac'")
    per_checkpoint = 2 if spec.kind == "kfac" else 1
    kfac = spec.kind == "kfac"  # fit records a kfac checkpoint's dims as [p, q], a full one's as d
    sides = (
        [d if kfac else [d] for d in spec.dims]
        if isinstance(spec.dims, list) and all(isinstance(d, list) == kfac for d in spec.dims)
        else []
    )
    if not sides or any(
        len(s) != per_checkpoint or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in s)
        for s in sides
    ):
        raise ValueError(f"dims {spec.dims} are not positive sizes per checkpoint of a {spec.kind} whitening")
    check_damping(spec.damping)
    check_precision(spec.precision)
    lambdas = [v if isinstance(v, list) else [v] for v in spec.lambdas] if _numbers(spec.lambdas) else []
    if [len(v) for v in lambdas] != [len(s) for s in sides] or not all(
        math.isfinite(x) and x > 0 for v in lambdas for x in v
    ):
        raise ValueError(
            f"lambdas {spec.lambdas} are not finite positive numbers per checkpoint of a {spec.kind} whitening"
        )
    for name, least in (("n_rows", 1), ("mix_rows", 0)):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} {value!r} is not an integer >= {least}")
    _check_mix_weight(spec.mix_weight)
    if spec.mix_rows == 0 and spec.mix_weight != 0.0:  # fit records mix_weight 0.0 without a mix set
        raise ValueError(f"mix_weight {spec.mix_weight!r} with mix_rows 0: fit records 0.0 without a mix set")
    if not (isinstance(spec.fingerprint, str) and len(spec.fingerprint) == 16 and set(spec.fingerprint) <= _HEX):
        raise ValueError(f"fingerprint {spec.fingerprint!r} is not 16 hex digits")
    if spec.fitted_on is not None and not isinstance(spec.fitted_on, str):
        raise ValueError(f"fitted_on {spec.fitted_on!r} is neither a store id nor null")
    if not isinstance(spec.space, dict):
        raise ValueError(f"space {spec.space!r} is not the train set's metadata (a JSON object)")
    problem = metadata_problem(spec.space)
    if problem is not None:
        raise ValueError(f"space, the train set's metadata, is not as fit records it: {problem}")
    return spec


def _read_member(
    archive: zipfile.ZipFile, name: str, shape: tuple, kind: str, dims: list | None = None, file_bytes: int = 0
) -> np.ndarray:
    """Member `name`.npy of the archive as an array of `shape` ("f": float64; "U": a string of at
    most _SPEC_MAX_CHARS), its header checked before its data is read (ValueError otherwise).
    file_bytes: the size of the archive's file. A member must be stored uncompressed, as save
    (np.savez) writes it, and no larger than the file, so that what a load allocates is bounded by the
    file's size (a compressed member of zeros would expand a small file to gigabytes); checked from
    the member's directory entry, before any of its data is read."""
    try:
        info = archive.getinfo(f"{name}.npy")
    except KeyError:
        raise ValueError(f"{name} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"member {info.filename} is compressed (zip method {info.compress_type}); save stores its members "
            "uncompressed"
        )
    if info.file_size > file_bytes:
        raise ValueError(f"member {info.filename} claims {info.file_size} bytes, more than the file's {file_bytes}")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{name} is .npy format version {version}, not one save writes")
        found, fortran, dtype = read_header[version](member)
        if kind == "f" and (found != shape or dtype.kind != "f" or dtype.itemsize != 8):
            raise ValueError(
                f"matrix shapes do not match dims {dims}: {name} is {found} {dtype}, expected {shape} float64"
            )
        if kind == "U" and (found != shape or dtype.kind != "U" or dtype.itemsize > 4 * _SPEC_MAX_CHARS):
            raise ValueError(f"{name} is {found} {dtype}, expected a string of at most {_SPEC_MAX_CHARS} characters")
        size = dtype.itemsize * math.prod(shape)
        data = bytearray(size)
        view, done = memoryview(data), 0
        while done < size and (got := member.readinto(view[done : done + _READ_BYTES])):  # zipfile reads a copy
            done += got
        if done != size or member.read(1):
            raise ValueError(f"{name} holds other than the {size} bytes of data its header {found} {dtype} implies")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array, dtype=np.float64) if kind == "f" else array


def _fingerprint(moments: list[np.ndarray]) -> str:
    """16 hex digits of the sha256 of the float64 matrices (shapes included)."""
    h = hashlib.sha256()
    for m in moments:
        h.update(repr(m.shape).encode())
        h.update(np.ascontiguousarray(m))  # its bytes, without a copy
    return h.hexdigest()[:16]


def _check_mix_weight(mix_weight: Any) -> float:
    """`mix_weight` as a float in [0, 1] (TypeError / ValueError naming the argument otherwise)."""
    if isinstance(mix_weight, (bool, np.bool_)) or not isinstance(mix_weight, numbers.Real):
        raise TypeError(f"mix_weight must be a number in [0, 1] (the mix set's share of R), got {mix_weight!r}")
    if not 0 <= mix_weight <= 1:
        raise ValueError(f"mix_weight must be a number in [0, 1] (the mix set's share of R), got {mix_weight!r}")
    return float(mix_weight)
