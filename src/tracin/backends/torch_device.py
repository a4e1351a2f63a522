"""The torch backend: scoring on a torch device, "cuda:N" (cuBLAS GEMMs, selection on the GPU) or
"torch:cpu" (the same code on CPU tensors, for tests and debugging).

Blocked like the C++ kernel: a test chunk (at most _tunables.DEVICE_TEST_BYTES of float32 rows: the
generic loop cuts larger test sets, except, for plain scores, float32 tensors on the device) goes to
the device once per public call (kept in the generic loop's ChunkCache for every train piece it
meets; once per backend call without one); train rows pass in tiles of _tunables.DEVICE_TILE_BYTES
streamed from the host one tile ahead of the compute through two staging slots kept for the whole
public call, or of DEVICE_RESIDENT_TILE_BYTES used in place when all are on the device already
(wider GEMMs, which cuBLAS runs faster), and each tile meets the test side in blocks of at most
DEVICE_TILE_SCORES scores: one float32 GEMM per checkpoint (two for factored sets, multiplied
elementwise; a block wider than DEVICE_SUM_DEPTH columns one GEMM per slice of that many, added in
float64: _gemm), scaled by the weight and added in float32. Weights go on the test rows as in the C++
kernel, so that a GEMM sees the magnitudes of weighted rows (a dot product of rows may exceed
float32 where the weighted score does not): unless every weight is in [2^-24, 2) and every
weighted test row in float32's comfortable range, each test block (a factored set's left factor) is
replaced, once per test chunk, by a copy (one block at a time; for test rows used in place on the
device, a copy of one score block's rows at a time, made before its GEMM and freed after, so that
the set is never copied whole) whose row r of checkpoint c is multiplied by 2^(k_c - e_r) (exact:
k_c the binary exponent of w_c, e_r the C++ kernel's exponent of row r), the GEMM takes w_c / 2^k_c
(in [1, 2)) and the sum is multiplied by 2^e_r (_fold_weights). Cosine scores (normalize): the test
side is scaled by its rows' inverse norms once, with its upload (each uploaded block replaced by its
scaled copy in turn: the chunk plus one block's copy on the device), and each checkpoint's score
block by the train rows' inverse norms, computed per train tile in float64; rows of norms beyond
2^+-64 (every nonzero factored row, its factors balanced) are first brought near norm 1 by exact
powers of two (_unit_scaled: a copy of each train tile), so that cosines of rows of any finite norm
neither overflow nor underflow. top_k keeps each test row's best across tiles on the device, and
top_k_running (base.KeepsTopK, which the generic loop uses) across the loop's train pieces too: each
test chunk's selection is the ChunkCache's item for the chunk, read back once, at its last piece,
through pinned memory (no host merge per piece). The (m, n) matrix never exists, but a block's
candidates keep its scores until they are merged, a block later: two score blocks (2 x
DEVICE_TILE_SCORES) at once, plus, for rows cut inside a tie, copies of those rows. aggregate and
self_influence wait for the device once per call, at the end (scores reads each block back as it is
made). top_k's merge of a block waits until the device has finished that block's selection (a CUDA
event after a one-byte copy of whether any row was cut inside a tie), while the next block's GEMM,
enqueued before, runs on; only when that flag is set does it read the tied rows, which waits for all
enqueued work (rare on float data). The stream runs on across the generic loop's train pieces: while
a piece's last tile is computed, the host stages the first tile of the loop's next piece
(ChunkCache.next_train) and enqueues its upload, before the call's end waits for the device (for
scores, which reads each block back, before that tile is handed out), so only the public call's
very first tile waits for its copy.

Tolerance: float32 GEMMs in cuBLAS sum in another order than the C++ kernel, so results are not the
same bits, but every score is within the contract's scale-aware bound of the exact value (1e-5 *
sum_c |w_c| |g_c(t)| |g_c(i)|; tests/backends/test_conformance.py) where the C++ kernel's is: weighted
test rows are packed as there (_fold_weights: one power of two per test row, from its largest weighted
value over every checkpoint), so a checkpoint whose weighted values in that row pack below float32's
normal range loses bits, and one at or below 2^-150 is lost whole (README "Numerical contract";
tests/backends/test_weighted_packing.py); a row where lowering would round a value normal at e_r = 0
by more than 2^-20 of itself overflows as there, the call's overflow error (factored aggregate:
float64 sums, as there, of every train row; and of each train row whose float32 scores overflow from
finite inputs, which scores and top_k refuse: _factored_sums).
TF32 is off unless precision="tf32", which rounds GEMM inputs to 10-bit mantissas: errors up to about
1e-3 of that scale. Bits may also change with the tiling (cuBLAS picks kernels by shape), so near-equal scores
may swap places between runs cut differently; exact ties always go to the smaller train index.
The precision is torch's process-wide setting, so the CUDA backend calls of one process run one at
a time, whatever their devices and precisions (one _PRECISION_LOCK, held for each backend call: one
test chunk x train piece of the generic loop); public calls in several threads interleave by pieces,
each piece at its own call's precision.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import _tunables
from ..gradients import KernelSide, non_finite_message
from . import _torch_rows as rows
from ._torch_topk import _LOW, Candidates, RunningTopK, tile_extremes
from .base import ChunkCache, TopK


@dataclass(frozen=True)
class TorchBackend:
    """The Backend protocol on one torch device; num_threads is ignored (torch's own threads)."""

    device: torch.device
    tf32: bool = False

    @property
    def name(self) -> str:
        return "torch:cpu" if self.device.type == "cpu" else str(self.device)

    def with_tf32(self) -> TorchBackend:
        """This backend with TF32 GEMMs (precision="tf32")."""
        return replace(self, tf32=True)

    def holds(self, side: KernelSide) -> bool:
        """Whether every block of the side is a float32 tensor on this device already, which a call
        uses in place (the generic loop then scores a test side whole: scoring.py _device_test_rows)."""
        return all(
            rows.resident(b, self.device) and code == 0 for b, code in zip(side.blocks, side.dtypes, strict=True)
        )

    # -- the Backend protocol --------------------------------------------------------------------
    def scores(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        out = np.empty((test.blocks[0].shape[0], train.blocks[0].shape[0]), dtype=np.float32)
        with self._call(test, train, normalize, cache, weights) as call:
            call.reads_back = True  # each block read back as it is made: the next piece staged earlier
            for t, i, s in call.products():
                out[t, i] = s.cpu().numpy()
        return out

    def top_k(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        k: int,
        side: str,
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> tuple[TopK | None, TopK | None]:
        _check_train_rows(train.blocks[0].shape[0])
        sides = [s for s in ("proponents", "opponents") if side in (s, "both")]
        with self._call(test, train, normalize, cache, weights) as call:
            running = _select(call, _running(call, k, sides))
        return _read(running, call.m, min(k, train.blocks[0].shape[0]), sides)

    def top_k_running(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        k: int,
        side: str,
        *,
        first: int,
        last: bool,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache,
    ) -> tuple[TopK | None, TopK | None] | None:
        """base.KeepsTopK: the chunk's selection (a RunningTopK per test block and side, on the device)
        is the cache's item for the chunk; the piece's candidates are merged into it with their global
        indices (first + local), and it is read back once, on the last piece."""
        if cache is None:
            raise TypeError("top_k_running needs the generic loop's ChunkCache (cache=None given)")
        end = first + train.blocks[0].shape[0]
        _check_train_rows(end)
        sides = [s for s in ("proponents", "opponents") if side in (s, "both")]
        key = ("torch", str(self.device), "top_k", k, side)
        if first == 0:
            cache.drop(key)  # a new chunk's selection (one of an earlier pass never carries over)
        with self._call(test, train, normalize, cache, weights) as call:
            running = _select(call, cache.get(key, functools.partial(_running, call, k, sides)), first)
        if not last:
            return None
        cache.drop(key)
        return _read(running, call.m, min(k, end), sides)

    def self_influence(
        self, train: KernelSide, weights: Sequence[float], *, num_threads: int, cache: ChunkCache | None = None
    ) -> np.ndarray:
        with self._call(None, train, cache=cache) as call:
            parts = []
            for _, _, x in call.train_tiles():
                norms = [_squared_norms(b) for b in x]  # float64, as the C++ kernel sums
                if train.factored:
                    norms = [a * b for a, b in zip(norms[0::2], norms[1::2], strict=True)]
                parts.append(sum(w * n for w, n in zip(weights, norms, strict=True)))
            total = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)
            out = total.float().cpu().numpy()
        if not np.all(np.isfinite(out)):
            raise ValueError(_self_influence_overflow(out))
        return out

    def aggregate(
        self,
        test: KernelSide,
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        if not train.factored:  # the two steps scoring.aggregate takes over a test set's chunks
            sums = self.column_sums(test, None, num_threads=num_threads, normalize=normalize)
            return self.aggregate_sums(sums, train, weights, num_threads=num_threads, normalize=normalize, cache=cache)
        with self._call(test, train, normalize, cache, weights) as call:
            if call.prepared.overflowing is not None:
                # a test row's packing overflows (_fold_weights): where the C++ kernel sums in float64
                call.bad_score = torch.zeros((), dtype=torch.bool, device=self.device)
                return _exact_factored_sums(call, test, weights).cpu().numpy()
            # no shortcut: (L_t L_i^T) * (R_t R_i^T) summed over the test rows
            return _factored_sums(call, test, weights)

    def column_sums(
        self, test: KernelSide, sums: list[torch.Tensor] | None, *, num_threads: int, normalize: int = 0
    ) -> list[torch.Tensor]:
        """sum_t <t, x> = <sum_t t, x>: the chunk's float64 column sums on the device (of its cosine-scaled
        float32 copy for normalize), added to `sums`."""
        rows.check_device(test, "test", self.device)
        with _device_scope(self.device, self.tf32):
            prepared = _DeviceTest.upload(test, self.device, normalize)
            if bool(prepared.bad):
                raise ValueError(_non_finite_message(test, None))
            chunk = prepared.column_sums()
            return chunk if sums is None else [a.add_(b) for a, b in zip(sums, chunk, strict=True)]

    def aggregate_sums(
        self,
        sums: list[torch.Tensor],
        train: KernelSide,
        weights: Sequence[float],
        *,
        num_threads: int,
        normalize: int = 0,
        cache: ChunkCache | None = None,
    ) -> np.ndarray:
        with self._call(None, train, normalize, cache) as call:
            total = torch.zeros(train.blocks[0].shape[0], dtype=torch.float64, device=self.device)
            for i0, i1, x in call.train_tiles():
                x, scales = call.cosine(x)
                total[i0:i1] = sum(
                    w * _float64_products(b, s) * (1.0 if scales is None else scales[c // normalize])
                    for c, (w, b, s) in enumerate(zip(weights, x, sums, strict=True))
                )
            return total.cpu().numpy()  # read once: no wait for the device per tile

    # -- the work of one call --------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(
        self,
        test: KernelSide | None,
        train: KernelSide,
        normalize: int = 0,
        cache: ChunkCache | None = None,
        weights: Sequence[float] | None = None,
    ) -> Iterator[_Call]:
        """A call's work on the device, TF32 as chosen, cosine scores for normalize > 0, the test side
        taken from `cache` when an earlier piece put it there (weighted for score products when
        `weights` are given); ValueError at the end for non-finite input or scores (checked on the
        device while working, read once)."""
        for what, side in (("test", test), ("train", train)):
            if side is not None:
                rows.check_device(side, what, self.device)
        with _device_scope(self.device, self.tf32):
            call = _Call(test, train, self.device, normalize, cache, weights)
            yield call
            if bool(call.bad_input):
                raise ValueError(_non_finite_message(test, train))
            if bool(call.bad_score):
                raise ValueError(_overflow_message(call.first_overflow()))


_TINY = 2.0**-64  # cosine scores: rows of a norm below it or above its inverse are first brought near 1
_OVERFLOW = (
    "influence overflowed float32 although every input is finite: a score (or, for factored gradients, a "
    "product of left or of right factors; or a dot product of gradients before weights in [2^-24, 2)) "
    "exceeds float32's range{where}; scale the gradients down"
)


def _overflow_message(pair: tuple[int, int] | None) -> str:
    """The float32 overflow error naming the (test row, train row) pair as the C++ kernel does (the
    generic loop's scoring.rows_shifted counts them from the start of the sets), or no rows for None.
    A test set cut into chunks (scoring._device_test_rows) may name another overflowing pair than the
    kernel, whose passes of test rows need not line up with the chunks."""
    where = "" if pair is None else f", first for test row {pair[0]} and train row {pair[1]}"
    return _OVERFLOW.format(where=where)


def _self_influence_overflow(out: np.ndarray) -> str:
    """The C++ kernel's message for self-influence beyond float32 (finite inputs), naming the first rows."""
    rows = np.flatnonzero(~np.isfinite(out))[:5].tolist()
    return (
        f"self-influence overflowed float32 for train rows {rows} although every input is finite: w_c |g_c(i)|^2 "
        "(|L_c(i)|^2 |R_c(i)|^2 for factored rows), summed over the checkpoints in float64, exceeds float32's "
        "range; scale the gradients down (or the learning-rate weights)"
    )


class _Call:
    """The tile producer of one call: the test side on the device, train tiles, score tiles."""

    def __init__(
        self,
        test: KernelSide | None,
        train: KernelSide,
        device: torch.device,
        normalize: int = 0,
        cache: ChunkCache | None = None,
        weights: Sequence[float] | None = None,
    ):
        self.train, self.factored, self.normalize = train, train.factored, normalize
        self.bad_score = torch.zeros((), dtype=torch.bool, device=device)
        self.device = device
        in_place = rows.all_resident(train, device)
        tile_bytes = _tunables.DEVICE_RESIDENT_TILE_BYTES if in_place else _tunables.DEVICE_TILE_BYTES
        # at most DEVICE_TILE_SCORES rows, so that a block of one test row keeps within it (narrow rows)
        self.tile_rows = min(rows.tile_rows(train, tile_bytes), _tunables.DEVICE_TILE_SCORES)
        self.reads_back = False  # whether the caller reads each score block back (TrainStream.tiles)
        make_stream = functools.partial(rows.TrainStream, device)
        self.stream = make_stream() if cache is None else cache.keep(("torch", str(device)), make_stream)
        self.following = None if cache is None else cache.next_train
        if test is None:
            self.prepared, self.test, self.m = None, [], 0
            self.bad_input = torch.zeros((), dtype=torch.bool, device=device)
            return
        make = functools.partial(_DeviceTest.upload, test, device, normalize, weights)
        key = ("torch", str(device), normalize, None if weights is None else tuple(weights))
        self.prepared = make() if cache is None else cache.get(key, make)
        self.test, self.m = self.prepared.blocks, test.blocks[0].shape[0]
        if self.prepared.overflowing is not None and train.blocks[0].shape[0]:
            # the C++ kernel's packing overflows (whatever the train rows, and where the GEMMs of rows
            # left in place under weights near 1 would not)
            self.bad_score = torch.ones((), dtype=torch.bool, device=device)
        self.bad_input = self.prepared.bad.clone()  # train tiles add to it: the cached flag stays the test's

    def cosine(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """A train tile's blocks and, for cosine scores, its rows' float64 (rows,) inverse norms per run
        of checkpoints (extreme rows first brought near norm 1 in copies: _unit_scaled); else (x, None)."""
        if not self.normalize:
            return x, None
        x = list(x)  # the stream's list stays as it is
        return x, _unit_scaled(x, self.factored, self.normalize)

    def test_blocks(self) -> list[tuple[int, int]]:
        """Test rows per score tile: at most DEVICE_TILE_SCORES scores with a full train tile, a quarter
        of that where a block is wider than DEVICE_SUM_DEPTH (_gemm's float64 sum and float32 slice
        results take three times the block's float32 scores)."""
        scores = _tunables.DEVICE_TILE_SCORES
        if max((t.shape[1] for t in self.test), default=0) > _tunables.DEVICE_SUM_DEPTH:
            scores //= 4
        step = max(1, scores // self.tile_rows)
        return [(t0, min(t0 + step, self.m)) for t0 in range(0, self.m, step)]

    def train_tiles(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(first row, end row, float32 blocks) of each train tile, checked for NaN / Inf."""
        for i0, i1, x in self.stream.tiles(self.train, self.tile_rows, self.following, self.reads_back):
            for b in x:
                self.bad_input |= _not_finite(b)
            yield i0, i1, x

    def products(
        self, checked: bool = True, blocks: list[tuple[int, int]] | None = None
    ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """(test rows, train rows, float32 scores) of every test block (`blocks`, default test_blocks())
        x train tile, train tiles outer (the call made with weights); each block checked for NaN / Inf
        into bad_score unless not `checked` (the caller then checks each block itself)."""
        blocks = self.test_blocks() if blocks is None else blocks
        alphas, exponents, later = self.prepared.alphas, self.prepared.exponents, self.prepared.later
        for i0, i1, x in self.train_tiles():
            x, scales = self.cosine(x)
            scales = None if scales is None else [v.float()[None, :] for v in scales]
            for t0, t1 in blocks:
                test = [t[t0:t1] for t in self.test]
                rescale = None if exponents is None else exponents[t0:t1]
                fold = None if later is None else {b: (v[t0:t1], t0) for b, v in later.items()}
                s = _product(test, x, alphas, self.factored, scales, self.normalize, rescale, fold)
                if checked:
                    self.bad_score |= _not_finite(s)
                yield slice(t0, t1), slice(i0, i1), s

    def first_overflow(self) -> tuple[int, int] | None:
        """(test row, train row), local to the call, of its first non-finite score from finite inputs,
        in the C++ kernel's order: its passes of test rows (_kernel_pass_rows) in turn, and in the first
        pass holding one, the smallest train row holding one, then its smallest test row. Found by
        scoring the call's test blocks again, pass by pass and tile by tile (the error path only: the
        normal path keeps one flag), up to the first train tile that holds one; None where none is
        found again."""
        self.following = None  # no upload of the loop's next piece (the call ends in an error)
        step = _kernel_pass_rows(sum(4 * t.shape[1] for t in self.test))
        overflowing = None if self.prepared is None else self.prepared.overflowing
        for p0 in range(0, self.m, step):
            p1 = min(p0 + step, self.m)
            if overflowing is not None and bool(((overflowing >= p0) & (overflowing < p1)).any()):
                return None  # the kernel's packing of the pass overflows: its error names no pair
            blocks = [(max(t0, p0), min(t1, p1)) for t0, t1 in self.test_blocks() if t0 < p1 and t1 > p0]
            found: tuple[int, int] | None = None  # (train row, test row)
            products = self.products(checked=False, blocks=blocks)
            try:
                for t, i, s in products:
                    if found is not None and i.start > found[0]:
                        break  # a later train tile: the first one's pair is found
                    bad = ~torch.isfinite(s)
                    columns = torch.nonzero(bad.any(0)).flatten()
                    if columns.numel():
                        j = int(columns[0])
                        pair = (i.start + j, t.start + int(torch.nonzero(bad[:, j]).flatten()[0]))
                        found = pair if found is None else min(found, pair)
            finally:
                products.close()
            if found is not None:
                return found[1], found[0]
        return None


# The C++ kernel's test rows per pass over the train side (csrc/src/tunables.hpp: kDefaultTestBlock,
# kPassRowQuantum, kPackedTestBudget; csrc/src/engine.cpp: DefaultPassRows): an overflow error names a
# pair of the first pass holding one, so first_overflow scans in the same passes. Keep them in step.
_KERNEL_TEST_BLOCK = 512  # kDefaultTestBlock: most test rows per pass
_KERNEL_PASS_ROW_QUANTUM = 32  # kPassRowQuantum: rows per pass are a multiple of it where the budget allows
_KERNEL_PACKED_TEST_BUDGET = 64 * 2**20  # kPackedTestBudget: bytes of a pass's packed float32 test rows
_KERNEL_THIN_LANES = 8  # KernelTable::thin.nr of the AVX2 / AVX-512 kernels (4 for the generic ones)


def _kernel_pass_rows(row_bytes: int) -> int:
    """Test rows per pass of the C++ kernel (DefaultPassRows) for test rows of `row_bytes` float32
    bytes (all checkpoints' columns, both factors)."""
    by_budget = _KERNEL_PACKED_TEST_BUDGET // max(row_bytes, 1)
    if by_budget < _KERNEL_PASS_ROW_QUANTUM:
        return max(by_budget // _KERNEL_THIN_LANES * _KERNEL_THIN_LANES, _KERNEL_THIN_LANES)
    return min(by_budget // _KERNEL_PASS_ROW_QUANTUM * _KERNEL_PASS_ROW_QUANTUM, _KERNEL_TEST_BLOCK)


@dataclass
class _DeviceTest:
    """A test chunk on the device, kept in the loop's ChunkCache for the train pieces it meets: float32
    blocks (cosine scores: a copy scaled by the rows' inverse norms; weighted: see _fold_weights), a
    bool scalar saying whether any input value is NaN or Inf, and for weighted blocks the GEMM factor
    of each checkpoint, the int64 (rows,) binary exponents each score row is multiplied back by (None: all 0) and, for
    blocks that are the caller's rows used in place (later[b], int64 (rows,); None: none), the powers
    of two their rows are multiplied by in a copy of one score block's rows at a time (_product), and
    the int64 rows (None: none) that _fold_weights left unshifted and that pack an infinite weighted
    value (first_overflow then names no pair for their pass, as the C++ kernel's packing)."""

    blocks: list[torch.Tensor]
    bad: torch.Tensor
    alphas: list[float] | None = None
    exponents: torch.Tensor | None = None
    later: dict[int, torch.Tensor] | None = None
    overflowing: torch.Tensor | None = None

    @classmethod
    def upload(
        cls, test: KernelSide, device: torch.device, normalize: int, weights: Sequence[float] | None = None
    ) -> _DeviceTest:
        """The test side's blocks copied to the device (those already there: widened or used in place),
        weighted (_fold_weights) when `weights` are given."""
        blocks = rows.whole(test, device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for t in blocks:
            bad |= _not_finite(t)
        if normalize and blocks:  # each block replaced by its scaled copy in turn (the list's originals freed)
            scales = _unit_scaled(blocks, test.factored, normalize)
            per = 2 if test.factored else 1
            for c in range(len(blocks) // per):
                blocks[c * per].mul_(scales[c // normalize].float()[:, None])
        if weights is None:
            return cls(blocks, bad)
        sources = [rows.host_tensor(b, code) for b, code in zip(test.blocks, test.dtypes, strict=True)]
        in_place = [not normalize and t.data_ptr() == s.data_ptr() for t, s in zip(blocks, sources, strict=True)]
        folded = _fold_weights(blocks, test.factored, weights, in_place, cosine=bool(normalize))
        alphas, exponents, later, overflowing = folded
        return cls(blocks, bad, alphas=alphas, exponents=exponents, later=later, overflowing=overflowing)

    def column_sums(self) -> list[torch.Tensor]:
        """float64 (d_c,) sums over the rows of each block (new tensors)."""
        return [t.sum(0, dtype=torch.float64) for t in self.blocks]


def _running(call: _Call, k: int, sides: list[str]) -> dict[tuple[int, int, str], RunningTopK]:
    """An empty selection of each side's best k per test block of a call, keyed (t0, t1, side)."""
    return {
        (t0, t1, side): RunningTopK(k, side, t1 - t0, call.device) for t0, t1 in call.test_blocks() for side in sides
    }


def _select(
    call: _Call, running: dict[tuple[int, int, str], RunningTopK], first: int = 0
) -> dict[tuple[int, int, str], RunningTopK]:
    """Merges a call's train rows, global indices from `first`, into each side's running best k per
    test block (`running`, made by _running for the same test blocks), and returns it. A score block's
    candidates are merged once the next block is enqueued: the merge waits for the device to reach the
    end of the merged block's selection (_torch_topk), not for the next block, whose GEMM runs meanwhile."""
    sides = list(dict.fromkeys(side for _, _, side in running))
    if {(t0, t1) for t0, t1, _ in running} != set(call.test_blocks()):
        raise RuntimeError("top_k: the running selection was made for other test blocks")  # tiles of other rows
    pending: list[tuple[RunningTopK, Candidates]] = []
    for t, i, s in call.products(checked=False):
        k = running[t.start, t.stop, sides[0]].k
        extremes = tile_extremes(s, k)  # both sides' groups in one pass, which also checks the block
        call.bad_score |= _not_finite(s) if extremes is None else extremes.bad
        made = [
            (running[t.start, t.stop, side], running[t.start, t.stop, side].candidates(s, first + i.start, extremes))
            for side in sides
        ]
        for selection, candidates in pending:
            selection.merge(candidates)
        pending = made
    for selection, candidates in pending:
        selection.merge(candidates)
    return running


def _read(
    running: dict[tuple[int, int, str], RunningTopK], m: int, width: int, sides: list[str]
) -> tuple[TopK | None, TopK | None]:
    """(proponents, opponents) of m test rows from the running selections of their blocks, each read
    into the side's (m, width) host arrays (no host concatenation); None for a side not asked for."""
    out = {side: TopK(np.empty((m, width), np.float32), np.empty((m, width), np.int64)) for side in sides}
    staged = []  # (host rows, their copy in pinned memory on CUDA: 1000 x 1000 read 2x faster than into pageable)
    for (t0, t1, side), selection in running.items():
        if selection.values.shape != (t1 - t0, width):  # copy_ would broadcast a narrower selection
            raise RuntimeError(f"top_k: a selection of shape {tuple(selection.values.shape)}, not {(t1 - t0, width)}")
        for host, device in zip(out[side], (selection.values, selection.indices), strict=True):
            if not device.is_cuda:
                torch.from_numpy(host[t0:t1]).copy_(device)
                continue
            pinned = torch.empty(device.shape, dtype=device.dtype, device="cpu", pin_memory=True)
            staged.append((host[t0:t1], pinned.copy_(device, non_blocking=True), device.device))
    if staged:
        torch.cuda.current_stream(staged[0][2]).synchronize()
    for host, pinned, _ in staged:
        torch.from_numpy(host).copy_(pinned)
    return out.get("proponents"), out.get("opponents")


def _check_train_rows(end: int) -> None:
    """ValueError for train indices beyond the keys' low half (_torch_topk._LOW)."""
    if end >= _LOW:
        raise ValueError(f"top_k on a torch device takes at most {_LOW - 1} train rows, got {end}")


def _not_finite(x: torch.Tensor) -> torch.Tensor:
    """bool scalar on x's device: whether x holds NaN or Inf (one reading pass: its min and max,
    which are NaN or infinite exactly when some value is)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=x.device)
    low, high = torch.aminmax(x)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def _inverse_norms(squares: list[torch.Tensor], factored: bool, run: int) -> list[torch.Tensor]:
    """float64 (rows,) per run of `run` checkpoints: 1 / the rows' norm over the run (0 for a zero
    row, NaN for NaN), from the float64 squared row norms of each block; factored checkpoints count
    |left|^2 |right|^2."""
    if factored:
        squares = [a * b for a, b in zip(squares[0::2], squares[1::2], strict=True)]
    runs = [sum(squares[c0 : c0 + run]) for c0 in range(0, len(squares), run)]
    return [torch.where(s == 0, torch.zeros_like(s), s.rsqrt()) for s in runs]


def _unit_scaled(blocks: list[torch.Tensor], factored: bool, run: int) -> list[torch.Tensor]:
    """Cosine scores of rows of any finite norm: replaces each block of the list by a copy (one at a
    time, so that an original the list alone holds is freed before the next copy is made) in which
    rows are multiplied by powers of two (exactly, up to values then below float32's normal range,
    negligible beside the norm); returns the float64 (rows,) inverse norms of the rows so scaled, per
    run of `run` checkpoints. Full checkpoints: each row whose norm over its run is below _TINY or
    above 1 / _TINY is brought into (0.5, 1], so that its inverse norm fits float32 and its products
    with unit rows stay clear of subnormals; other rows keep their values (times 1). Factored
    checkpoints: every nonzero row is brought into (0.5, 1], its left factor to a norm in [0.5, 1) and
    its right factor taking the rest (at most 2), so that neither factor's GEMM underflows or
    overflows, whatever the balance of the factors and the row's norm; a factor whose partner is zero
    (a zero product, scoring 0) is brought to a norm in [0.5, 1)."""
    squares = [_squared_norms(b) for b in blocks]
    inverse = _inverse_norms(squares, factored, run)
    if factored:  # every nonzero row (v > 0; v = 0: a zero row, NaN: NaN input)
        moved = [v > 0 for v in inverse]
    else:  # 1 / v: the norm
        moved = [(v > 1 / _TINY) | ((v < _TINY) & (v > 0)) for v in inverse]
    shifts = [torch.where(e, torch.frexp(v).exponent - 1, 0) for e, v in zip(moved, inverse, strict=True)]
    inverse = [v * _power_of_two(-k, torch.float64) for v, k in zip(inverse, shifts, strict=True)]
    if not factored:
        for c in range(len(blocks)):
            blocks[c] = _times_power_of_two(blocks[c], shifts[c // run])
        return inverse
    for c in range(len(blocks) // 2):
        left, right = squares[2 * c : 2 * c + 2]
        both = (left > 0) & (right > 0)
        a = torch.where(left > 0, -torch.frexp(left.sqrt()).exponent, 0)  # |left 2^a| in [0.5, 1)
        b = torch.where(both, shifts[c // run] - a, torch.where(right > 0, -torch.frexp(right.sqrt()).exponent, 0))
        blocks[2 * c] = _times_power_of_two(blocks[2 * c], a)
        blocks[2 * c + 1] = _times_power_of_two(blocks[2 * c + 1], b)
    return inverse


def _squared_norms(block: torch.Tensor) -> torch.Tensor:
    """float64 (rows,) squared norms of the float32 block's rows, summed in float64 over slices of
    rows (at most _NORM_SLICE values each), so that the float64 copy is a slice's, not the block's."""
    step = max(1, _NORM_SLICE // max(block.shape[1], 1))
    if block.shape[0] <= step:
        return block.double().square().sum(1)
    return torch.cat([block[r : r + step].double().square().sum(1) for r in range(0, block.shape[0], step)])


def _float64_products(block: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """float64 (rows,) products of the float32 block's rows with a float64 vector, over slices of rows
    (at most _NORM_SLICE values each), so that the float64 copy is a slice's, not the block's."""
    step = max(1, _NORM_SLICE // max(block.shape[1], 1))
    if block.shape[0] <= step:
        return block.double() @ vector
    return torch.cat([block[r : r + step].double() @ vector for r in range(0, block.shape[0], step)])


_NORM_SLICE = 2**22  # values per float64 slice of _squared_norms and _float64_products (32 MiB)


def _times_power_of_two(block: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """A copy of the float32 `block` with row i multiplied by 2^shift[i], in two exact steps (each by at
    most 2^127). Rows shifted below 2^-252 become zero (shifts reach at most about 2^150 up; only a
    factor negligible beside its row's other checkpoints is shifted that far down: _unit_scaled)."""
    half = torch.div(shift, 2, rounding_mode="floor").clamp(min=-126)
    first = torch.where(shift < -252, 0.0, _power_of_two(half, torch.float32))
    out = block * first[:, None]
    return out.mul_(_power_of_two((shift - half).clamp(min=-126), torch.float32)[:, None])


def _power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^exponent exactly, made from its bits (a normal number: exponent in [-126, 127] for float32,
    [-1022, 1023] for float64), where torch.ldexp would round 2^exponent to the default dtype first."""
    bits, bias, integer = (23, 127, torch.int32) if dtype == torch.float32 else (52, 1023, torch.int64)
    return ((exponent.to(integer) + bias) << bits).view(dtype)


def _product(
    test: list[torch.Tensor],
    train: list[torch.Tensor],
    alphas: Sequence[float],
    factored: bool,
    scales: list[torch.Tensor] | None = None,
    run: int = 0,
    exponents: torch.Tensor | None = None,
    fold: dict[int, tuple[torch.Tensor, int]] | None = None,
) -> torch.Tensor:
    """float32 (m, r): sum_c w_c <test_c[t], train_c[i]>, per checkpoint a GEMM (factored: the
    elementwise product of the left and the right factors' GEMMs) scaled by alphas[c], added in
    float32, and each row t multiplied by 2^exponents[t] (rounding once; test rows and alphas as
    _fold_weights makes them; fold[b]: the row shifts of test block b, applied to a copy made just
    before its GEMM and freed after, and the rows' first index in the whole block). scales: cosine
    scores, float32 (1, r) train inverse norms per run of `run` checkpoints, applied to each
    checkpoint's block (the test side comes scaled).
    Checkpoints of weight 0 add nothing, as in the C++ kernel, whose weighted (left) rows are then 0:
    a factored one adds 0 x its right factors' GEMM (NaN where that overflows, as there)."""
    out = None
    for c, alpha in enumerate(alphas):
        out = _add_checkpoint(out, test, train, c, alpha, factored, scales, run, fold)
    if out is None:  # every weight 0 (full checkpoints)
        out = torch.zeros(test[0].shape[0], train[0].shape[0], dtype=torch.float32, device=train[0].device)
    if exponents is None:
        return out
    # beyond float64's normal range the score is 0 or overflows float32 either way
    factor = _power_of_two(exponents.clamp(-1022, 1023), torch.float64)
    return out.double().mul_(factor[:, None]).float()


def _add_checkpoint(
    out: torch.Tensor | None,
    test: list[torch.Tensor],
    train: list[torch.Tensor],
    c: int,
    alpha: float,
    factored: bool,
    scales: list[torch.Tensor] | None,
    run: int,
    fold: dict[int, tuple[torch.Tensor, int]] | None = None,
) -> torch.Tensor | None:
    """out (a new float32 tensor when None) plus alpha times checkpoint c's (m, r) scores, in float32;
    out as it is (None included) for a full checkpoint of weight 0. The weighted block (full, or the
    left factor) is first shifted by fold[block] where given (_shifted: a copy, freed on return)."""
    if alpha == 0:
        if not factored:
            return out
        if out is None:  # +0 (as the C++ tile starts), NaN where the right factors' GEMM overflows
            out = torch.zeros(test[1].shape[0], train[1].shape[0], dtype=torch.float32, device=train[1].device)
        return out.add_(_gemm(test[2 * c + 1], train[2 * c + 1]), alpha=0.0)  # the left GEMM is 0
    per = 2 if factored else 1
    left = test[c * per] if fold is None or c * per not in fold else _shifted(test[c * per], *fold[c * per])
    if factored or scales is not None or left.shape[1] > _tunables.DEVICE_SUM_DEPTH:
        part = (
            _gemm(left, train[2 * c]).mul_(_gemm(test[2 * c + 1], train[2 * c + 1]))
            if factored
            else _gemm(left, train[c])
        )
        if scales is not None:
            part.mul_(scales[c // run])
        return part.mul_(alpha) if out is None else out.add_(part, alpha=alpha)
    if out is None:
        out = torch.empty(left.shape[0], train[c].shape[0], dtype=torch.float32, device=train[c].device)
        return out.addmm_(left, train[c].T, beta=0, alpha=alpha)
    return out.addmm_(left, train[c].T, alpha=alpha)


def _gemm(test: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """float32 (m, r) test @ train.T of float32 (m, d) and (r, d) blocks; for d beyond
    _tunables.DEVICE_SUM_DEPTH, one GEMM per slice of that many columns (views, no copies), the slices'
    results added in float64 and rounded once, so that the error does not grow with d (BLAS and cuBLAS
    sum a whole row in one float32 chain: same-sign rows of 2^18 columns missed the contract's bound
    1.5x, of 2^20 5x)."""
    depth = _tunables.DEVICE_SUM_DEPTH
    d = test.shape[1]
    if d <= depth:
        return torch.mm(test, train.T)
    total = torch.zeros(test.shape[0], train.shape[0], dtype=torch.float64, device=train.device)
    for k0 in range(0, d, depth):
        total.add_(torch.mm(test[:, k0 : k0 + depth], train[:, k0 : k0 + depth].T))
    return total.float()


def _factored_sums(call: _Call, test: KernelSide, weights: Sequence[float]) -> np.ndarray:
    """float64 (n,) factored aggregate of a call made with weights: each train row's float32 scores
    summed over the test rows in float64, read back once. A train row whose scores overflow float32
    from finite inputs (its sum then not finite: a float64 sum of finite float32 scores cannot be) is
    summed again by _exact_factored_sums, as the C++ kernel's Aggregate (csrc/src/api.cpp) recomputes
    such rows alone, so that the other rows keep their bits; where an input is NaN or Inf, the call's
    non-finite error instead."""
    total = torch.zeros(call.train.blocks[0].shape[0], dtype=torch.float64, device=call.device)
    for _, i, s in call.products(checked=False):  # no overflow flag: a non-finite score leaves its sum so
        total[i] += s.sum(0, dtype=torch.float64)
    out = total.cpu().numpy()
    overflowed = np.flatnonzero(~np.isfinite(out))
    if overflowed.size and not bool(call.bad_input):
        out[overflowed] = _exact_factored_sums(call, test, weights, overflowed).cpu().numpy()
    return out


def _exact_factored_sums(
    call: _Call, test: KernelSide, weights: Sequence[float], selected: np.ndarray | None = None
) -> torch.Tensor:
    """float64 factored aggregate with every product and sum in float64, as the C++ kernel's
    ExactFactoredSums (csrc/src/api.cpp), which its aggregate falls back to when its float32 packing or
    scores overflow from finite inputs: out[i] = sum over test rows t and checkpoints c of
    w_c s_t s_i (L_c(t) . L_c(i)) (R_c(t) . R_c(i)), s the rows' float64 inverse norms over c's run
    for cosine scores (else 1). Of the train rows `selected` (int64, ascending, counted from the call's
    first row; shape (len(selected),)), or of all (n,) for None: when a test row's packing overflows
    (_fold_weights), where the float32 products would be refused. Pair by pair (the error path of rare
    inputs: wide ranges of weighted values), over slices of train rows whose float64 copies hold at
    most _NORM_SLICE values each and slices of test rows of at most a quarter of the normal path's test
    block (_Call.test_blocks), so that the two float64 pair blocks of a slice take at most the bytes of
    the normal path's float32 score block, and at most _NORM_SLICE values each."""
    device, normalize = call.device, call.normalize
    original = rows.whole(test, device)  # the caller's values (the prepared blocks are weighted)
    run = normalize if normalize else len(weights)
    test_scales = _inverse_norms([_squared_norms(b) for b in original], True, run) if normalize else None
    width = max(1, max(b.shape[1] for b in original))
    step = max(1, min(max((t1 - t0 for t0, t1 in call.test_blocks()), default=1) // 4, _NORM_SLICE // width))
    parts = []
    for i0, i1, x in call.train_tiles():
        if selected is not None:
            lo, hi = np.searchsorted(selected, (i0, i1))
            if lo == hi:
                continue
            picked = torch.from_numpy(selected[lo:hi] - i0).to(device)
            x = [b.index_select(0, picked) for b in x]
        cut = max(1, _NORM_SLICE // max(1, max(b.shape[1] for b in x)))  # train rows per float64 copy
        for r0 in range(0, x[0].shape[0], cut):
            parts.append(_exact_tile_sums(original, [b[r0 : r0 + cut] for b in x], weights, run, test_scales, step))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)  # no train rows


def _exact_tile_sums(
    test: list[torch.Tensor],
    train: list[torch.Tensor],
    weights: Sequence[float],
    run: int,
    test_scales: list[torch.Tensor] | None,
    step: int,
) -> torch.Tensor:
    """float64 (r,) _exact_factored_sums of the float32 factored train rows `train` (r rows) against
    every test row (`test`, float32 (m, .) factors; `test_scales`: their float64 inverse norms per run
    for cosine scores, else None), in slices of `step` test rows: two float64 (step, r) blocks at once."""
    r = train[0].shape[0]
    train_scales = _inverse_norms([_squared_norms(b) for b in train], True, run) if test_scales is not None else None
    total = torch.zeros(r, dtype=torch.float64, device=train[0].device)
    for c, w in enumerate(weights):
        if w == 0:
            continue
        left, right = train[2 * c].double(), train[2 * c + 1].double()
        part = torch.zeros(r, dtype=torch.float64, device=train[0].device)
        for t0 in range(0, test[0].shape[0], step):
            pairs = _pair_block(test[2 * c][t0 : t0 + step], left).mul_(
                _pair_block(test[2 * c + 1][t0 : t0 + step], right)
            )
            if test_scales is not None:
                pairs *= test_scales[c // run][t0 : t0 + step, None]
            part += pairs.sum(0)
        if train_scales is not None:
            part *= train_scales[c // run]
        total += w * part
    return total


def _pair_block(test: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """float64 (t, r) products of float32 test rows (t, d) and float64 train rows (r, d)."""
    return test.double() @ train.T


def _fold_weights(
    blocks: list[torch.Tensor],
    factored: bool,
    weights: Sequence[float],
    in_place: Sequence[bool],
    cosine: bool = False,
) -> tuple[list[float], torch.Tensor | None, dict[int, torch.Tensor] | None, torch.Tensor | None]:
    """The weights put on the test side's float32 blocks (a factored set's left factors) as the C++
    kernel packs them (csrc/src/engine.cpp, PackedTest): e_r is 0 unless row r's largest |w_c x value|
    is below 2^-96 (e_r brings it to [2^-96, 2^-95)), for cosine scores (blocks of unit rows) below
    2^-32 (to [2^-32, 2^-31): products with train rows of norm down to 2^-64, which _unit_scaled leaves
    as they are, stay in float32's normal range), or at least 2^127 (to [2^100, 2^101)); a
    non-finite row keeps e_r = 0, and so does a row of e_r > 0 where dividing by 2^e_r would round a
    value that is a normal float32 at e_r = 0 (|float32(w_c x value)| >= 2^-126, any checkpoint) by
    more than 2^-20 of itself: |float32(x 2^-e_r) 2^e_r - x| > 2^-20 |x|, x = w_c x value in float64
    (a value that becomes 0 always is; one that stays exact as a subnormal, 2^-100 lowered to 2^-130,
    or loses bits within 2^-20, is no obstacle) (a row spanning more than about 2^230:
    _lowering_loses_values, the C++ kernel's ShiftLosesBits, which gathers only those rare rows, never
    copying a block used in place, and runs torch.nonzero, a wait on CUDA, only when some row is
    lowered): such a row overflows, and the call is the overflow error rather than scores missing the
    row's small checkpoints (aggregate of factored gradients then sums in float64 instead, as the C++
    kernel: _exact_factored_sums). Where every e_r is 0 and every |w_c| in [2^-24, 2) the blocks stay
    as they are and the GEMMs take the weights (returns (weights, None, None, overflowing): no copy; a dot product of
    such rows exceeds float32 only for weighted scores beyond about 2^104, and falls below float32's normal
    range only where the weighted score nearly does too: under a weight of 2 or more, a raw dot product
    rounded as a subnormal, then multiplied by w, would miss the bound of a normal weighted score).
    Otherwise the rows r of each block of nonzero weight are multiplied by 2^(k_c - e_r), k_c the binary
    exponent of w_c, which is
    exact but where the product is below float32's normal range (rounded once, as the C++ kernel rounds
    w_c x value: a checkpoint far below the row's largest loses bits, or packs as 0 at or below 2^-150,
    README "Numerical contract"), and the GEMMs take w_c / 2^k_c: returns those, e_r (int64, None when
    all are 0), by which _product multiplies each score row back, the shifts k_c - e_r of the blocks
    that are the caller's rows (in_place[b]; None: none), which _product applies to a copy of one score
    block's rows at a time, so that a test set used in place is never copied whole (other blocks,
    uploaded copies, are replaced by their shifted copies, one at a time), and `overflowing`: the int64
    rows kept at e_r = 0 whose float32(w_c x value) is infinite (None: none), where the C++ kernel's
    packing fails (the call's overflow error, naming no pair for their pass: _Call.first_overflow)."""
    per = 2 if factored else 1
    rows = blocks[0].shape[0]
    device = blocks[0].device
    exps = [math.frexp(w)[1] - 1 if w != 0 else 0 for w in weights]  # |w_c| in [2^k_c, 2^(k_c + 1))
    largest = torch.full((rows,), _NO_EXPONENT, dtype=torch.int64, device=device)
    finite = torch.ones(rows, dtype=torch.bool, device=device)
    for c, w in enumerate(weights):
        block = blocks[c * per]
        if block.shape[1] == 0:
            continue
        low, high = torch.aminmax(block, dim=1)  # no |block| copy of a test side used in place
        top = torch.maximum(-low, high).double()  # NaN where the row holds one
        finite &= torch.isfinite(top)
        if w == 0:
            continue
        mantissa, exponent = torch.frexp(top)  # top = mantissa 2^exponent, mantissa in [0.5, 1)
        product = mantissa * abs(math.frexp(w)[0])  # |w| top = product 2^(exponent + k_c + 1), in [0.25, 1)
        floor = exponent.long() + exps[c] + torch.where(product >= 0.5, 0, -1)  # floor(log2 |w| top)
        largest = torch.maximum(largest, torch.where(top > 0, floor, _NO_EXPONENT))
    floor = _COSINE_FLOOR if cosine else -96
    shift = torch.where(largest < floor, largest - floor, torch.where(largest >= 127, largest - 100, 0))
    shift = torch.where(finite & (largest > _NO_EXPONENT), shift, 0)
    overflowing = None
    if bool((shift > 0).any()):  # rare: rows whose weighted values overflow (torch.nonzero, a wait, only then)
        lowered = torch.nonzero(shift > 0).flatten()
        weighted = [blocks[c * per] for c in range(len(weights))]
        kept, infinite = _lowering_loses_values(weighted, weights, lowered, shift[lowered])
        shift[lowered[kept]] = 0  # packed unshifted: the row overflows, reported as such
        overflowing = lowered[kept & infinite] if bool((kept & infinite).any()) else None
    if all(-24 <= k <= 0 for k in exps) and not bool(shift.any()):
        return list(weights), None, None, overflowing
    later = {}
    for c, (w, k) in enumerate(zip(weights, exps, strict=True)):
        if w == 0:  # a block of weight 0 is not used (_add_checkpoint)
            continue
        if in_place[c * per]:
            later[c * per] = k - shift
        else:
            blocks[c * per] = _shifted(blocks[c * per], k - shift)
    alphas = [math.ldexp(w, -k) for w, k in zip(weights, exps, strict=True)]
    return alphas, shift if bool(shift.any()) else None, later or None, overflowing


def _lowering_loses_values(
    blocks: list[torch.Tensor], weights: Sequence[float], rows: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (len(rows),) each: whether packing row rows[j] of the weighted blocks (one per checkpoint,
    weights[c]) divided by 2^shift[j] (> 0) would round a value that is a normal float32 when packed
    undivided (|float32(w_c x value)| in [2^-126, FLT_MAX]) by more than 2^-20 of itself:
    |float32(x 2^-shift[j]) 2^shift[j] - x| > 2^-20 |x| with x = w_c x value in float64, in any
    checkpoint (the C++ kernel's PackedTest::ShiftLosesBits: the same float64 products rounded to
    float32, the same float64 comparison, exact near the threshold; a value that becomes 0 always is,
    one exact as a subnormal never). 2^-20 because a slot whose packed values carry relative errors up
    to r moves a score by at most r times that slot's part of the contract's bound (1e-5 sum_c |w_c|
    |g_c(t)| |g_c(i)|, by Cauchy-Schwarz); 2^-20 ~ 0.95e-6 leaves 9e-6 of it to float32's rounding
    of the products and sums, as for any other row,
    and whether the row packed undivided holds an infinite float32(w_c x value) (where the C++ kernel's
    packing reports the overflow, naming no pair). Only those rows are read (gathered in slices of at
    most _NORM_SLICE values), never a block whole."""
    half = torch.div(shift, 2, rounding_mode="floor")  # two exact steps: 2^-shift may be below float64's range
    steps = (_power_of_two(-half, torch.float64), _power_of_two(half - shift, torch.float64))
    ups = (_power_of_two(half, torch.float64), _power_of_two(shift - half, torch.float64))
    loses = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    infinite = torch.zeros_like(loses)
    for block, w in zip(blocks, weights, strict=True):
        if w == 0 or block.shape[1] == 0:  # packed as zeros either way
            continue
        lowered = (w * steps[0]) * steps[1]  # ldexp(w, -shift), per row
        step = max(1, _NORM_SLICE // block.shape[1])
        for j in range(0, rows.numel(), step):
            values = block.index_select(0, rows[j : j + step]).double()
            exact = values * w  # x, what the packing rounds to float32
            plain = exact.float()
            after = (values * lowered[j : j + step, None]).float().double()
            back = (after * ups[0][j : j + step, None]) * ups[1][j : j + step, None]  # after x 2^shift, exact
            normal = (plain.abs() >= _FLT_MIN) & torch.isfinite(plain)
            off = (back - exact).abs() > exact.abs() * _LOWERING_ERROR  # 2^-20 |x|: exact
            loses[j : j + step] |= (normal & off).any(1)
            infinite[j : j + step] |= torch.isinf(plain).any(1)
    return loses, infinite


_FLT_MIN = 2.0**-126  # float32's smallest normal value
_LOWERING_ERROR = 2.0**-20  # the largest relative rounding a lowered row may give a value (_lowering_loses_values)
_ALIGNMENT = 128  # float32 values in 512 bytes (_shifted)

_NO_EXPONENT = -(2**40)
"""_fold_weights: the exponent of a row with no nonzero weighted value."""
_COSINE_FLOOR = -32
"""_fold_weights: cosine scores lift rows whose largest weighted value is below 2^_COSINE_FLOOR (as the C++ kernel)."""


def _shifted(block: torch.Tensor, shift: torch.Tensor, first: int | None = None) -> torch.Tensor:
    """A float32 copy of `block` with row i multiplied by 2^shift[i] in float64 (exact) and rounded once,
    over slices of rows (at most _NORM_SLICE values each). first: the block holds rows first: of a
    larger one, and the copy starts where those rows would in a copy of that (modulo 512 bytes, the
    CUDA allocator's alignment; torch's CPU GEMMs round differently at other alignments), so that
    scores are the same bits as from a copy of the whole block."""
    # below 2^-1022 a float32 value times the factor rounds to 0 either way
    factor = _power_of_two(shift.clamp(-1022, 1023), torch.float64)[:, None]
    if first is None:
        out = torch.empty_like(block)
    else:
        offset = first * block.shape[1] % _ALIGNMENT
        flat = torch.empty(block.numel() + _ALIGNMENT, dtype=block.dtype, device=block.device)
        out = flat[offset : offset + block.numel()].view(block.shape)
    step = max(1, _NORM_SLICE // max(block.shape[1], 1))
    for r in range(0, block.shape[0], step):
        out[r : r + step] = block[r : r + step].double().mul_(factor[r : r + step])
    return out


def _non_finite_message(test: KernelSide | None, train: KernelSide | None) -> str:
    """The C++ kernel's message for the first block holding NaN or Inf, naming its first rows."""
    for what, side in (("test", test), ("train", train)):
        if side is None:
            continue
        for b, (block, code) in enumerate(zip(side.blocks, side.dtypes, strict=True)):
            tensor = rows.host_tensor(block, code) if rows.on_host(block) else block
            bad = torch.nonzero(~torch.isfinite(tensor).all(dim=1)).flatten()[:5].tolist()
            if bad:
                return non_finite_message(what, side.factored, b, bad)
    return "NaN or Inf values in the input"


_PRECISION_LOCK = threading.RLock()
"""Held by each backend call on a CUDA device (one pair of the generic loop, not a whole public call)
while it runs (_matmul_precision): the float32 matmul precision it sets is torch's one process-wide
setting, so a call in another thread (a threaded Dask worker, a precision="tf32" call beside a float32
one) waits instead of running its GEMMs at the other's precision. Module state only to guard torch's
own global; re-entrant for nested calls."""


@contextlib.contextmanager
def _device_scope(device: torch.device, tf32: bool) -> Iterator[None]:
    """A caller's torch.autocast is off (it would run torch.mm in float16 / bfloat16); on a CUDA device:
    it is the current device, and float32 GEMMs use TF32 or not as asked (_matmul_precision)."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        with _matmul_precision(tf32), torch.cuda.device(device):
            yield


@contextlib.contextmanager
def _matmul_precision(tf32: bool) -> Iterator[None]:
    """torch's float32 matmul precision on CUDA set to TF32 or full float32 for the block, under
    _PRECISION_LOCK, and put back after. The setting is process-wide: while the block runs, the CUDA
    matmuls of every thread (not only tracin's) use it. torch >= 2.9 keeps two views of it: the legacy
    value (get/set_float32_matmul_precision, matmul.allow_tf32) and matmul.fp32_precision ("none":
    inherited, from torch.backends.fp32_precision for one). cuBLAS and cuBLASLt (allowTF32CuBLAS)
    raise "mix of the legacy and new APIs" where the two disagree on TF32, so inside the block both
    read the wanted value: where either does not already, matmul.allow_tf32 (which sets both) or
    matmul.fp32_precision alone is set. Nothing else is: mkldnn's (CPU) settings are left alone, so
    get_float32_matmul_precision() may still raise inside where the user's mkldnn setting disagrees.
    After, both read as before; matmul.fp32_precision is put back as "none" where it read what it
    inherits, so an explicit value equal to the inherited one becomes inherited. A legacy "medium" is
    put back with set_float32_matmul_precision, which writes mkldnn's matmul setting as well (the
    same value where the user set "medium" through it): that one is then put back by the same rule.
    Older torch: the legacy functions only."""
    with _PRECISION_LOCK:
        matmul = torch.backends.cuda.matmul
        if not hasattr(matmul, "fp32_precision"):
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(before)
            return
        cuda = matmul.fp32_precision
        try:
            legacy_tf32 = matmul.allow_tf32  # the legacy value's view of TF32
        except RuntimeError:  # it disagrees with cuda's matmul setting
            legacy_tf32 = cuda != "tf32"
        if legacy_tf32 == tf32 and (cuda == "tf32") == tf32:
            yield
            return
        legacy = _legacy_allowing_tf32() if legacy_tf32 and not tf32 else None
        cuda_parent = _inherited_by_cuda_matmul()
        if legacy_tf32 != tf32:
            matmul.allow_tf32 = tf32  # the legacy value and cuda's matmul setting
        else:
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            if legacy == "medium":
                mkldnn = torch.backends.mkldnn.matmul.fp32_precision
                torch.set_float32_matmul_precision("medium")
                torch.backends.mkldnn.matmul.fp32_precision = _own(mkldnn, torch.backends.mkldnn.fp32_precision)
            elif legacy_tf32 != tf32:
                matmul.allow_tf32 = legacy_tf32
            matmul.fp32_precision = _own(cuda, cuda_parent)


def _legacy_allowing_tf32() -> str:
    """The legacy value where it allows TF32: "high" or "medium". get_float32_matmul_precision() raises
    where mkldnn's matmul setting disagrees with it: "bf16" disagrees with "high" only, "tf32" with
    "medium" only."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "high" if torch.backends.mkldnn.matmul.fp32_precision == "bf16" else "medium"


def _inherited_by_cuda_matmul() -> str | None:
    """What cuda's matmul fp32_precision reads at "none": cuda's "all" (no public getter; None where
    torch has not this private one)."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    return None if getter is None else getter("cuda", "all")


def _own(read: str, inherited: str | None) -> str:
    """The fp32_precision to put back for one that read `read` and would inherit `inherited`."""
    return "none" if read == inherited else read


def resolve(device: str) -> torch.device:
    """The torch device of "cpu", "cuda" (torch's current GPU, as "cuda:N") or "cuda:N"; ValueError
    naming what is missing for CUDA. The one place "cuda" is resolved (backends.placement uses it too)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: torch {torch.__version__} sees no CUDA device")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def make(device: str) -> TorchBackend:
    """The backend on `device` ("cpu", "cuda" (the current GPU) or "cuda:N"), resolved by `resolve`."""
    return TorchBackend(resolve(device))
