"""Random projection of exported rows on the host (a tracin.Projection), and the widths it gives."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._caller import user_stacklevel
from .._progress import progress_bar
from ..projection import LayerMatrix, NonFiniteRowError, Projection, _finite_rows, quiet_widening
from ..store._convert import bfloat16_bits_to_float32
from ..store._format import short


def check_projection(projection: Any, factored: bool) -> None:
    """ValueError for a per_layer=True tracin.Projection of factored rows (apply_factored refuses it), and
    TypeError unless `projection` is None or a tracin.Projection (a subclass included, whose
    .apply / .apply_factored take the keyword arguments Projection's take). Another object with
    .apply and .to_dict is refused here, before any work: the export calls apply(rows, segments=...)
    for per-layer projections, and its rows' widths, layout and spec are those of a tracin.Projection."""
    need = "apply_factored" if factored else "apply"
    if factored and isinstance(projection, Projection) and projection.per_layer and not projection.kronecker:
        raise ValueError(  # kronecker=True is refused with its own message (it needs mode="full")
            f"projection {projection!r} projects full rows segment by segment; factored rows (mode='factored' / "
            f"'last_layer') are projected by one pair of matrices: pass Projection({projection.dim}, "
            f"seed={projection.seed}, kind={projection.kind!r}) (per_layer=False), or use mode='full' for "
            "per-layer maps"
        )
    if isinstance(projection, numbers.Integral) and not isinstance(projection, bool):
        dim = int(projection)
        if dim < 1:
            raise TypeError(
                f"projection must be a tracin.Projection, got the int {dim}: pass projection=tracin.Projection(dim) "
                "with the dimension to project to, an int >= 1, or leave projection= out for unprojected rows"
            )
        per_token = (
            "" if factored else "; per_layer=True, kronecker=True to project a language model's layers per token"
        )
        raise TypeError(  # a dim given for the projection itself
            f"projection must be a tracin.Projection, got the int {dim}: pass projection=tracin.Projection({dim}) "
            f"(a seed= to choose its random map{per_token})"
        )
    if projection is not None and not isinstance(projection, Projection):
        raise TypeError(
            f"projection must be a tracin.Projection (with .{need} and .to_dict), or an instance of a subclass "
            f"of it; got {type(projection).__name__}, which is not one (for another projection, export without "
            "projection= and project the stored rows yourself: a bfloat16 store's .npy files, like a bfloat16 "
            "GradientSet's .matrices, hold uint16 bits, to read as bfloat16 with .view(ml_dtypes.bfloat16), e.g. "
            "np.load(path, mmap_mode='r').view(ml_dtypes.bfloat16); a conversion to float reads them as integers)"
        )


def project(projection: Any, block: Any, segments: Sequence[int] | None) -> Any:
    """A host block projected: (rows, d) float32 -> (rows, k) float32 with the parameter widths
    `segments`, or a (left (rows, p), right (rows, q)) pair through apply_factored; rows holding NaN
    or Inf are NaN (see `keeping_nonfinite`). The widths go to apply as segments= only when the
    projection is per_layer (a whole-row projection refuses them). Projection's warnings of widened rows
    are not given here (projected_dims gives the export's, once)."""
    with quiet_widening():
        if isinstance(block, tuple):
            left, right = keeping_nonfinite(projection.apply_factored, *block)
            return np.asarray(left), np.asarray(right)
        per_layer = getattr(projection, "per_layer", False)
        kwargs = {"segments": list(segments)} if segments is not None and per_layer else {}
        (out,) = keeping_nonfinite(lambda rows: (projection.apply(rows, **kwargs),), block)
        return np.asarray(out)


def keeping_nonfinite(project_rows: Callable[..., Sequence[Any]], *parts: Any) -> list[np.ndarray]:
    """project_rows(*parts) (each part (rows, d_i), taken as float32; returning a sequence of
    (rows, k_j) arrays) where the row of every part is finite; NaN in every output column of the other
    rows. So an example whose gradient holds NaN or Inf is stored as it is without a projection (not
    finite), for scoring to name, instead of failing the export. A finite row whose projection is beyond
    float32's range stays an error (one that is finite is returned, even when the kernel's unscaled sums
    pass FLT_MAX): a tracin.Projection's names it by its index in `parts`."""
    parts = tuple(np.asarray(p, np.float32) for p in parts)
    keep = np.logical_and.reduce([_finite_rows(p) for p in parts])
    if keep.all():
        return list(project_rows(*parts))
    index = np.flatnonzero(keep)
    try:
        kept = project_rows(*(p[index] for p in parts))
    except NonFiniteRowError as e:
        raise NonFiniteRowError(e.message, int(index[e.row])) from None
    outs = []
    for o in kept:
        out = np.full((keep.shape[0], np.shape(o)[1]), np.nan, np.float32)
        out[index] = o
        outs.append(out)
    return outs


def projected_dims(projection: Any, dims: int | tuple[int, int], segments: Sequence[int] | None) -> Any:
    """Per-checkpoint widths of what is stored: `dims` (d, or (p, q) when factored) unchanged
    without a projection. A tracin.Projection whose apply is Projection.apply gives its dim (whatever
    the layout; a per_layer layout is checked against d now, as apply would check it: widths >= 1
    summing to d, no more segments than dim), and one whose apply_factored is Projection's, the
    widths of a one-column pair, which do not depend on (p, q). A subclass overriding the method
    (whose width may differ) is probed by projecting one zero row of `dims` (other objects are
    refused by `check_projection`). Full rows projected to `dims` columns or more, or a factor to its
    width or more, get warn_widening's RuntimeWarning. A per_layer layout holding a parameter with no
    elements is refused, naming its position."""
    if projection is None:
        return dims
    if isinstance(dims, tuple):
        probe = dims
        if isinstance(projection, Projection) and type(projection).apply_factored is Projection.apply_factored:
            probe = (1, 1)
        left, right = project(projection, tuple(np.zeros((1, d), np.float32) for d in probe), None)
        widths = left.shape[1], right.shape[1]
        for side, width, exact in zip(("left", "right"), widths, dims, strict=True):
            warn_widening(projection, width, exact, f"{side} factor")
        return widths
    if isinstance(projection, Projection) and projection.per_layer and segments is not None:
        empty = [str(j) for j, w in enumerate(segments) if isinstance(w, int) and w == 0]
        _refuse_empty(projection, empty, " (0-based, in the exported parameters' order)")
    if isinstance(projection, Projection) and type(projection).apply is Projection.apply:
        if projection.per_layer:
            layout = projection._segments([dims] if segments is None else segments, dims)
            projection.segment_dims(len(layout))  # too many segments for dim: refused now
        width = projection.dim
    else:
        width = project(projection, np.zeros((1, dims), np.float32), segments).shape[1]
    warn_widening(projection, width, dims)
    return width


def refuse_empty_parameters(projection: Any, params: Sequence[tuple[str, Sequence[int]]]) -> None:
    """ValueError naming the parameters of `params` ((name, shape) in the export's order) that have no
    elements when `projection` is per_layer, which projects each parameter as a segment of >= 1 column
    (for an adapter to call before any work, with the names projected_dims does not know)."""
    if getattr(projection, "per_layer", False):
        _refuse_empty(projection, [repr(name) for name, shape in params if math.prod(shape) == 0], "")


def _refuse_empty(projection: Any, empty: Sequence[str], note: str) -> None:
    if empty:
        several = len(empty) > 1
        raise ValueError(
            f"projection {projection!r}: parameter{'s' if several else ''} {', '.join(empty)}{note} "
            f"ha{'ve' if several else 's'} no elements, and per_layer=True projects each parameter as a segment "
            "of >= 1 column: leave the empty parameter(s) out with layers=, or use per_layer=False"
        )


def warn_widening(projection: Any, width: int, exact: int, factor: str | None = None) -> None:
    """RuntimeWarning when projected rows of `width` columns are no narrower than the `exact` rows they
    project (Projection(200_000) of a 45-wide gradient stores 4,400 times the bytes, and adds the
    sketch's error to rows that would fit exactly); with `factor` ("left factor", "right factor"), the
    same for that factor of factored rows (Projection(4096) stores a last layer's (3, 9) factors as (64, 64))."""
    if width < exact:
        return
    if factor is None:
        what, advice = "rows", f"store the exact rows of width {exact}, or pass a dim below {exact}"
    else:
        what, advice = f"{factor}s", "store the exact factors, or pass a dim whose factored_dims are below their widths"
    warnings.warn(
        f"projection {projection!r} stores {what} of dim {width}, not fewer than the gradient's "
        f"{factor or 'row'} width {exact}: it widens the {what} (or keeps their width) and adds its approximation "
        f"error; drop projection= to {advice}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def project_store(
    projection: Projection,
    source: Any,
    path: str | os.PathLike,
    *,
    segments: Sequence[Any] | None = None,
    dtype: str = "float32",
    progress: bool | None = None,
    overwrite: bool = False,
) -> Any:
    """Projection.apply_store: the rows of `source` (a finished GradientStore, or its path) projected into a
    new store at `path`, resumed where an earlier call with the same arguments stopped (see that method)."""
    from ..store import GradientStore

    if isinstance(source, (str, os.PathLike)):
        source = GradientStore.open(source)
    if not isinstance(source, GradientStore):
        raise TypeError(f"source must be a GradientStore or its path, got {type(source).__name__}")
    if os.path.realpath(path) == os.path.realpath(source.path):  # overwrite=True would delete the rows being read
        raise ValueError(
            f"path {os.fspath(path)!r} is the source store's own directory: choose another for the projected store"
        )
    if not source.complete:  # even with allow_partial=True: its usable rows would make a smaller, finished store
        info = source.info()
        written = f"rows written per checkpoint: {info['rows_recorded']} of {info['rows']}"
        raise ValueError(
            f"gradient store {source.path} is unfinished: every row is written ({written}) but the store was never "
            "finalized; call GradientStore.create(<the same arguments>).finalize() on it first"
            if all(r == info["rows"] for r in info["rows_recorded"])
            else f"gradient store {source.path} is unfinished ({written}): finish writing it first"
        )
    metadata = dict(source.metadata or {})
    if metadata.get("projection") is not None:
        raise ValueError(
            f"gradient store {source.path} is already projected (metadata['projection'] = "
            f"{short(metadata['projection'])}); project the exact rows instead"
        )
    check_projection(projection, source.factored)
    spec = projection.to_dict()
    if source.factored:
        if segments is not None:
            raise ValueError("segments applies to full rows; a factored store's rows are projected by apply_factored")
    elif projection.per_layer:
        if projection.kronecker and segments is None:  # metadata["params"] has no layer matrices
            raise ValueError(
                "apply_store with a kronecker=True projection needs segments= (the layout, LayerMatrix entries "
                "for the layers, as metadata['projection']['segments'] of a Kronecker export records it)"
            )
        segments = _store_segments(projection, source, segments)
        if projection.kronecker:
            spec["segments"] = [s.to_dict() if isinstance(s, LayerMatrix) else s for s in segments]
    elif segments is not None:
        raise ValueError("segments applies with per_layer=True only (this projection projects whole rows)")
    dims = [projected_dims(projection, d, segments) for d in source.dims]
    writer = GradientStore.create(
        path,
        source.n_rows,
        dims,
        source.weights.tolist() if source.weights_given else None,
        dtype,
        factored=source.factored,
        metadata={**metadata, "projection": spec},
        ids=source.ids,
        overwrite=overwrite,
    )
    try:
        missing = [(c, start, stop) for c in range(source.n_checkpoints) for start, stop in writer.missing(c)]
        bar = progress_bar(sum(stop - start for _, start, stop in missing), progress, "projecting", unit="row")
        try:
            step = source.row_chunks()
            for c, first, last in missing:
                for start in range(first, last, step):
                    stop = min(start + step, last)
                    side = source.kernel_side(start, stop)
                    blocks = side.blocks[2 * c : 2 * c + 2] if source.factored else side.blocks[c : c + 1]
                    rows = [_float32(b, source.dtype) for b in blocks]
                    block = tuple(rows) if source.factored else rows[0]
                    try:
                        out = project(projection, block, segments)
                    except NonFiniteRowError as e:
                        where = f"gradient store {source.path}, checkpoint {c}: ".replace("{", "{{").replace("}", "}}")
                        raise NonFiniteRowError(where + e.message, start + e.row) from None
                    writer.write(c, start, out)
                    bar.update(stop - start)
        finally:
            bar.close()
        return writer.finalize()
    finally:
        writer.close()


def _store_segments(projection: Projection, source: Any, segments: Sequence[Any] | None) -> list[Any]:
    """The per_layer layout of a full-row store: `segments` if given, else the widths of its
    metadata["params"] (one segment per parameter, as the adapters' per_layer exports take them)."""
    if segments is not None:
        return list(segments)
    params = (source.metadata or {}).get("params")
    try:
        widths = [math.prod(int(s) for s in p["shape"]) for p in params]
    except (TypeError, KeyError, ValueError):
        raise ValueError(
            f"gradient store {source.path} records no metadata['params'] with shapes to take the per_layer "
            "layout from: pass segments= (the column widths of its layers)"
        ) from None
    _refuse_empty(projection, [repr(p.get("name")) for p, w in zip(params, widths, strict=True) if w == 0], "")
    return widths


def _float32(block: np.ndarray, dtype: str) -> np.ndarray:
    """A store block as float32 (bfloat16 bits widened exactly; float16 converted exactly)."""
    return bfloat16_bits_to_float32(block) if dtype == "bfloat16" else np.asarray(block, np.float32)
