"""The benchmark's settings (FULL and QUICK) as frozen dataclasses, saved with the results."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .corpus import CorpusSpec
from .training import TrainSpec


@dataclass(frozen=True)
class Config:
    """layers: the parameters TracIn uses (globs of export_gradients); dims: projected dims (each a
    multiple of 4 x a square, so every MLP layer's Kronecker share factors as k x k); sparse_dims: the dims
    of the flat sparse projection (None: dims); exact: also the unprojected gradients; timing_rows: training
    passages each export / scoring timing covers, timed `repeats` times after `warmup` untimed calls (the
    median is reported)."""

    corpus: CorpusSpec
    training: TrainSpec
    queries: int
    dims: tuple[int, ...]
    sparse_dims: tuple[int, ...] | None = None
    exact: bool = True
    layers: tuple[str, ...] = ("transformer.h.*.mlp.*",)
    timing_rows: int = 256
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    quick: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# 15 minutes on a loaded 2-core machine: no exact gradients (66 176 per passage and checkpoint, 9.5 GB for
# 12 000 passages), no flat projection at the largest dim (it forms every full gradient: about twice the export time).
FULL = Config(
    CorpusSpec(entities=1000, passages_per_fact=4),
    TrainSpec(epochs=40, width=64, batch_size=32, learning_rate=4e-3),
    queries=500,
    dims=(1024, 4096, 16384),
    sparse_dims=(1024, 4096),
    exact=False,
)
QUICK = Config(
    CorpusSpec(entities=24, passages_per_fact=4),
    TrainSpec(epochs=12, width=32, batch_size=16, warmup=20),
    queries=24,
    dims=(256,),
    timing_rows=32,
    repeats=2,
    warmup=0,
    quick=True,
)
