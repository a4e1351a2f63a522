"""Top-k per test row across tiles on a torch device, ties to the smaller train index.

torch.topk does not say which of several equal values it keeps, so order is made total with an
int64 key per candidate: the score's float32 bits mapped to a signed integer of the same order
(high 32 bits) and the complement of the train index (low 32 bits); the largest keys are the best
candidates, smaller index first among equal scores. Keys are built for the small candidate sets
only: the running best and a tile's candidates, which are all its scores when it has at most k
columns, else torch.topk's k + 1 best per row: of the whole row, or, for small k and wide tiles
(_group_size), of the k + 1 groups of G adjacent columns with the best extremes and the columns
after the last whole group (_grouped_topk: the same k best, cheaper). Those hold the row's k best
unless the worst of them occurs twice among them: only then may scores equal to the k-th have been
split between kept and dropped, so only such rows (exact ties at the cut) are selected again from
the whole tile row with keys. The (k + 1)-th candidate is merged too: a genuine score of the tile,
not always its (k + 1)-th best by key (a score of a group left out, or of equal value and smaller
index, may be), but never better than the k others, which are the tile's k best: merging it leaves
the best k of the call unchanged. Whether any row of a tile was cut inside a tie is one bool, copied
to pinned host memory without waiting, an event recorded after it (CUDA). The caller merges each tile's
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


@dataclass
class TileExtremes:
    """A score tile's whole groups of `group` adjacent columns (_grouped_topk's): the smallest and the
    largest value of each, float32 (rows, r // group), read in one pass for both sides, and `bad`,
    a bool scalar on the device: whether any score of the tile, its tail's too, is NaN or Inf (a
    group's extremes are NaN or infinite exactly when one of its values is), so that the tile needs
    no reading pass of its own for that check."""

    group: int
    low: torch.Tensor
    high: torch.Tensor
    bad: torch.Tensor


def tile_extremes(scores: torch.Tensor, k: int) -> TileExtremes | None:
    """The groups' extremes of a tile of float32 scores (rows, r) whose k best per row are selected
    by groups (_group_size); None when they are not (a tile of at most k columns, or too narrow).
    Measured on an H200, a tile (1000, 131072): torch.aminmax by groups of 256 0.225 ms, against
    0.201 for amax by groups plus 0.145 for aminmax of the whole tile."""
    r = scores.shape[1]
    group = 0 if r <= k else _group_size(k, r)
    if not group:
        return None
    whole = r // group * group
    low, high = torch.aminmax(scores[:, :whole].unflatten(1, (whole // group, group)), dim=2)
    bad = ~(torch.isfinite(low).all() & torch.isfinite(high).all())
    if whole < r:
        bad |= ~torch.isfinite(scores[:, whole:]).all()
    return TileExtremes(group, low, high, bad)


class RunningTopK:
    """One side's best k per test row of a test block, over the train tiles merged so far."""

    def __init__(self, k: int, side: str, rows: int, device: torch.device):
        self.k, self.side = k, side
        self.values = torch.empty(rows, 0, dtype=torch.float32, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.int64, device=device)

    def candidates(self, scores: torch.Tensor, first: int, extremes: TileExtremes | None = None) -> Candidates:
        """A tile of float32 scores (rows, r) of train rows [first, first + r): its candidates,
        enqueued on the device (nothing is read back). `extremes`: the tile's tile_extremes for this
        k, when the caller made them (for both sides at once); else made here if needed."""
        r = scores.shape[1]
        if r <= self.k:
            columns = torch.arange(first, first + r, device=scores.device).expand_as(scores)
            return Candidates(scores, columns, scores, first)
        extremes = tile_extremes(scores, self.k) if extremes is None else extremes
        if extremes is not None:
            values, local = _grouped_topk(scores, self.k + 1, extremes, self.side)
        else:
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


_GROUP_SIZES = (256, 128, 64)  # _group_size's choices, largest first
_GROUP_SPAN = 4  # _group_size: the k + 1 groups' columns are at most 1 / _GROUP_SPAN of the tile's


def _group_size(k: int, r: int) -> int:
    """Columns per group of _grouped_topk for the k best of a tile of r columns, 0: torch.topk on the
    whole tile instead. The largest G of _GROUP_SIZES with (k + 1) G _GROUP_SPAN <= r: the k + 1
    groups' candidates (a copy, while the tile's candidates are made) are at most a quarter of the tile.

    Measured on an NVIDIA H200, float32 scores (1000, 32768) on the device, torch.topk(k + 1, sorted=
    False) vs _grouped_topk (without the tail): k = 10: 0.47 ms vs 0.179 ms (G = 256), 0.194 (128),
    0.236 (64), 0.36-0.40 (G = 4 to 32); k = 100: 0.475 ms vs 0.34 (G = 64); k = 1000: 0.49 vs 0.52+
    (no gain). For scale: that tile's GEMM took 0.77 ms and scores.amax(1) 0.048 ms. So G = 256 for
    k <= 31 at r = 32768, 128 for k <= 63, 64 for k <= 127, none above: the bound between the
    measured points (k = 100, G = 64 is 1 / 5 of the tile) is a guess, to confirm on a GPU.
    On CPU tensors ("torch:cpu", for tests) (500, 32768) at k = 10: 44 ms vs 34 ms (G = 256)."""
    for group in _GROUP_SIZES:
        if (k + 1) * group * _GROUP_SPAN <= r:
            return group
    return 0


def _grouped_topk(
    scores: torch.Tensor, count: int, extremes: TileExtremes, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (k + 1) best float32 values per row of a tile (rows, r), best for `side`, and their
    int64 columns (rows, count), in no order, through groups: the whole groups of extremes.group
    adjacent columns (a view, no copy) are ranked by their best value (extremes.high or .low), and
    torch.topk picks `count` of the candidates, the columns of the `count` best groups and the
    r mod group last columns (the tail). Needs count <= r // group.

    Exact in the sense _cut_in_tie needs: unless the worst value kept occurs twice among those kept,
    the others are the row's k best. Proof (proponents; opponents alike, order reversed): let e be the
    smallest maximum among the count groups chosen. Their maxima are count distinct candidates all
    >= e, so the worst value kept, w, is >= e. A column that is not a candidate lies in a group left
    out, whose maximum is <= e (the groups chosen are count best ones, however torch.topk broke ties
    among equal maxima): so it is <= e <= w, as is every candidate not kept (torch.topk). If w occurs
    once among the kept, the k others are > w, so strictly better than every score left out: they are
    the row's k best, whatever ties the groups' cut (e equal to a maximum left out) or the candidates'
    cut split. Otherwise the row is tied and merge selects it again from the whole row, as for
    torch.topk on the whole tile. Keeping count = k + 1 groups, not k, gives the count maxima >= e
    that make w >= e: no other condition (on the groups' extremes) is needed."""
    rows, r = scores.shape
    group = extremes.group
    whole = r // group * group
    largest = side == "proponents"
    grouped = scores[:, :whole].unflatten(1, (whole // group, group))  # splitting a dimension: a view
    best = extremes.high if largest else extremes.low
    chosen = torch.topk(best, count, dim=1, largest=largest, sorted=False).indices  # (rows, count)
    candidates = grouped.gather(1, chosen[:, :, None].expand(-1, -1, group)).flatten(1)
    if whole < r:
        candidates = torch.cat([candidates, scores[:, whole:]], dim=1)
    values, at = torch.topk(candidates, count, dim=1, largest=largest, sorted=False)
    if whole == r:  # candidate `at`: column chosen[at // group] * group + at % group
        return values, chosen.gather(1, at // group) * group + at % group
    inside = count * group  # at >= inside: the tail's column whole + at - inside
    slot = chosen.gather(1, torch.clamp(at // group, max=count - 1))
    return values, torch.where(at < inside, slot * group + at % group, at - inside + whole)


def _host_flag(flag: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A bool scalar on the host: `flag` itself for CPU tensors; on CUDA a pinned copy made without
    waiting and the event recorded after the copy on the current stream (valid once it is reached)."""
    if flag.device.type != "cuda":
        return flag, None
    host = torch.empty((), dtype=torch.bool, device="cpu", pin_memory=True)
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
