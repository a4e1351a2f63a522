"""Top-k per test row across tiles on a torch device, ties to the smaller train index.

torch.topk does not say which of several equal values it keeps, so order is made total with an
int64 key per candidate: the score's float32 bits mapped to a signed integer of the same order
(high 32 bits) and the complement of the train index (low 32 bits); the largest keys are the best
candidates, smaller index first among equal scores. Keys are built for the small candidate sets
only (the running best and a tile's best). A tile's best come from torch.topk on its scores, which
is exact unless scores equal to the k-th one were split between kept and dropped; `ties_ok` then
says whether the kept ones were the smallest indices, and where they were not, the caller scores
again with `exact` tiles, which build keys for every score of a tile.
"""

from __future__ import annotations

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


class RunningTopK:
    """One side's best k per test row of a test block, over the train tiles seen so far."""

    def __init__(self, k: int, side: str, rows: int, device: torch.device, exact: bool):
        self.k, self.side, self.exact = k, side, exact
        self.values = torch.empty(rows, 0, dtype=torch.float32, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.int64, device=device)
        self.ties_ok = torch.ones((), dtype=torch.bool, device=device)

    def add(self, scores: torch.Tensor, first: int) -> None:
        """Takes a tile of float32 scores (rows, r) of train rows [first, first + r)."""
        width = min(self.k, scores.shape[1])
        if self.exact:
            columns = torch.arange(first, first + scores.shape[1], device=scores.device).expand_as(scores)
            values, indices = best(scores, columns, width, self.side)
        else:
            values, local = torch.topk(scores, width, dim=1, largest=self.side == "proponents", sorted=False)
            indices = local + first
            self.ties_ok &= _smallest_tied_kept(scores, values, local, self.side)
        values = torch.cat([self.values, values], dim=1)
        indices = torch.cat([self.indices, indices], dim=1)
        self.values, self.indices = best(values, indices, min(self.k, values.shape[1]), self.side)

    def result(self) -> TopK:
        return TopK(self.values.cpu().numpy(), self.indices.cpu().numpy().astype(np.int64, copy=False))


def _smallest_tied_kept(scores: torch.Tensor, kept: torch.Tensor, local: torch.Tensor, side: str) -> torch.Tensor:
    """bool scalar: in every row, the kept scores equal to the worst kept one (the k-th) are at the
    smallest columns among all the row's scores equal to it. scores (m, r); kept, local (m, k)."""
    if kept.shape[1] == 0:
        return torch.ones((), dtype=torch.bool, device=scores.device)
    kth = (kept.min if side == "proponents" else kept.max)(dim=1, keepdim=True).values
    kept_tied = kept == kth
    last = torch.where(kept_tied, local, -1).max(dim=1, keepdim=True).values
    columns = torch.arange(scores.shape[1], device=scores.device)
    # Tied scores at or before the last kept tied column: the kept ones, plus any dropped before it.
    return torch.all(((scores == kth) & (columns <= last)).sum(1) == kept_tied.sum(1))
