"""One run of the benchmark: corpus, training, every contender's scores, metrics and timings; the
payload that becomes fact_tracing.json."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from ..common import time_interleaved
from . import contenders, metrics
from .config import Config
from .corpus import make_corpus
from .training import passage_batches, predict, query_batches, train


def _evaluate(scores: np.ndarray, relevant: list[np.ndarray], answered: np.ndarray, seed: int) -> dict:
    ranked = metrics.ranks(scores, relevant, seed)
    return {
        **metrics.summary(ranked),
        "reciprocal_ranks": [round(float(x), 6) for x in metrics.reciprocal_ranks(ranked)],
        "answered": metrics.summary([r for r, a in zip(ranked, answered, strict=True) if a])
        if answered.any()
        else None,
    }


@dataclass
class _Scoring:
    """What every TracIn contender is measured against: relevant passages and answered flags per query,
    the training rows of the scoring timing, threads."""

    relevant: list[np.ndarray]
    answered: np.ndarray
    timing: slice
    threads: int
    config: Config

    def measure(self, test, train, normalize: bool) -> dict:
        import tracin

        scores = tracin.scores(test, train, num_threads=self.threads, normalize=normalize, progress=False)
        return _evaluate(scores, self.relevant, self.answered, self.config.seed)

    def time(self, test, train) -> dict:
        """Median seconds per 1000 training rows to score every query, per normalize flag."""
        import tracin

        subset, rows = train[self.timing], self.timing.stop - self.timing.start
        timed = time_interleaved(
            {
                normalize: functools.partial(
                    tracin.scores, test, subset, num_threads=self.threads, normalize=normalize, progress=False
                )
                for normalize in (False, True)
            },
            repeats=self.config.repeats,
            warmup=self.config.warmup,
            pause_s=0.05,
        )
        return {
            k: {"score_s_per_1000": t["median_s"] * 1000 / rows, "score_times_s": t["times_s"]}
            for k, t in timed.items()
        }


def _tracin(export, model, checkpoints, data, config: Config, scoring: _Scoring, log) -> dict[str, dict]:
    """The two contenders (plain and cosine scores) of one export: metrics and scoring times."""
    t0 = time.perf_counter()
    train_g, test_g = (
        contenders.export_gradients(model, checkpoints, d, export, config.layers, config.seed) for d in data
    )
    export_s = time.perf_counter() - t0
    timed = scoring.time(test_g, train_g)
    out = {}
    for normalize in (False, True):
        name = contenders.variant_name(export, normalize)
        out[name] = {
            "family": "tracin",
            "preconditioner": export.preconditioner,
            "normalize": normalize,
            "projection": export.projection,
            "dim": export.dim or train_g.dims[0],
            **timed[normalize],
            **scoring.measure(test_g, train_g, normalize),
        }
        log(f"  {name}: MRR {out[name]['mrr']:.3f}, recall@10 {out[name]['recall@10']:.3f}")
    log(f"  ({export.label}, {export.preconditioner}: {train_g.n_rows} + {test_g.n_rows} rows in {export_s:.0f} s)")
    return out


def run(config: Config, threads: int, log: Callable[[str], None]) -> dict:
    import torch

    torch.set_num_threads(threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    corpus = make_corpus(config.corpus, config.queries, config.seed)
    log(
        f"corpus: {len(corpus.facts)} facts, {len(corpus.passages)} passages "
        f"({int((corpus.fact_of < 0).sum())} distractors), vocabulary {corpus.vocab_size}, {config.queries} queries"
    )
    model, checkpoints, record = train(corpus, config.training, config.seed, log)
    model.eval()
    answered = predict(model, corpus.queries) == corpus.targets
    log(f"trained in {record['seconds']:.0f} s: {answered.mean():.3f} of the queries answered")
    relevant = [corpus.relevant(j) for j in range(config.queries)]
    train_data, test_data = passage_batches(corpus), query_batches(corpus, corpus.queries, corpus.targets)
    n_train, timing = len(corpus.passages), slice(0, min(config.timing_rows, len(corpus.passages)))
    scoring = _Scoring(relevant, answered, timing, threads, config)

    results: dict[str, dict] = {}
    for export in contenders.exports(config.dim, config.sweep_dims, config.exact):
        results.update(_tracin(export, model, checkpoints, (train_data, test_data), config, scoring, log))
    log("export timings")
    export_timing = time_interleaved(
        {
            e: functools.partial(
                contenders.export_gradients, model, checkpoints, train_data, e, config.layers, config.seed, timing
            )
            for e in contenders.exports(config.dim, config.sweep_dims, config.exact)
        },
        repeats=config.repeats,
        warmup=config.warmup,
        pause_s=0.05,
    )
    for r in results.values():
        e = contenders.Export(r["preconditioner"], r["projection"], None if r["projection"] == "exact" else r["dim"])
        r["export_s_per_1000"] = export_timing[e]["median_s"] * 1000 / (timing.stop - timing.start)
        r["export_times_s"] = export_timing[e]["times_s"]

    for family, fn in (
        ("bm25", lambda: contenders.bm25_scores(corpus)),
        ("random", lambda: contenders.random_scores(corpus, config.seed)),
    ):
        scores = fn()
        t = time_interleaved({family: fn}, repeats=config.repeats, warmup=0, pause_s=0.05)[family]
        results[family] = {
            "family": family,
            "score_s_per_1000": t["median_s"] * 1000 / n_train,
            "score_times_s": t["times_s"],
            **_evaluate(scores, relevant, answered, config.seed),
        }
        log(f"  {family}: MRR {results[family]['mrr']:.3f}, recall@10 {results[family]['recall@10']:.3f}")

    return {
        "config": config.as_dict(),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "torch": torch.__version__,
        "corpus": {
            "facts": len(corpus.facts),
            "passages": n_train,
            "distractors": int((corpus.fact_of < 0).sum()),
            "vocabulary": corpus.vocab_size,
            "queries": config.queries,
            "passages_per_query": int(config.corpus.passages_per_fact),
        },
        "training": {
            **record,
            "checkpoints": [
                {"epoch": c.epoch, "learning_rate": c.learning_rate, "fact_accuracy": c.fact_accuracy}
                for c in checkpoints
            ],
            "query_accuracy": float(answered.mean()),
        },
        "gradient_parameters": sum(
            p.numel() for n, p in model.named_parameters() if any(fnmatchcase(n, g) for g in config.layers)
        ),
        "grid": contenders.grid(config.dim, config.sweep_dims, config.exact),
        "timing_rows": timing.stop - timing.start,
        "contenders": results,
        "seconds": time.perf_counter() - t_start,
    }
