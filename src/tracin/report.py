"""Per-checkpoint diagnostics: how much each checkpoint contributes to influence, and how the
self-influence ranking changes when late checkpoints are dropped (e.g. after the model has memorised
noisy labels, their large gradients can drown the signal of the earlier ones).

    diag = tracin.report.checkpoint_diagnostics(train, path="checkpoints.png")  # needs matplotlib
    parts = tracin.report.checkpoint_contributions(test, train, tracin.top_k(test, train, k=5))
"""

from __future__ import annotations

import math
import os
import stat
import textwrap
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import DTYPE_CODES
from ._caller import user_stacklevel
from ._whole_file import whole_file
from .backends import TopK
from .gradients import GradientSet, non_finite_message
from .scoring import _checkpoint_run, _normalize_run, _pair, as_gradient_set, self_influence
from .store._convert import bfloat16_bits_to_float32
from .whitening import Whitening

_GATHER_BYTES = 64 << 20  # float64 working bytes of checkpoint_contributions (test rows, gathered train rows)
_TICK_LABELS = 15  # most checkpoints labelled on a panel of the diagnostics figure (more overlap)
_SKIP_BYTES = 1 << 20  # float64 bytes of unwanted train rows read between two wanted ones before a new read


def _float64(block: np.ndarray, code: int) -> np.ndarray:
    """A kernel block (bfloat16 as uint16 bits) as float64."""
    if code == DTYPE_CODES["bfloat16"]:
        block = bfloat16_bits_to_float32(np.asarray(block))
    return np.asarray(block, dtype=np.float64)


def checkpoint_contributions(
    test: Any,
    train: Any,
    result: TopK,
    *,
    layers_per_checkpoint: int | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """float64 (m, k, C), C the checkpoints: entry (t, j, c) is checkpoint c's part of the score of
    the pair (test row t, train row i = result.indices[t, j]), in float64 from the rows (each side
    decoded from its own dtype): the sum over its slots s (its layers, for factored exports) of
    w_s <g_s(t), g_s(i)>. Summed over c it is result.values[t, j] up to float32 rounding.

    result: a TopK of top_k(test, train, ...) (for side="both", pass .proponents or .opponents).
    normalize: what the top_k call that made `result` used (a TopK does not record it). False: the
    parts of the plain score above. True: each slot's term divided by |g(t)| |g(i)|, the norms over
    the slots of its checkpoint as top_k groups them (0 for a zero gradient), so the parts sum to
    the cosine score.
    The parts' sums are checked against result.values: a difference beyond 1e-2 sum_s |w_s| |g_s(t)|
    |g_s(i)| (divided by the norms above for normalize=True; 1000x the float32 error bound, 10x
    precision="tf32"'s) is a RuntimeWarning naming the largest difference, and the parts are still
    returned. Its causes: result was made with the other `normalize` (the parts would not sum to its
    values), or from other test or train gradients, or its float32 score lost a checkpoint's term to
    checkpoints about 1e30 or more apart in scale (README, "Numerical contract"), where the float64
    parts are what explains the score.
    layers_per_checkpoint: slots that form one checkpoint, as in checkpoint_diagnostics (factored
    exports store one slot per layer); default: what the metadata records, else 1.
    """
    test, train, weights = _pair(test, train)
    if not isinstance(result, TopK):
        raise TypeError(
            f"result must be a TopK (values, indices) from tracin.top_k, got {type(result).__name__}"
            " (for side='both' pass .proponents or .opponents)"
        )
    run = _normalize_run(normalize, test, train)
    per = _slots_per_checkpoint(train if _checkpoint_run(train) else test, layers_per_checkpoint)
    indices = np.asarray(result.indices)
    if indices.ndim != 2 or indices.shape[0] != test.n_rows or not np.issubdtype(indices.dtype, np.integer):
        fits = indices.ndim == 2 and np.issubdtype(indices.dtype, np.integer)
        # a well-formed result of other rows: top_k made it from another test set, or test and train came swapped
        swapped = fits and indices.shape[0] == train.n_rows
        raise ValueError(
            f"result.indices must be integer (m, k) with m = {test.n_rows} test rows, got "
            f"{indices.dtype} {indices.shape}"
            + (
                f": result holds {indices.shape[0]} test rows; pass the test and train gradients top_k made it "
                f"from" + (" (test and train the other way round? test comes first)" if swapped else "")
                if fits
                else ""
            )
        )
    if indices.size and (indices.min() < 0 or indices.max() >= train.n_rows):
        raise ValueError(
            f"result.indices must lie in [0, {train.n_rows}) (the train rows), got values from "
            f"{indices.min()} to {indices.max()}"
        )
    m, k = indices.shape
    values = np.asarray(result.values)
    if values.shape != indices.shape or not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise ValueError(
            f"result.values must be real numbers of the shape of result.indices {indices.shape}, got "
            f"{values.dtype} {values.shape}"
        )
    w = np.asarray(weights, dtype=np.float64)
    count = len(weights) // per
    out = np.zeros((m, k, count))
    scale = np.zeros((m, k))  # sum_s |w_s| |g_s(t)| |g_s(i)| (over the norms for cosines): the error bound's
    width = sum(b.shape[1] for b in train.kernel_side(0, 0).blocks)  # columns of one row, all blocks
    # Pieces of `step` test rows x `cols` result columns, sized so that their float64 rows fit the budget
    # together: the test rows, the train rows gathered for them and, one block at a time, those laid out
    # per pair (b[where]); at least one row of each (a row wider than the budget is not split)
    rows = max(3, _GATHER_BYTES // max(1, 8 * width))
    cols = max(1, min(k, (rows - 1) // 2))
    step = max(1, rows // (2 * cols + 1))
    span, skip = max(1, rows // 2), max(1, _SKIP_BYTES // max(1, 8 * width))  # in rows
    for t0 in range(0, m, step):
        t1 = min(m, t0 + step)
        side = test.kernel_side(t0, t1)
        ours = [_float64(b, code) for b, code in zip(side.blocks, side.dtypes, strict=True)]
        _refuse_non_finite("test", test.factored, ours, np.arange(t0, t1))
        own = [np.einsum("td,td->t", a, a)[:, None] for a in ours]
        for j0 in range(0, k, cols):
            j1 = min(k, j0 + cols)
            wanted, where = np.unique(indices[t0:t1, j0:j1], return_inverse=True)
            where = where.reshape(t1 - t0, j1 - j0)
            theirs = _gather_rows(train, wanted, span, skip)
            _refuse_non_finite("train", train.factored, theirs, wanted)
            dots, squares = [], []
            for a, b in zip(ours, theirs, strict=True):  # one block's (t, j, d) rows at a time
                dots.append(np.einsum("td,tjd->tj", a, b[where]))
                squares.append(np.einsum("id,id->i", b, b)[where])
            del theirs
            terms = w * _per_slot(train.factored, dots)
            sizes = np.abs(w) * np.sqrt(_per_slot(train.factored, own) * _per_slot(train.factored, squares))
            if run:
                norms = _norms(train.factored, own, run) * _norms(train.factored, squares, run)
                terms = np.divide(terms, norms, out=np.zeros_like(terms), where=norms > 0)
                sizes = np.divide(sizes, norms, out=np.zeros_like(sizes), where=norms > 0)
            out[t0:t1, j0:j1] = terms.reshape(t1 - t0, j1 - j0, count, per).sum(3)
            scale[t0:t1, j0:j1] = sizes.sum(2)
    _check_sums(out, values, scale, normalize=bool(run))
    return out


# How far the parts' sums may lie from result.values, in units of sum_s |w_s| |g_s(t)| |g_s(i)|: 1000x the
# float32 contract's 1e-5 (README, "Numerical contract") and 10x precision="tf32"'s about 1e-3, so that a
# result top_k made from these rows never trips it (cancelling dots, float16 / bfloat16 / factored rows,
# cosines); plus float32's smallest normal, for scores that top_k rounds to a subnormal float32.
_SUM_SLACK = 1e-2


def _check_sums(parts: np.ndarray, values: np.ndarray, scale: np.ndarray, normalize: bool) -> None:
    """RuntimeWarning if the parts (m, k, C), summed over C, differ from result.values (m, k) by more
    than _SUM_SLACK x scale (the error bound's sum_s |w_s| |g_s(t)| |g_s(i)| per pair) + float32's
    smallest normal: result was not made by top_k from these rows with this `normalize`, or its float32
    score lost a checkpoint's term to checkpoints far apart in scale (the parts are then the exact split)."""
    sums = parts.sum(2)
    diff = np.abs(sums - values.astype(np.float64))
    allowed = _SUM_SLACK * scale + float(np.finfo(np.float32).tiny)
    bad = ~(diff <= allowed)  # NaN values too
    if not bad.any():
        return
    t, j = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(diff, nan=np.inf), -np.inf)), bad.shape)
    warnings.warn(
        f"result.values do not match the parts' sums for normalize={normalize} ({int(bad.sum())} of "
        f"{bad.size} pairs; largest difference {diff[t, j]:.6g} at test row {t}, rank {j}: parts sum to "
        f"{sums[t, j]:.6g}, result.values has {values[t, j]:.6g}, allowed {allowed[t, j]:.3g}): was result "
        f"made by top_k with normalize={not normalize}, or from other test/train gradients, or did its float32 "
        "score lose a checkpoint's term to checkpoints about 1e30 or more apart in scale (README, 'Numerical "
        "contract')? The parts returned are the float64 split of these test and train rows",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _refuse_non_finite(side: str, factored: bool, blocks: list[np.ndarray], rows: np.ndarray) -> None:
    """ValueError as the kernel words it (top_k refuses the same rows) if a block holds NaN or Inf in
    a row; blocks: float64 rows, rows: their indices in `side`, increasing."""
    for b, block in enumerate(blocks):
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))[:5]
        if bad.size:
            raise ValueError(non_finite_message(side, factored, b, rows[bad].tolist()))


def _gather_rows(train: GradientSet, rows: np.ndarray, span: int, skip: int) -> list[np.ndarray]:
    """float64 (len(rows), d) per kernel block: the train rows `rows` (sorted, unique), read by
    ranges of at most `span` rows that skip at most `skip` unwanted rows at a time (not the whole
    set: a store of many files is read into memory, not mapped), each written into its place."""
    gathered = [np.empty((len(rows), b.shape[1])) for b in train.kernel_side(0, 0).blocks]
    done = 0
    breaks = np.flatnonzero(np.diff(rows) > skip) + 1  # a wanted row far from the previous one
    for group in np.split(rows, breaks):
        while len(group):
            start = int(group[0])
            j = int(np.searchsorted(group, start + span))
            side = train.kernel_side(start, int(group[j - 1]) + 1)
            local = group[:j] - start
            for into, b, code in zip(gathered, side.blocks, side.dtypes, strict=True):
                part = np.asarray(b)[local]  # cast into place: no float64 copy of the piece on the way
                into[done : done + j] = bfloat16_bits_to_float32(part) if code == DTYPE_CODES["bfloat16"] else part
            done += j
            group = group[j:]
    return gathered


def _per_slot(factored: bool, per_block: list[np.ndarray]) -> np.ndarray:
    """(t, j, slots) from one (t, j) array per kernel block: a factored slot's left and right blocks
    multiplied (<L, L'> <R, R'> is the dot of the outer products)."""
    if factored:
        per_block = [a * b for a, b in zip(per_block[0::2], per_block[1::2], strict=True)]
    return np.stack(np.broadcast_arrays(*per_block), axis=2)


def _norms(factored: bool, squares: list[np.ndarray], run: int) -> np.ndarray:
    """(t, j, slots): per slot the norm of the gradient of its checkpoint (`run` slots each), from
    one (t, j) array of squared norms per kernel block."""
    slots = _per_slot(factored, squares)
    grouped = slots.reshape(*slots.shape[:2], slots.shape[2] // run, run).sum(3)
    return np.sqrt(np.repeat(grouped, run, axis=2))


@dataclass(frozen=True)
class CheckpointDiagnostics:
    """What checkpoint_diagnostics measured on n training rows and C checkpoints.

    terms: float32 (n, C) each checkpoint's self-influence term w_c |g_c(i)|^2 (layers summed).
    share_all / share_top: float64 (C,) each checkpoint's share of the summed self-influence over
    all rows / over the `top` rows ranked highest by self-influence over all checkpoints.
    overlap: float64 (C,) entry c: the fraction of those `top` rows that are also among the `top`
    rows when only checkpoints 0..c are traced (the last entry is 1).
    figure: the PNG written, or None.
    """

    terms: np.ndarray
    share_all: np.ndarray
    share_top: np.ndarray
    overlap: np.ndarray
    top: int
    figure: Path | None


def _integer(value: Any) -> int | None:
    """`value` as an int if it is a Python or NumPy integer (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _slots_per_checkpoint(train: GradientSet, layers_per_checkpoint: int | None) -> int:
    if layers_per_checkpoint is None:
        return _checkpoint_run(train) or 1
    per = _integer(layers_per_checkpoint)
    if per is None or per < 1 or train.n_checkpoints % per:
        raise ValueError(
            f"layers_per_checkpoint must be a positive integer dividing the set's "
            f"{train.n_checkpoints} checkpoint slots, got {layers_per_checkpoint!r}"
        )
    return per


def _top_rows(scores: np.ndarray, top: int) -> np.ndarray:
    """Indices of the `top` highest scores (ties: smaller index first)."""
    return np.argsort(-scores, kind="stable")[:top]


def checkpoint_diagnostics(
    train: Any,
    *,
    top: int | None = None,
    layers_per_checkpoint: int | None = None,
    path: str | os.PathLike[str] | None = None,
    labels: Iterable[str] | None = None,
    traced: int | None = None,
    num_threads: int | None = None,
    whitening: Whitening | None = None,
) -> CheckpointDiagnostics:
    """Per-checkpoint self-influence of a gradient set (in memory or a store) and, with `path`, a
    PNG of it (needs matplotlib; path ends in .png, or ".png" is added; the result's `figure` is the
    path written): each checkpoint's share over the top rows and over all rows, and
    the overlap of the top-`top` ranking when tracing checkpoints 0..c against all of them.

    top: rows of the ranking compared (default: 10% of the rows, at least 1).
    layers_per_checkpoint: slots of the set that belong to one checkpoint (factored exports store
    one slot per layer); default: what the set's metadata records (one fingerprint per checkpoint
    in metadata["fingerprints"]["checkpoints"], in memory or in a store), else 1.
    labels: one name per checkpoint for the figure, drawn as given ('$' starts no math text) (default "1",
    "2", ...; of more than 15 checkpoints every ceil(C / 15)-th is labelled, the last included, slanted where
    they would overlap); traced: the number of checkpoints a recipe traces, marked in the figure (both
    checked whether or not a figure is drawn).
    whitening: a tracin.Whitening fitted on `train`: the terms are then the whitened self-influence
    w_c g_c(i)^T (R_c + lambda_c I)^-1 g_c(i) (tracin.self_influence's whitening=); an already whitened
    set is refused. Shares are of the summed terms: with negative checkpoint weights (a term below 0)
    they no longer lie in [0, 1], and a warning says so.
    """
    train = as_gradient_set(train, "train")
    per = _slots_per_checkpoint(train, layers_per_checkpoint)
    n = train.n_rows
    if n == 0:
        raise ValueError("train has no rows")
    if top is None:
        top = max(1, math.ceil(0.1 * n))
    if _integer(top) is None or not 1 <= top <= n:
        raise ValueError(f"top must be an integer from 1 to the {n} train rows, got {top!r}")
    top = int(top)
    labels = _labels(train.n_checkpoints // per, labels, traced)  # read once
    if path is not None:  # a figure that cannot be written is refused before the self-influence pass
        path = _png_path(path)
        _figure()
    slots = self_influence(train, per_checkpoint=True, num_threads=num_threads, whitening=whitening)
    terms = slots.astype(np.float64).reshape(n, -1, per).sum(axis=2)
    if np.any(terms < 0):
        warnings.warn(
            "some checkpoint terms of the self-influence are negative (negative checkpoint weights): the shares "
            "are of a sum with terms of both signs, so they do not lie in [0, 1]",
            stacklevel=2,
        )
    total = terms.sum(axis=1)
    best = _top_rows(total, top)
    prefix = np.cumsum(terms, axis=1)
    overlap = np.array([np.intersect1d(_top_rows(prefix[:, c], top), best).size / top for c in range(terms.shape[1])])
    diag = CheckpointDiagnostics(terms.astype(np.float32), _shares(terms), _shares(terms[best]), overlap, top, None)
    if path is None:
        return diag
    figure = plot_checkpoint_diagnostics(diag, path, labels=labels, traced=traced)
    return CheckpointDiagnostics(diag.terms, diag.share_all, diag.share_top, diag.overlap, top, figure)


def _shares(terms: np.ndarray) -> np.ndarray:
    """float64 (C,): each column's sum over the rows, divided by the sum of all (zeros if that is 0)."""
    sums = terms.sum(axis=0)
    whole = sums.sum()
    return sums / whole if whole else np.zeros_like(sums)


def plot_checkpoint_diagnostics(
    diag: CheckpointDiagnostics,
    path: str | os.PathLike[str],
    *,
    labels: Iterable[str] | None = None,
    traced: int | None = None,
) -> Path:
    """Writes the two-panel PNG of checkpoint_diagnostics to `path` (matplotlib, headless) and returns
    the path written: `path` itself when it ends in .png, `path` + ".png" when it has no suffix.
    The PNG is written whole (tracin._whole_file: a temporary file beside it, renamed over it, the old
    file's permissions kept): a save that fails part-way leaves what was there. The figure is drawn
    without pyplot: the caller's backend and open figures are left as they were."""
    count = diag.terms.shape[1]
    path, labels = _png_path(path), _labels(count, labels, traced)
    x = np.arange(count)
    fig = _figure()(figsize=(11, 4), dpi=120)
    shares, ranking = fig.subplots(1, 2)
    shares.bar(x - 0.2, diag.share_top, 0.4, label=f"top {diag.top} rows by self-influence", color="tab:red")
    shares.bar(x + 0.2, diag.share_all, 0.4, label="all rows", color="tab:grey")
    shares.set_ylabel("share of summed self-influence")
    shares.set_title("How much each checkpoint contributes")
    ranking.plot(x, diag.overlap, "o-", color="tab:blue")
    ranking.set_ylim(-0.03, 1.05)  # markers at 0 drawn whole
    ranking.set_ylabel(f"overlap of the top {diag.top} with all checkpoints")
    ranking.set_title("Ranking when tracing only checkpoints 1..c")
    shown = np.arange(count - 1, -1, -math.ceil(count / _TICK_LABELS))[::-1]  # the last checkpoint labelled
    for ax in (shares, ranking):
        ax.set_xticks(x, minor=True)  # a tick at every checkpoint, a label at most at _TICK_LABELS of them
        ax.set_xticks(shown, [labels[c] for c in shown], fontsize=8, parse_math=False)  # names drawn as given
        ax.set_xlabel("checkpoint" if ax is shares else "last checkpoint traced (c)")
        ax.grid(alpha=0.3, axis="y")
        if traced is not None:
            ax.axvline(
                traced - 1 + (0.5 if ax is shares else 0),
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"traced: up to {labels[traced - 1]}" if ax is shares else None,
            )
    # one legend below both panels: inside an axes it covered bars (one checkpoint: both fill the axes)
    handles, names = shares.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: names[i].startswith("traced"))  # the bars first
    handles, names = [handles[i] for i in order], [names[i] for i in order]
    legend = fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    for text in legend.get_texts():  # "traced: up to LABEL": as given, not as math text
        text.set_parse_math(False)
    rect = (0, legend.get_window_extent().height / fig.bbox.height, 1, 1)
    fig.tight_layout(rect=rect)
    if any(_overlapping(ax.get_xticklabels()) for ax in (shares, ranking)):  # long labels: slanted
        for ax in (shares, ranking):
            ax.tick_params(axis="x", labelrotation=45)
            for label in ax.get_xticklabels():
                label.set(horizontalalignment="right", rotation_mode="anchor")
        fig.tight_layout(rect=rect)
    if [_wrap_to_fit(ax, rect[1] * fig.bbox.height) for ax in (shares, ranking)].count(True):  # a y-label too long
        fig.tight_layout(rect=rect)
    with whole_file(path, binary=True) as f:  # a failed save (a full disk) leaves the old figure, not half a PNG
        fig.savefig(f, format="png")
    return path


def _wrap_to_fit(ax: Any, bottom: float) -> bool:
    """Wraps the y-label of `ax` onto as few lines as keep it (drawn centred on the axes) inside the figure,
    above `bottom` (pixels; the legend's top) and clear of the x tick labels: slanted tick labels leave the
    axes less height, and one line ran past the figure's top and was cut off. Whether it was wrapped."""
    label, figure = ax.yaxis.label, ax.get_figure().bbox
    ticks = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
    text = label.get_text()

    def clashes() -> bool:
        box = label.get_window_extent()
        return box.y1 > figure.y1 or box.y0 < bottom or any(box.overlaps(t) for t in ticks)

    lines = 1
    while clashes() and lines < len(text.split()):
        lines += 1
        label.set_text("\n".join(textwrap.wrap(text, math.ceil(len(text) / lines))))
    return lines > 1


def _overlapping(texts: list[Any]) -> bool:
    """Whether two neighbouring texts (tick labels, in order) overlap as drawn."""
    boxes = [t.get_window_extent() for t in texts if t.get_text()]
    return any(a.x1 > b.x0 for a, b in zip(boxes[:-1], boxes[1:], strict=True))


def _png_path(path: str | os.PathLike[str]) -> Path:
    """The PNG path to write for `path`; TypeError for a path that is not a str or os.PathLike,
    ValueError for a path that names no file (empty, ending in a separator, '.png' alone), an existing
    folder, another suffix, in no directory or that cannot be written (_probe_write)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(text := os.fspath(path), str):
        raise TypeError(f"path must be a str or os.PathLike of a str, got {type(path).__name__}")
    given = Path(text)
    if not text or text.endswith(tuple(filter(None, (os.sep, os.altsep)))) or given.name in ("", ".", ".."):
        raise ValueError(f"path must name a file (the PNG to write), got {text!r}")
    if os.path.isdir(given):  # False for a name too long, refused by _probe_write
        raise ValueError(f"path: {text!r} is a directory, not a file the PNG can be written to")
    if given.name.lower() == ".png":
        raise ValueError(f"path must name a file before its .png suffix, got {text!r}")
    path = given if given.suffix else given.with_name(given.name + ".png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"path: the figure is a PNG, so path must end in .png (or have no suffix), got {text!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path: the directory {str(path.parent)!r} of {str(path)!r} does not exist")
    _probe_write(path)
    return path


def _labels(count: int, labels: Iterable[str] | None, traced: int | None) -> list[str]:
    """The labels of a figure of `count` checkpoints as a list; ValueError for labels not one per
    checkpoint or a bad `traced`."""
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"labels must be one name per checkpoint (a list of str), got {type(labels).__name__}")
    labels = [str(c + 1) for c in range(count)] if labels is None else [str(s) for s in labels]
    if len(labels) != count:
        raise ValueError(f"labels must name each of the {count} checkpoints, got {len(labels)}")
    if traced is not None and (_integer(traced) is None or not 1 <= traced <= count):
        raise ValueError(f"traced must be a number of checkpoints from 1 to {count}, got {traced!r}")
    return labels


def _probe_write(path: Path) -> None:
    """ValueError naming `path` if it is a directory or the PNG cannot be written there (no permission, a
    read-only file system, a name too long), found by opening it for writing: an existing file in append
    mode (its bytes kept), a new one created and removed. Something other than a file or a directory (a
    FIFO, a device) is left to the save, as is a link to a file not made yet, unless the link's target
    is in no directory (refused)."""

    def refuse(e: OSError) -> ValueError:
        return ValueError(f"path: cannot write the figure to {str(path)!r}: {e.strerror or e}")

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        target = path.parent / os.readlink(path) if os.path.islink(path) else None
        if target is not None and not os.path.isdir(target.parent):  # a link to a file made on saving is fine
            raise ValueError(
                f"path: {str(path)!r} is a link to {os.readlink(path)!r}, in a directory that does not exist"
            ) from None
        if target is not None:
            return
        mode = None
    except OSError as e:
        raise refuse(e) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"path: {str(path)!r} is a directory, not a file the PNG can be written to")
    if mode is not None and not stat.S_ISREG(mode):
        return
    try:
        fd = os.open(path, os.O_WRONLY | (os.O_APPEND if mode is not None else os.O_CREAT | os.O_EXCL))
    except FileExistsError:  # made between the check and the open: whoever made it writes it
        return
    except OSError as e:
        raise refuse(e) from None
    os.close(fd)
    if mode is None:
        path.unlink()


def _figure() -> Any:
    """The class matplotlib.figure.Figure (drawn and saved without pyplot, so neither the caller's
    backend nor pyplot's figures change); ImportError saying what to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plotting the diagnostics needs matplotlib: pip install matplotlib "
            "(checkpoint_diagnostics without path returns the numbers alone)"
        ) from e
    return Figure
