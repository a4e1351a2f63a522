"""The scoring backend protocol in float64 NumPy: slow and simple, an independent reference that
the generic loop can be driven with, and that every registered backend is compared against."""

from __future__ import annotations

import numpy as np

from tracin.backends import TopK
from tracin.gradients import KernelSide


def side_float64(side: KernelSide) -> list[np.ndarray]:
    """Per checkpoint the float64 (n, d_c) gradients of a side (row-wise outer products if factored)."""
    blocks = []
    for b, code in zip(side.blocks, side.dtypes, strict=True):
        b = np.asarray(b)
        if code == 2:  # bfloat16 bits: the high half of a float32
            b = (b.astype(np.uint32) << 16).view(np.float32)
        if not np.all(np.isfinite(b)):
            raise ValueError("a side contains NaN or Inf values")
        blocks.append(b.astype(np.float64))
    if not side.factored:
        return blocks
    return [
        np.einsum("np,nq->npq", lf, rt).reshape(len(lf), -1) for lf, rt in zip(blocks[0::2], blocks[1::2], strict=True)
    ]


def normalized(blocks: list[np.ndarray], run: int) -> list[np.ndarray]:
    """Per checkpoint slot the float64 rows divided by their norm over their run of `run` slots
    (one real checkpoint's layers); zero rows stay zero. run 0: the blocks as they are."""
    if run == 0:
        return blocks
    out = []
    for c0 in range(0, len(blocks), run):
        norms = np.sqrt(sum((b**2).sum(1) for b in blocks[c0 : c0 + run]))
        inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        out += [b * inverse[:, None] for b in blocks[c0 : c0 + run]]
    return out


def to_float32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError("influence overflowed float32")
    return out


class NumpyReference:
    """Backend protocol (tracin.backends.Backend) computed in float64, rounded to float32 once; it
    keeps nothing in the loop's ChunkCache (cache is accepted and unused)."""

    name = "numpy-reference"

    def _exact(self, test: KernelSide, train: KernelSide, weights, normalize: int = 0) -> np.ndarray:
        t, x = normalized(side_float64(test), normalize), normalized(side_float64(train), normalize)
        return sum(
            (w * a @ b.T for w, a, b in zip(weights, t, x, strict=True)),
            np.zeros((len(test.blocks[0]), len(train.blocks[0]))),
        )

    def scores(self, test, train, weights, *, num_threads, normalize=0, cache=None):
        return to_float32(self._exact(test, train, weights, normalize))

    def top_k(self, test, train, weights, k, side, *, num_threads, normalize=0, cache=None):
        dense = to_float32(self._exact(test, train, weights, normalize))
        found = []
        for name in ("proponents", "opponents"):
            if side not in (name, "both"):
                found.append(None)
                continue
            order = np.argsort(-dense if name == "proponents" else dense, axis=1, kind="stable")[:, :k]
            found.append(TopK(np.take_along_axis(dense, order, 1), order.astype(np.int64)))
        return tuple(found)

    def self_influence(self, train, weights, *, num_threads, cache=None):
        x = side_float64(train)
        return to_float32(sum((w * (b**2).sum(1) for w, b in zip(weights, x, strict=True)), np.zeros(len(x[0]))))

    def aggregate(self, test, train, weights, *, num_threads, normalize=0, cache=None):
        return self._exact(test, train, weights, normalize).sum(0)

    def column_sums(self, test, sums, *, num_threads, normalize=0):
        """SumsColumns: per checkpoint the float64 column sums of the (normalised) rows, added to `sums`."""
        chunk = [b.sum(0) for b in normalized(side_float64(test), normalize)]
        return chunk if sums is None else [a + b for a, b in zip(sums, chunk, strict=True)]

    def aggregate_sums(self, sums, train, weights, *, num_threads, normalize=0, cache=None):
        x = normalized(side_float64(train), normalize)
        return sum((w * b @ s for w, b, s in zip(weights, x, sums, strict=True)), np.zeros(len(train.blocks[0])))
