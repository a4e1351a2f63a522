"""The public scoring functions: validation, then the C++ kernel (tracin._core)."""

from __future__ import annotations

import importlib.util
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _core
from ._progress import progress_bar
from ._validate import positive_int, thread_count
from .gradients import GradientSet, Gradients

_SIDES = {"proponents": 0, "opponents": 1, "both": 2}
_AUTO_PROGRESS_MACS = 5e11  # progress=None shows a bar above this many multiply-adds (seconds of work)
_BAR_STEPS = 100  # with a bar, the train side is scored in about this many pieces...
_MIN_PIECE_ROWS = 4096  # ...of at least this many rows


class TopK(NamedTuple):
    """values float32 (m, k) and indices int64 (m, k) into the train rows, best first per row."""

    values: np.ndarray
    indices: np.ndarray


class BothSides(NamedTuple):
    """Proponents (largest first) and opponents (most negative first) from one pass."""

    proponents: TopK
    opponents: TopK


def as_gradient_set(x: Any, name: str) -> GradientSet:
    """A GradientSet as is; a bare array (or list of per-checkpoint arrays) as Gradients."""
    if isinstance(x, GradientSet):
        return x
    try:
        return Gradients(x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


def _weights(test: GradientSet, train: GradientSet) -> list[float]:
    """The weights both sides agree on (a side with default weights takes the other's)."""
    if test.n_checkpoints != train.n_checkpoints:
        raise ValueError(
            f"test has {test.n_checkpoints} checkpoints but train has {train.n_checkpoints}; "
            "both sides must come from the same checkpoints"
        )
    if test.weights_given and train.weights_given and not np.array_equal(test.weights, train.weights):
        raise ValueError(
            f"test and train carry different checkpoint weights ({test.weights.tolist()} vs "
            f"{train.weights.tolist()}); they must come from the same checkpoints"
        )
    return (train.weights if train.weights_given or not test.weights_given else test.weights).tolist()


def _pair(test: Any, train: Any) -> tuple[GradientSet, GradientSet, list[float]]:
    test, train = as_gradient_set(test, "test"), as_gradient_set(train, "train")
    if test.factored != train.factored:
        raise ValueError(
            "test and train must both be full gradients or both FactoredGradients "
            f"(test is {'factored' if test.factored else 'full'}, train is "
            f"{'factored' if train.factored else 'full'})"
        )
    weights = _weights(test, train)
    _check_same_gradient_space(test, train)
    if test.dims != train.dims:
        raise ValueError(f"test dims {list(test.dims)} differ from train dims {list(train.dims)}")
    return test, train, weights


def _check_same_gradient_space(test: GradientSet, train: GradientSet) -> None:
    """Refuses pairs whose metadata (as the adapters record it) shows they are not gradients of
    the same thing: a different mode, different parameters (same framework), or a different
    projection (metadata["projection"] None: unprojected). Sets without metadata are trusted."""
    t, x = test.metadata, train.metadata
    if "mode" in t and "mode" in x and t["mode"] != x["mode"]:
        raise ValueError(f"test gradients are mode={t['mode']!r} but train gradients are mode={x['mode']!r}")
    if "projection" in t and "projection" in x and t["projection"] != x["projection"]:
        from .projection import Projection

        projected, other, other_name = (x, t, "test") if x["projection"] is not None else (t, x, "train")
        Projection.from_dict(projected["projection"]).check_compatible(other["projection"], what=other_name)
    if t.get("framework") is not None and t.get("framework") == x.get("framework") \
            and "params" in t and "params" in x and t["params"] != x["params"]:
        raise ValueError(f"test and train gradients are of different parameters: "
                         f"{[p['name'] for p in t['params']]} vs {[p['name'] for p in x['params']]}")


def _chunks(s: GradientSet) -> list[tuple[int, int]]:
    step = s.row_chunks() or max(s.n_rows, 1)
    return [(a, min(a + step, s.n_rows)) for a in range(0, max(s.n_rows, 1), step)]


def _width(s: GradientSet) -> int:
    """Multiply-adds per pair of rows: the summed dims (p + q per factored checkpoint)."""
    return int(sum(np.sum(d) for d in s.dims))


class _Progress:
    """The train-side row ranges to score one kernel call each, and the tqdm bar they advance.

    progress: True, False, or None (a bar when tqdm is installed and the work exceeds
    _AUTO_PROGRESS_MACS multiply-adds). With a bar, the train side is cut into up to _BAR_STEPS
    pieces per store chunk so that the bar moves; results do not depend on the cut.
    """

    def __init__(self, progress: Any, macs: float, train: GradientSet, passes: int, desc: str,
                 split: bool = True):
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
        if progress is None:
            progress = macs >= _AUTO_PROGRESS_MACS and importlib.util.find_spec("tqdm") is not None
        self.pieces = _chunks(train)
        if progress and split:
            step = max(_MIN_PIECE_ROWS, -(-train.n_rows // _BAR_STEPS))
            self.pieces = [(s, min(s + step, b)) for a, b in self.pieces for s in range(a, max(b, a + 1), step)]
        self.bar = progress_bar(passes * train.n_rows, progress, desc, unit="row")

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def scores(test: Any, train: Any, *, num_threads: int | None = None, progress: bool | None = None) -> np.ndarray:
    """Dense influence scores float32 (m, n): entry (t, i) = sum_c w_c <g_c(t), g_c(i)>.

    Materialises the whole matrix: for small problems. Use top_k for large ones.
    progress: a tqdm bar over train rows (None: only for seconds of work, if tqdm is installed).
    """
    test, train, w = _pair(test, train)
    threads = thread_count(num_threads)
    out = np.empty((test.n_rows, train.n_rows), dtype=np.float32)
    test_chunks = _chunks(test)
    with _Progress(progress, test.n_rows * train.n_rows * _width(train), train, len(test_chunks),
                   "tracin scores") as run:
        for t0, t1 in test_chunks:
            t_side = test.kernel_side(t0, t1)
            for i0, i1 in run.pieces:
                out[t0:t1, i0:i1] = _core.scores(t_side, train.kernel_side(i0, i1), w, num_threads=threads)
                run.bar.update(i1 - i0)
    return out


def top_k(test: Any, train: Any, k: int = 10, side: str = "proponents", *,
          num_threads: int | None = None, progress: bool | None = None) -> TopK | BothSides:
    """Exact top-k training examples per test example, without the dense score matrix.

    side: "proponents" (largest scores first), "opponents" (most negative first) or "both"
    (BothSides(proponents, opponents) from a single pass). Ties go to the smaller train index;
    k larger than the number of train rows gives that many columns.
    progress: a tqdm bar over train rows (None: only for seconds of work, if tqdm is installed).
    """
    test, train, w = _pair(test, train)
    k = positive_int(k, "k")
    if side not in _SIDES:
        raise ValueError(f"side must be 'proponents', 'opponents' or 'both', got {side!r}")
    threads = thread_count(num_threads)
    code = _SIDES[side]
    per_test_chunk = []
    test_chunks = _chunks(test)
    with _Progress(progress, test.n_rows * train.n_rows * _width(train), train, len(test_chunks),
                   f"tracin top_k ({side})") as run:
        for t0, t1 in test_chunks:
            t_side = test.kernel_side(t0, t1)
            best: list[TopK | None] = [None, None]  # running (proponents, opponents), global indices
            for i0, i1 in run.pieces:
                pv, pi, ov, oi = _core.top_k(t_side, train.kernel_side(i0, i1), w, min(k, i1 - i0), code,
                                             num_threads=threads)
                for s, (part, name) in enumerate(((TopK(pv, pi), "proponents"), (TopK(ov, oi), "opponents"))):
                    best[s] = part._replace(indices=part.indices + i0) if best[s] is None else \
                        merge_top_k([best[s], part], [0, i0], k=k, side=name)
                run.bar.update(i1 - i0)
            per_test_chunk.append(best)
    prop, opp = (TopK(*(np.concatenate([b[s][f] for b in per_test_chunk]) for f in (0, 1)))
                 for s in (0, 1))
    if side == "proponents":
        return prop
    if side == "opponents":
        return opp
    return BothSides(prop, opp)


def merge_top_k(results: list[TopK], offsets: list[int], *, k: int | None = None,
                side: str = "proponents") -> TopK:
    """Merge top-k results computed on row shards of the train side into the result on the whole.

    results: TopK per shard (indices local to the shard); offsets: the first global train row of
    each shard. k defaults to the widest input. Exactly equal to top_k on the unsharded data,
    ties included (smaller global index first).
    """
    if side not in ("proponents", "opponents"):
        raise ValueError(f"side must be 'proponents' or 'opponents', got {side!r}")
    results, offsets = list(results), list(offsets)
    if len(results) != len(offsets):
        raise ValueError(f"results has {len(results)} entries but offsets has {len(offsets)}")
    if not results:
        raise ValueError("results must hold at least one TopK")
    for i, (r, o) in enumerate(zip(results, offsets)):
        if not isinstance(r, TopK):
            raise TypeError(f"results[{i}] must be a TopK (values, indices), got {type(r).__name__}"
                            + (" (pass .proponents or .opponents)" if isinstance(r, BothSides) else ""))
        if np.ndim(r.values) != 2 or np.shape(r.values) != np.shape(r.indices):
            raise ValueError(f"results[{i}]: values and indices must be 2-D of the same shape, got "
                             f"{np.shape(r.values)} and {np.shape(r.indices)}")
        if isinstance(o, bool) or not isinstance(o, numbers.Integral) or o < 0:
            raise ValueError(f"offsets[{i}] must be a non-negative integer, got {o!r}")
    rows = {r.values.shape[0] for r in results}
    if len(rows) != 1:
        raise ValueError(f"every result must cover the same test rows, got row counts {sorted(rows)}")
    values = np.concatenate([np.asarray(r.values, dtype=np.float32) for r in results], axis=1)
    indices = np.concatenate(
        [np.asarray(r.indices, dtype=np.int64) + int(o) for r, o in zip(results, offsets)], axis=1)
    width = values.shape[1] if k is None else min(positive_int(k, "k"), values.shape[1])
    key = -values if side == "proponents" else values
    # lexsort: last key is primary; stable order by (score, global index).
    order = np.lexsort((indices, key), axis=1)[:, :width]
    return TopK(np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1))


def self_influence(train: Any, *, num_threads: int | None = None, progress: bool | None = None) -> np.ndarray:
    """float32 (n,): influence of each training example on itself, sum_c w_c |g_c(i)|^2.

    High values flag mislabelled or unusual examples.
    progress: a tqdm bar over train rows (None: only for seconds of work, if tqdm is installed).
    """
    train = as_gradient_set(train, "train")
    threads = thread_count(num_threads)
    w = train.weights.tolist()
    out = []
    with _Progress(progress, train.n_rows * _width(train), train, 1, "tracin self_influence") as run:
        for a, b in run.pieces:
            out.append(_core.self_influence(train.kernel_side(a, b), w, num_threads=threads))
            run.bar.update(b - a)
    return np.concatenate(out)


def aggregate(test: Any, train: Any, *, num_threads: int | None = None, progress: bool | None = None) -> np.ndarray:
    """float32 (n,): influence of each training example summed over the whole test set
    (group influence, for data selection). Summed in float64 whatever the chunking.
    progress: a tqdm bar over train rows (None: only for seconds of work, if tqdm is installed)."""
    test, train, w = _pair(test, train)
    threads = thread_count(num_threads)
    total = np.zeros(train.n_rows, dtype=np.float64)  # float64 partial sums from the kernel
    test_chunks = _chunks(test)
    # Full gradients: one column sum of the test side per call plus a product per train row, so
    # (m + n) * d work, and pieces smaller than the chunks would repeat the column sums.
    macs = (test.n_rows * train.n_rows if train.factored else test.n_rows + train.n_rows) * _width(train)
    with _Progress(progress, macs, train, len(test_chunks), "tracin aggregate", split=train.factored) as run:
        for t0, t1 in test_chunks:
            t_side = test.kernel_side(t0, t1)
            for i0, i1 in run.pieces:
                total[i0:i1] += _core.aggregate(t_side, train.kernel_side(i0, i1), w, num_threads=threads)
                run.bar.update(i1 - i0)
    return total.astype(np.float32)
