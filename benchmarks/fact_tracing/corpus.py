"""The synthetic corpus: entities with random attributes, each fact stated in templated passages among
distractors, over a small integer vocabulary (no tokenizer); queries are fact prompts.

Vocabulary: PAD, BOS, a few function words, filler words, per relation a few synonymous relation
words, entities, and per relation its own attribute values. A fact (entity e, relation r, value v)
is stated in `passages_per_fact` passages, each one of three word orders with a random synonym of r
and random filler words around it; entity always before value (what a left-to-right model can learn
to recall). Distractor passages mention a random entity and relation word but state no value. The
query of a fact is "BOS e 's r0 is" (r0: the relation's first synonym) with target v.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, IS, OF, THE, HAS, POSS, DOT = range(8)
_FUNCTION_WORDS = 8
MAX_FILLERS = 3  # filler words before and after a statement, each side drawn from 0..MAX_FILLERS


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes of the corpus; `distractors` is the number of distractor passages per fact passage."""

    entities: int
    relations: int = 2
    values: int = 16
    synonyms: int = 2
    fillers: int = 64
    passages_per_fact: int = 3
    distractors: float = 0.5


class Vocabulary:
    """Where each kind of token starts: function words, fillers, relation words, entities, values."""

    def __init__(self, spec: CorpusSpec):
        self.spec = spec
        self.filler0 = _FUNCTION_WORDS
        self.relation0 = self.filler0 + spec.fillers
        self.entity0 = self.relation0 + spec.relations * spec.synonyms
        self.value0 = self.entity0 + spec.entities
        self.size = self.value0 + spec.relations * spec.values

    def relation_word(self, relation: int, synonym: int) -> int:
        return self.relation0 + relation * self.spec.synonyms + synonym

    def value(self, relation: int, value: int) -> int:
        return self.value0 + relation * self.spec.values + value


@dataclass
class Corpus:
    """Passages as right-padded token ids (n, length) with their lengths; `fact_of[i]` the fact passage
    i states (-1: a distractor); facts as (entity, relation, value-token) rows; `query_fact[j]` the fact
    of query j."""

    spec: CorpusSpec
    passages: np.ndarray
    lengths: np.ndarray
    fact_of: np.ndarray
    facts: np.ndarray
    query_fact: np.ndarray
    vocab: Vocabulary

    def prompts(self, facts: np.ndarray) -> np.ndarray:
        """The query prompts (len(facts), 5) of the given fact indices: "BOS e 's r0 is"."""
        e, r = self.facts[facts, 0], self.facts[facts, 1]
        column = np.full(len(facts), 0, dtype=np.int64)
        words = [column + BOS, self.vocab.entity0 + e, column + POSS, self.vocab.relation_word(r, 0), column + IS]
        return np.stack(words, axis=1)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def queries(self) -> np.ndarray:
        return self.prompts(self.query_fact)

    @property
    def targets(self) -> np.ndarray:
        return self.facts[self.query_fact, 2]

    def relevant(self, query: int) -> np.ndarray:
        """Indices of the passages that state query `query`'s fact."""
        return np.flatnonzero(self.fact_of == self.query_fact[query])

    def words(self, ids: np.ndarray) -> list[str]:
        """A token row as BM25 words (padding and BOS dropped)."""
        return [str(t) for t in ids if t not in (PAD, BOS)]


def _statement(vocab: Vocabulary, entity: int, relation_word: int, value: int, form: int) -> list[int]:
    e = vocab.entity0 + entity
    if form == 0:
        return [e, POSS, relation_word, IS, value, DOT]
    if form == 1:
        return [THE, relation_word, OF, e, IS, value, DOT]
    return [e, HAS, THE, relation_word, value, DOT]


def make_corpus(spec: CorpusSpec, queries: int, seed: int) -> Corpus:
    """The corpus of `spec` drawn from `seed`, with `queries` fact queries (distinct facts, random)."""
    n_facts = spec.entities * spec.relations
    if not 0 < queries <= n_facts:
        raise ValueError(f"queries must be in [1, {n_facts}] (the number of facts), got {queries}")
    rng = np.random.default_rng(seed)
    vocab = Vocabulary(spec)
    values = rng.integers(0, spec.values, size=(spec.entities, spec.relations))
    facts = np.array(
        [(e, r, vocab.value(r, values[e, r])) for e in range(spec.entities) for r in range(spec.relations)],
        dtype=np.int64,
    )

    def fillers() -> list[int]:
        return list(vocab.filler0 + rng.integers(0, spec.fillers, size=rng.integers(0, MAX_FILLERS + 1)))

    rows, fact_of = [], []
    for f, (e, r, v) in enumerate(facts):
        for _ in range(spec.passages_per_fact):
            word = vocab.relation_word(r, rng.integers(spec.synonyms))
            rows.append([BOS, *fillers(), *_statement(vocab, e, word, v, rng.integers(3)), *fillers()])
            fact_of.append(f)
    for _ in range(round(spec.distractors * len(rows))):
        e = vocab.entity0 + rng.integers(spec.entities)
        word = vocab.relation_word(rng.integers(spec.relations), rng.integers(spec.synonyms))
        middle = [e, HAS, word, DOT] if rng.integers(2) else [THE, word, OF, e, DOT]
        rows.append([BOS, *fillers(), *middle, *fillers()])
        fact_of.append(-1)
    order = rng.permutation(len(rows))
    rows, fact_of = [rows[i] for i in order], np.asarray(fact_of, dtype=np.int64)[order]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    passages = np.full((len(rows), lengths.max()), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        passages[i, : len(r)] = r

    query_fact = np.sort(rng.choice(len(facts), size=queries, replace=False))
    return Corpus(spec, passages, lengths, fact_of, facts, query_fact, vocab)
