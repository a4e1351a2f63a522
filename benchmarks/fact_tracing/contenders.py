"""The contenders: TracIn variants (plain, Adam-preconditioned, cosine, both) over exact or projected
gradients, BM25 over the passages' tokens, and a random ranking. Each gives a (queries, passages) score
matrix, higher = more likely to state the queried fact."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .corpus import Corpus
from .training import Checkpoint, token_loss

PRECONDITIONERS = (None, "adam")
PROJECTIONS = ("kronecker", "sparse")  # per-token Kronecker factors; the flat sparse map of full rows
# The preconditioner whose exports the projection comparison and the dim sweep repeat (its gradients give both the
# adam and the adam + cosine contenders: the best TracIn variants of every earlier run at every dim and projection).
SWEEP_PRECONDITIONER = "adam"


@dataclass(frozen=True)
class Export:
    """One gradient export: preconditioner, projection kind ("exact", or one of PROJECTIONS) and dim."""

    preconditioner: str | None
    projection: str
    dim: int | None

    @property
    def label(self) -> str:
        return "exact" if self.dim is None else f"{self.projection} {self.dim}"

    def projection_object(self, seed: int):
        import tracin

        if self.dim is None:
            return None
        if self.projection == "kronecker":
            return tracin.Projection(self.dim, seed, "rademacher", per_layer=True, kronecker=True)
        return tracin.Projection(self.dim, seed, "sparse", per_layer=True)


def exports(dim: int, sweep_dims: tuple[int, ...] = (), exact: bool = False) -> list[Export]:
    """Every export of a run: each preconditioner's Kronecker projection at the shared `dim` (plus exact
    gradients if `exact`), then SWEEP_PRECONDITIONER's flat sparse projection at `dim` and Kronecker one at
    each of `sweep_dims`."""
    out = []
    for pre in PRECONDITIONERS:
        out.append(Export(pre, "kronecker", dim))
        if exact:
            out.append(Export(pre, "exact", None))
    out.append(Export(SWEEP_PRECONDITIONER, "sparse", dim))
    return out + [Export(SWEEP_PRECONDITIONER, "kronecker", d) for d in sweep_dims if d != dim]


def grid(dim: int, sweep_dims: tuple[int, ...] = (), exact: bool = False) -> str:
    """In words, which exports `exports` makes (saved with the results)."""
    sweep = ", ".join(str(d) for d in sweep_dims if d != dim)
    return (
        f"every preconditioner ({', '.join(str(p) for p in PRECONDITIONERS)}) with the Kronecker projection at {dim}"
        + (" and exact" if exact else "")
        + f"; {SWEEP_PRECONDITIONER} alone also with the flat sparse projection at {dim}"
        + (f" and the Kronecker one at {sweep}" if sweep else "")
        + "; each export scored plain and cosine (normalize=True)"
    )


def variant_name(export: Export, normalize: bool) -> str:
    """ "tracin plain", "tracin adam", "tracin cosine", "tracin adam+cosine", then the gradient label."""
    kind = "+".join([p for p in (export.preconditioner, "cosine" if normalize else None) if p]) or "plain"
    return f"tracin {kind}, {export.label}"


def export_gradients(
    model, checkpoints: list[Checkpoint], data, export: Export, layers: tuple[str, ...], seed: int, rows=None
):
    """TracIn gradients of `data` ((inputs, labels) tensors; `rows`: a slice of them) at every checkpoint."""
    from tracin.torch import export_gradients as export_torch

    if rows is not None:
        data = ({k: v[rows] for k, v in data[0].items()}, data[1][rows])
    entries = [
        (c.state, c.learning_rate, c.optimizer_state) if export.preconditioner else (c.state, c.learning_rate)
        for c in checkpoints
    ]
    return export_torch(
        model,
        entries,
        data,
        token_loss,
        layers=list(layers),
        projection=export.projection_object(seed),
        preconditioner=export.preconditioner,
        progress=False,
    )


def bm25_scores(corpus: Corpus) -> np.ndarray:
    """BM25 (Okapi, rank-bm25's defaults) of every passage for every query prompt, as token words."""
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([corpus.words(row) for row in corpus.passages])
    return np.stack([index.get_scores(corpus.words(q)) for q in corpus.queries])


def random_scores(corpus: Corpus, seed: int) -> np.ndarray:
    """Independent uniform scores: the ranking of a method that knows nothing."""
    return np.random.default_rng(seed + 1).random((len(corpus.query_fact), len(corpus.passages)))
