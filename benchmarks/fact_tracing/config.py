"""The benchmark's settings (FULL and QUICK) as frozen dataclasses, saved with the results."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .corpus import CorpusSpec
from .training import TrainSpec


@dataclass(frozen=True)
class Config:
    """layers: the parameters TracIn uses (globs of export_gradients); dim: the projected dim at which every
    TracIn variant is measured (contenders.exports); sweep_dims: further dims of the Kronecker projection of
    contenders.SWEEP_PRECONDITIONER alone; each dim a multiple of 4 x a square, so every MLP layer's Kronecker
    share factors as k x k; exact: also the unprojected gradients; timing_rows: training
    passages each export / scoring timing covers, timed `repeats` times after `warmup` untimed calls (the
    median is reported)."""

    corpus: CorpusSpec
    training: TrainSpec
    queries: int
    dim: int
    sweep_dims: tuple[int, ...] = ()
    exact: bool = True
    layers: tuple[str, ...] = ("transformer.h.*.mlp.*",)
    timing_rows: int = 256
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    quick: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# 15 minutes on a loaded 2-core machine. Training: batch 64 (more steps per epoch learn the facts in fewer
# epochs than larger batches at a scaled rate). An export costs about the same at every Kronecker dim (the model's
# passes dominate) and the flat sparse projection twice that, so every variant at one dim with the Kronecker
# projection, and Adam's export alone also flat and at the larger dims. No exact gradients (66 176 per passage and
# checkpoint: 21 GB for 27 000 passages).
FULL = Config(
    CorpusSpec(entities=3000, passages_per_fact=3),
    TrainSpec(epochs=14, width=64, batch_size=64, learning_rate=8e-3),
    queries=500,
    dim=1024,
    sweep_dims=(4096, 16384),
    exact=False,
)
QUICK = Config(
    CorpusSpec(entities=24, passages_per_fact=4),
    TrainSpec(epochs=12, width=32, batch_size=16, warmup=20),
    queries=24,
    dim=256,
    sweep_dims=(1024,),
    timing_rows=32,
    repeats=2,
    warmup=0,
    quick=True,
)
