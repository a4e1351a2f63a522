"""Fact-tracing benchmark (issue #15 item 5): which training passages taught a small GPT-2 a fact?

A seeded synthetic corpus states every fact (entity, relation, attribute) in a few templated passages
among distractors (corpus.py); a small GPT-2 is trained on it with AdamW, checkpoints (weights, optimizer
state, rate) saved on the way (training.py). Each query is a fact prompt with the attribute token as
target; every contender ranks the passages (contenders.py) and is scored by MRR and recall@10 of the
passages that state the queried fact (metrics.py), with time per 1000 passages to export and to score.

    python -m benchmarks.fact_tracing [--quick] [--out DIR] [--threads N]
"""
