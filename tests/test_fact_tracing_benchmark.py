"""The fact-tracing benchmark (benchmarks/fact_tracing): its metrics against hand-computed values, the
corpus's facts and passages, and a --quick run end to end (JSON, plot, every contender, sane metrics)."""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest

from benchmarks.fact_tracing import contenders, metrics
from benchmarks.fact_tracing.corpus import BOS, PAD, CorpusSpec, make_corpus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ranks_and_summary_against_hand_computed_values():
    scores = np.array([[0.9, 0.1, 0.5, 0.7], [0.0, 0.2, 0.3, 0.1]])
    relevant = [np.array([2, 3]), np.array([0])]
    r = metrics.ranks(scores, relevant)
    assert [list(x) for x in r] == [[3, 2], [4]]
    s = metrics.summary(r, k=2)
    assert s["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert s["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert s["mrr_se"] == pytest.approx(np.std([1 / 2, 1 / 4], ddof=1) / np.sqrt(2))


def test_ties_do_not_favour_relevant_passages():
    """All scores equal: the rank of a relevant passage is uniform over the seeds, not always 1."""
    firsts = [metrics.ranks(np.zeros((1, 50)), [np.array([7])], seed=s)[0][0] for s in range(200)]
    assert 15 < np.mean(firsts) < 36  # uniform over 1..50: mean 25.5


def test_metrics_reject_bad_scores():
    with pytest.raises(ValueError, match="scores must be"):
        metrics.ranks(np.zeros((3, 4)), [np.array([0])])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.ranks(np.array([[np.nan, 0.0]]), [np.array([0])])


def test_corpus_passages_state_their_facts():
    corpus = make_corpus(CorpusSpec(entities=30, relations=2, passages_per_fact=3), queries=20, seed=3)
    n_fact_passages = 30 * 2 * 3
    assert (corpus.fact_of >= 0).sum() == n_fact_passages
    assert (corpus.fact_of < 0).sum() == round(0.5 * n_fact_passages)
    assert (corpus.passages[:, 0] == BOS).all()
    assert ((corpus.passages != PAD).sum(1) == corpus.lengths).all()
    values = set(corpus.facts[:, 2].tolist())
    for i, f in enumerate(corpus.fact_of):
        tokens = set(corpus.passages[i].tolist())
        if f >= 0:  # its entity and value, and no other value
            assert corpus.vocab.entity0 + corpus.facts[f, 0] in tokens
            assert tokens & values == {corpus.facts[f, 2]}
        else:
            assert not tokens & values
    for j in range(20):
        assert len(corpus.relevant(j)) == 3
        assert corpus.queries[j, 1] == corpus.vocab.entity0 + corpus.facts[corpus.query_fact[j], 0]
    again = make_corpus(CorpusSpec(entities=30, relations=2, passages_per_fact=3), queries=20, seed=3)
    assert np.array_equal(again.passages, corpus.passages)  # seeded


def test_exports_every_variant_at_the_shared_dim_and_the_comparisons_for_adam_alone():
    got = contenders.exports(16, sweep_dims=(16, 64, 256))
    assert [(e.preconditioner, e.projection, e.dim) for e in got] == [
        (None, "kronecker", 16),
        ("adam", "kronecker", 16),
        ("adam", "sparse", 16),
        ("adam", "kronecker", 64),
        ("adam", "kronecker", 256),
    ]
    assert contenders.grid(16, (16, 64, 256)) == (
        "every preconditioner (None, adam) with the Kronecker projection at 16; adam alone also with the flat "
        "sparse projection at 16 and the Kronecker one at 64, 256; each export scored plain and cosine (normalize=True)"
    )
    assert [(e.preconditioner, e.projection) for e in contenders.exports(16, exact=True) if e.dim is None] == [
        (None, "exact"),
        ("adam", "exact"),
    ]


def _random_mrr(n: int, k: int) -> float:
    """Expected 1 / (rank of the first of k relevant among n) under a uniformly random order."""
    return sum(comb(n - r, k - 1) / comb(n, k) / r for r in range(1, n - k + 2))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    for module in ("transformers", "rank_bm25", "matplotlib"):
        pytest.importorskip(module)
    from benchmarks.fact_tracing.__main__ import main

    out = tmp_path_factory.mktemp("fact_tracing")
    code = main(["--quick", "--out", str(out)])
    return code, out, json.loads((out / "fact_tracing_quick.json").read_text())


def test_quick_run_writes_json_and_plot(quick_run):
    code, out, payload = quick_run
    assert code == 0
    assert payload["benchmark"] == "fact_tracing_quick" and payload["config"]["quick"] is True
    assert (out / payload["plots"][0]).read_bytes()[:8] == PNG_MAGIC
    assert len(payload["training"]["checkpoints"]) == payload["config"]["training"]["checkpoints"]
    assert all(c["learning_rate"] > 0 for c in payload["training"]["checkpoints"])
    assert payload["threads"] >= 1 and len(payload["load_average"]["start"]) == len(payload["load_average"]["end"]) == 3


def test_quick_run_has_every_contender(quick_run):
    payload = quick_run[2]
    config = payload["config"]
    expected = {"bm25", "random"} | {
        contenders.variant_name(e, normalize)
        for e in contenders.exports(config["dim"], tuple(config["sweep_dims"]), config["exact"])
        for normalize in (False, True)
    }
    assert set(payload["contenders"]) == expected
    assert len(expected) == 2 + 2 * (2 * 2 + 1 + len(config["sweep_dims"]))
    exact = payload["contenders"]["tracin plain, exact"]
    assert exact["dim"] == payload["gradient_parameters"] > 0  # exact gradients: one entry per chosen parameter
    for name, r in payload["contenders"].items():
        assert r["score_s_per_1000"] > 0, name
        if r["family"] == "tracin":
            assert r["export_s_per_1000"] > 0, name
            assert len(r["export_times_s"]) == config["repeats"]


def test_quick_run_metrics(quick_run):
    payload = quick_run[2]
    results = payload["contenders"]
    for name, r in results.items():
        for key in ("mrr", "recall@10"):
            assert 0 <= r[key] <= 1 and r[key + "_se"] >= 0, name
    n, k = payload["corpus"]["passages"], payload["corpus"]["passages_per_query"]
    random = results["random"]
    assert abs(random["mrr"] - _random_mrr(n, k)) < 4 * random["mrr_se"] + 1e-3
    assert results["bm25"]["mrr"] > random["mrr"] + 2 * random["mrr_se"]
    for name in ("tracin cosine, exact", "tracin adam+cosine, exact"):
        assert results[name]["mrr"] > random["mrr"], name
