"""The generic loop of tracin.scoring driven by the float64 NumPy reference backend: cutting both
sides into chunks and pieces, merging top-k and summing aggregates never changes a result."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
import tracin.scoring
from tracin import backends
from tracin.gradients import GradientSet, KernelSide

from .numpy_reference import NumpyReference


class Chunked(GradientSet):
    """In-memory rows handed out `rows` at a time, as plain (factored, blocks, dtypes) tuples."""

    def __init__(self, inner: GradientSet, rows: int):
        self.inner, self.rows = inner, rows
        self.factored, self.weights, self.weights_given, self.metadata = inner.factored, inner.weights, True, {}

    n_rows = property(lambda self: self.inner.n_rows)
    dims = property(lambda self: self.inner.dims)

    def row_chunks(self) -> int:
        return self.rows

    def kernel_side(self, start: int = 0, stop: int | None = None) -> tuple:
        return tuple(self.inner.kernel_side(start, stop))


class Recording(NumpyReference):
    """The reference backend, noting which test and train rows each call got (column 0 holds the row id)."""

    def __init__(self):
        self.seen: list[tuple[list[int], list[int]]] = []

    def _note(self, test, train) -> None:
        assert isinstance(train, KernelSide) and (test is None or isinstance(test, KernelSide))
        ids = lambda side: [] if side is None else side.blocks[0][:, 0].astype(int).tolist()  # noqa: E731
        self.seen.append((ids(test), ids(train)))

    def scores(self, test, train, weights, *, num_threads, normalize=0, cache=None):
        self._note(test, train)
        return super().scores(test, train, weights, num_threads=num_threads, normalize=normalize)

    def top_k(self, test, train, weights, k, side, *, num_threads, normalize=0, cache=None):
        self._note(test, train)
        return super().top_k(test, train, weights, k, side, num_threads=num_threads, normalize=normalize)

    def self_influence(self, train, weights, *, num_threads, cache=None):
        self._note(None, train)
        return super().self_influence(train, weights, num_threads=num_threads)

    def aggregate(self, test, train, weights, *, num_threads, normalize=0, cache=None):
        self._note(test, train)
        return super().aggregate(test, train, weights, num_threads=num_threads, normalize=normalize)

    def column_sums(self, test, sums, *, num_threads, normalize=0):
        self._note(test, KernelSide(False, [np.zeros((0, 1))], [0]))
        return super().column_sums(test, sums, num_threads=num_threads, normalize=normalize)

    def aggregate_sums(self, sums, train, weights, *, num_threads, normalize=0, cache=None):
        self._note(None, train)
        return super().aggregate_sums(sums, train, weights, num_threads=num_threads, normalize=normalize)


@pytest.fixture
def recording(monkeypatch):
    """The Recording backend registered as "cpu" (so the public functions use it)."""
    backend = Recording()
    monkeypatch.setattr(backends, "_factories", {**backends._factories, "cpu": lambda: backend})
    monkeypatch.setattr(backends, "_loaded", {})
    return backend


def with_ids(rng, rows: int, dims: list[int]) -> list[np.ndarray]:
    """Small-integer gradients (exact in float32) whose checkpoint 0, column 0 is the row number."""
    blocks = [np.round(2 * rng.standard_normal((rows, d))).astype(np.float32) for d in dims]
    blocks[0][:, 0] = np.arange(rows)
    return blocks


def whole(test: list, train: list, w: list[float]) -> np.ndarray:
    return sum(c * t.astype(np.float64) @ x.T.astype(np.float64) for c, t, x in zip(w, test, train, strict=True))


@pytest.mark.parametrize("progress", [False, True])
def test_chunks_and_pieces_change_no_result(recording, rng, monkeypatch, progress):
    monkeypatch.setattr(tracin.scoring, "_MIN_PIECE_ROWS", 3)  # with a bar: pieces of 3..11 rows
    w = [0.5, -2.0]
    test, train = with_ids(rng, 17, [4, 3]), with_ids(rng, 40, [4, 3])
    t, x = Chunked(tracin.Gradients(test, w), 7), Chunked(tracin.Gradients(train, w), 11)
    exact = whole(test, train, w)
    np.testing.assert_array_equal(tracin.scores(t, x, progress=progress), exact)
    for k in (1, 5, 40, 99):
        both = tracin.top_k(t, x, k=k, side="both", progress=progress)
        for got, sign in ((both.proponents, -1), (both.opponents, 1)):
            order = np.argsort(sign * exact, axis=1, kind="stable")[:, :k]  # ties: smaller index first
            np.testing.assert_array_equal(got.indices, order)
            np.testing.assert_array_equal(got.values, np.take_along_axis(exact, order, 1))
    np.testing.assert_array_equal(tracin.aggregate(t, x, progress=progress), exact.sum(0))
    self_exact = sum(c * (b.astype(np.float64) ** 2).sum(1) for c, b in zip(w, train, strict=True))
    np.testing.assert_array_equal(tracin.self_influence(x, progress=progress), self_exact)


def test_each_test_chunk_meets_every_train_row_once_in_order(recording, rng, monkeypatch):
    monkeypatch.setattr(tracin.scoring, "_MIN_PIECE_ROWS", 3)
    t = Chunked(tracin.Gradients(with_ids(rng, 17, [4])), 7)
    x = Chunked(tracin.Gradients(with_ids(rng, 40, [4])), 11)
    tracin.top_k(t, x, k=3, progress=True)
    test_chunks = [list(range(a, min(a + 7, 17))) for a in (0, 7, 14)]
    assert [ids for ids, _ in recording.seen] == [c for c in test_chunks for _ in range(len(recording.seen) // 3)]
    per_chunk = len(recording.seen) // 3
    for c in range(3):
        pieces = [train_ids for _, train_ids in recording.seen[c * per_chunk : (c + 1) * per_chunk]]
        assert sum(pieces, []) == list(range(40))
        assert all(0 < len(p) <= 11 for p in pieces) and len(pieces) > 4  # store chunks, cut for the bar
    recording.seen.clear()
    tracin.self_influence(x, progress=False)
    assert [train_ids for _, train_ids in recording.seen] == [list(range(a, min(a + 11, 40))) for a in (0, 11, 22, 33)]


@pytest.mark.parametrize("progress", [False, True])
def test_full_aggregate_reads_each_side_once(recording, rng, monkeypatch, progress):
    """Full gradients: the test chunks' column sums in row order, then each train row once (its store
    chunks, cut for a bar), not the train rows once per test chunk."""
    monkeypatch.setattr(tracin.scoring, "_MIN_PIECE_ROWS", 3)
    w = [0.5, -2.0]
    test, train = with_ids(rng, 17, [4, 3]), with_ids(rng, 40, [4, 3])
    t, x = Chunked(tracin.Gradients(test, w), 7), Chunked(tracin.Gradients(train, w), 11)
    np.testing.assert_array_equal(tracin.aggregate(t, x, progress=progress), whole(test, train, w).sum(0))
    sums = [ids for ids, train_ids in recording.seen if not train_ids]
    assert sums == [list(range(a, min(a + 7, 17))) for a in (0, 7, 14)]
    pieces = [train_ids for ids, train_ids in recording.seen[len(sums) :]]
    assert recording.seen[: len(sums)] == [(ids, []) for ids in sums]
    assert sum(pieces, []) == list(range(40)) and all(0 < len(p) <= 11 for p in pieces)
    assert (len(pieces) > 4) == progress  # store chunks, cut for the bar


def test_factored_sides_reach_the_backend_factored(recording, rng):
    left_t, right_t = [rng.integers(-2, 3, (3, 2)).astype(np.float32)], [rng.integers(-2, 3, (3, 5)).astype(np.float32)]
    left_x, right_x = [rng.integers(-2, 3, (8, 2)).astype(np.float32)], [rng.integers(-2, 3, (8, 5)).astype(np.float32)]
    t, x = tracin.FactoredGradients(left_t, right_t), tracin.FactoredGradients(left_x, right_x)
    outer = lambda lf, rt: np.einsum("np,nq->npq", lf[0], rt[0]).reshape(len(lf[0]), -1)  # noqa: E731
    exact = outer(left_t, right_t).astype(np.float64) @ outer(left_x, right_x).T
    np.testing.assert_array_equal(tracin.scores(t, x), exact)
    np.testing.assert_array_equal(tracin.aggregate(t, x), exact.sum(0))


def test_the_test_side_is_taken_again_for_every_train_piece(recording, rng):
    """A store checks that it is unchanged on each kernel_side call: the test side is asked for
    its rows once per (test chunk, train piece), not once per test chunk."""
    asked: list[tuple[int, int]] = []

    class Counting(Chunked):
        def kernel_side(self, start: int = 0, stop: int | None = None) -> tuple:
            asked.append((start, stop))
            return super().kernel_side(start, stop)

    t = Counting(tracin.Gradients(with_ids(rng, 10, [4])), 6)
    x = Chunked(tracin.Gradients(with_ids(rng, 25, [4])), 10)
    tracin.top_k(t, x, k=3, progress=False)
    assert [a for a in asked if a != (0, 0)] == [(0, 6)] * 3 + [(6, 10)] * 3  # (0, 0): where the rows live


def test_each_call_is_told_the_next_pairs_train_side(rng, monkeypatch):
    """cache.next_train, as a backend sees it during each call: the very train side the next call
    gets (test chunks outer, so after a chunk's last piece comes the next chunk's first), None on the
    last call; for self_influence too."""
    calls: list[tuple[KernelSide, KernelSide | None]] = []

    class Peeking(NumpyReference):
        def top_k(self, test, train, weights, k, side, *, num_threads, normalize=0, cache=None):
            calls.append((train, cache.next_train))
            return super().top_k(test, train, weights, k, side, num_threads=num_threads, normalize=normalize)

        def self_influence(self, train, weights, *, num_threads, cache=None):
            calls.append((train, cache.next_train))
            return super().self_influence(train, weights, num_threads=num_threads)

    monkeypatch.setattr(backends, "_factories", {**backends._factories, "cpu": Peeking})
    monkeypatch.setattr(backends, "_loaded", {})
    t = Chunked(tracin.Gradients(with_ids(rng, 10, [4])), 6)
    x = Chunked(tracin.Gradients(with_ids(rng, 25, [4])), 10)
    for call, count in ((lambda: tracin.top_k(t, x, k=3, progress=False), 6), (lambda: tracin.self_influence(x), 3)):
        calls.clear()
        call()
        assert len(calls) == count
        assert [int(train.blocks[0][0, 0]) for train, _ in calls] == [0, 10, 20] * (count // 3)
        for (_, told), (following, _) in zip(calls[:-1], calls[1:], strict=True):
            assert told is following
        assert calls[-1][1] is None
