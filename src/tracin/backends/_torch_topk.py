"""Top-k per test row across tiles on a torch device, ties to the smaller train index.

torch.topk does not say which of several equal values it keeps, so order is made total with an
int64 key per candidate: the score's float32 bits mapped to a signed integer of the same order
(high 32 bits) and the complement of the train index (low 32 bits); the largest keys are the best
candidates, smaller index first among equal scores. Keys are built for the small candidate sets
only: the running best and a tile's candidates, which are all its scores when it has at most k
columns, else torch.topk's k + 1 best per row. Those hold the row's k best unless the worst of
them occurs twice among them: only then may scores equal to the k-th have been split between kept
and dropped, so only such rows (exact ties at the cut) are selected again from the whole tile row
with keys. The (k + 1)-th candidate is merged too (a genuine score: it never displaces the k better
ones of its tile). Whether any row of a tile was cut inside a tie is one bool, copied to pinned
host memory without waiting, an event recorded after it (CUDA). The caller merges each tile's
candidates one score block later: the merge waits for that event only (the device's work up to that
block's candidates, not the next block's GEMM enqueued since), and reads which rows are tied
(torch.nonzero, which waits for all work enqueued) only when the flag is set: rare on float data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import TopK

_LOW = 2**32  # train indices of one call must be below this (the low half of a key)


def keys(values: torch.Tensor, indices: torch.Tensor, side: str) -> torch.Tensor:
    """int64 keys of float32 scores (m, w) and their int64 train indices (m, w): larger is better."""
    signed = values if side == "proponents" else -values
    bits = (signed + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0, equal scores tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return ordered * _LOW + (_LOW - 1 - indices)


def best(values: torch.Tensor, indices: torch.Tensor, k: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (values, indices) per row of candidates, best first, ties to the smaller index."""
    chosen = torch.topk(keys(values, indices, side), k, dim=1, sorted=True).indices
    return values.gather(1, chosen), indices.gather(1, chosen)


@dataclass
class Candidates:
    """One side's candidates from a score tile of train rows [first, first + r): float32 values and
    int64 indices (rows, c), the tile (rows, r) itself, and `tied` (rows,) bool, the rows whose cut
    may have split equal scores (None when every column is a candidate); `any_tied`: a bool scalar on
    the host, whether some row is tied, valid once `ready` (CUDA: the event after its copy) is reached."""

    values: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    first: int
    tied: torch.Tensor | None = None
    any_tied: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


class RunningTopK:
    """One side's best k per test row of a test block, over the train tiles merged so far."""

    def __init__(self, k: int, side: str, rows: int, device: torch.device):
        self.k, self.side = k, side
        self.values = torch.empty(rows, 0, dtype=torch.float32, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.int64, device=device)

    def candidates(self, scores: torch.Tensor, first: int) -> Candidates:
        """A tile of float32 scores (rows, r) of train rows [first, first + r): its candidates,
        enqueued on the device (nothing is read back)."""
        r = scores.shape[1]
        if r <= self.k:
            columns = torch.arange(first, first + r, device=scores.device).expand_as(scores)
            return Candidates(scores, columns, scores, first)
        values, local = torch.topk(scores, self.k + 1, dim=1, largest=self.side == "proponents", sorted=False)
        tied = _cut_in_tie(values, self.side)
        return Candidates(values, local + first, scores, first, tied, *_host_flag(tied.any()))

    def merge(self, found: Candidates) -> None:
        """Adds a tile's candidates; its tied rows are selected again from their whole row with keys.
        Waits for the device up to `found`'s flag; reads the tied rows only when it is set."""
        values, indices = found.values, found.indices
        if found.ready is not None:
            found.ready.synchronize()
        if found.tied is not None and bool(found.any_tied):
            rows = torch.nonzero(found.tied).flatten()  # waits for all work enqueued on the device
            scores = found.scores[rows]
            columns = torch.arange(found.first, found.first + scores.shape[1], device=scores.device)
            exact = best(scores, columns.expand_as(scores), values.shape[1], self.side)
            values, indices = values.index_put((rows,), exact[0]), indices.index_put((rows,), exact[1])
        values = torch.cat([self.values, values], dim=1)
        indices = torch.cat([self.indices, indices], dim=1)
        self.values, self.indices = best(values, indices, min(self.k, values.shape[1]), self.side)

    def result(self) -> TopK:
        return TopK(self.values.cpu().numpy(), self.indices.cpu().numpy().astype(np.int64, copy=False))


def _host_flag(flag: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A bool scalar on the host: `flag` itself for CPU tensors; on CUDA a pinned copy made without
    waiting and the event recorded after the copy on the current stream (valid once it is reached)."""
    if flag.device.type != "cuda":
        return flag, None
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(flag.device))
    return host, ready


def _cut_in_tie(values: torch.Tensor, side: str) -> torch.Tensor:
    """bool (rows,): the rows of k + 1 candidates (rows, k + 1) whose worst value occurs more than
    once among them. Elsewhere the k others are strictly better than every score left out (-0.0
    equals 0.0 here as in the keys), so the k best are among the candidates whatever torch.topk kept."""
    worst = (values.amin if side == "proponents" else values.amax)(dim=1, keepdim=True)
    return (values == worst).sum(1) > 1
