"""Rows of a KernelSide on a torch device, for the torch backend.

Blocks already on the device (tensors there; CPU tensors on a CPU device) are used in place.
Other blocks (NumPy views, memory-mapped store chunks, bfloat16 as uint16 bits, CPU tensors for a
GPU) are copied in tiles: on a CUDA device through two pinned staging buffers, each copied to one
of two device buffers on a side stream, so that the copy of tile j + 1 overlaps the compute on
tile j, and the copy of the next train piece's first tile overlaps the compute on this piece's last
(TrainStream, kept for a whole public call); on a CPU device through two host buffers (one copy
of each tile) without streams.
Everything reaches the compute as float32 (float16 / bfloat16 widen exactly on the device).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..gradients import KernelSide, block_name

_BFLOAT16 = 2  # tracin._arrays.DTYPE_CODES["bfloat16"]
_HOST_DTYPES = {0: torch.float32, 1: torch.float16, _BFLOAT16: torch.bfloat16}


def on_host(block: Any) -> bool:
    """Whether a block is in host memory (a NumPy array or a CPU tensor)."""
    return str(getattr(block, "device", "cpu")) == "cpu"


def resident(block: Any, device: torch.device) -> bool:
    """Whether a block is a tensor on `device` already (used in place; CPU tensors on "torch:cpu")."""
    return isinstance(block, torch.Tensor) and block.device == device


def host_tensor(block: Any, code: int) -> torch.Tensor:
    """A CPU tensor sharing a host block's memory (uint16 bfloat16 bits as torch.bfloat16)."""
    if isinstance(block, torch.Tensor):
        return block
    with warnings.catch_warnings():  # read-only store maps: torch warns, but nothing here writes them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(block.view(np.int16) if code == _BFLOAT16 else block)
    return tensor.view(torch.bfloat16) if code == _BFLOAT16 else tensor


def check_device(side: KernelSide, what: str, device: torch.device) -> None:
    """ValueError if a device-resident block of the side is on another device than `device`."""
    for b, block in enumerate(side.blocks):
        if not on_host(block) and block.device != device:
            raise ValueError(
                f"{what} {block_name(side.factored, b)} is on {block.device} but scoring runs on {device}; "
                f"pass device={str(block.device)!r} or move the rows"
            )


def whole(side: KernelSide, device: torch.device) -> list[torch.Tensor]:
    """Every block of the side as float32 on the device (for the test side, which stays there)."""
    return [host_tensor(b, code).to(device).float() for b, code in zip(side.blocks, side.dtypes, strict=True)]


def all_resident(side: KernelSide, device: torch.device) -> bool:
    """Whether every block of the side is a tensor on `device` (no block is staged from the host)."""
    return all(resident(block, device) for block in side.blocks)


def tile_rows(side: KernelSide, tile_bytes: int) -> int:
    """Train rows per tile: `tile_bytes` of rows as stored on the host, at least one."""
    row_bytes = sum(b.shape[1] * (4 if code == 0 else 2) for b, code in zip(side.blocks, side.dtypes, strict=True))
    return max(1, tile_bytes // max(row_bytes, 1))


class _Staging:
    """Two slots, each a host buffer (pinned on CUDA) and a device buffer per host block of a layout,
    with the CUDA events that order their reuse. On a CPU device a slot's host buffers are its device
    buffers and the events are absent: each step is done when the call returns."""

    def __init__(self, layout: tuple, rows: int, device: torch.device):
        self.layout, self.rows = layout, rows  # layout: (block index, columns, host dtype code) per host block
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.compute_stream = torch.cuda.current_stream(device) if self.cuda else None
        self.host, self.dev, self.copied, self.consumed = [], [], [], []
        for _ in range(2):
            shapes = [(rows, columns, _HOST_DTYPES[code]) for _, columns, code in layout]
            # device="cpu": host memory whatever torch.set_default_device says
            self.host.append([torch.empty(r, c, dtype=t, device="cpu", pin_memory=self.cuda) for r, c, t in shapes])
            # on a CPU device the host buffers are the device's: one copy of each tile, not two
            dev = [torch.empty(r, c, dtype=t, device=device) for r, c, t in shapes] if self.cuda else self.host[-1]
            self.dev.append(dev)
            self.copied.append(torch.cuda.Event() if self.cuda else None)
            self.consumed.append(torch.cuda.Event() if self.cuda else None)
        if self.cuda:
            for slot in self.dev:
                for buffer in slot:
                    buffer.record_stream(self.copy_stream)  # written there, freed on the compute stream
            # The allocator may hand out memory that work already enqueued on the compute stream still
            # reads (freed there, stream-ordered): the first uploads must not overwrite it before then.
            self.copy_stream.wait_stream(self.compute_stream)

    def fill(self, slot: int, pieces: list[torch.Tensor]) -> None:
        """Copies host pieces (rows of the host blocks) into the slot's host buffers (after the slot's
        previous upload has read them), then uploads them on the side stream (after the compute on
        the slot's previous tile has read the device buffers)."""
        rows = pieces[0].shape[0] if pieces else 0
        if self.cuda:
            self.copied[slot].synchronize()
        for buffer, piece in zip(self.host[slot], pieces, strict=True):
            buffer[:rows].copy_(piece)
        if not self.cuda:
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.consumed[slot])
            for dev, buffer in zip(self.dev[slot], self.host[slot], strict=True):
                dev[:rows].copy_(buffer[:rows], non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def take(self, slot: int, rows: int) -> list[torch.Tensor]:
        """The slot's device buffers (first `rows` rows), once their upload is done (on the compute stream)."""
        if self.cuda:
            self.compute_stream.wait_event(self.copied[slot])
        return [dev[:rows] for dev in self.dev[slot]]

    def release(self, slot: int) -> None:
        """Marks the compute enqueued so far as the last reader of the slot's device buffers."""
        if self.cuda:
            self.consumed[slot].record(self.compute_stream)


def _layout(side: KernelSide, device: torch.device) -> tuple:
    """(block index, columns, dtype code) of each block of the side that is not on the device."""
    return tuple(
        (b, block.shape[1], code)
        for b, (block, code) in enumerate(zip(side.blocks, side.dtypes, strict=True))
        if not resident(block, device)
    )


class TrainStream:
    """Train tiles of one public call's train pieces, staged through one pair of slots.

    Kept in the generic loop's ChunkCache for the whole call (a fresh one per backend call without a
    cache): the pinned and device buffers are allocated once per call, not per piece, and the slots
    alternate across pieces, so that the first tile of the loop's next piece (`following`) is staged
    during the current piece's call (see tiles): its upload overlaps that piece's last compute and
    the host's work between the two backend calls, as the tiles of one piece overlap each other.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.staging: _Staging | None = None
        self.turn = 0  # the slot the next upload goes to
        self.ahead: tuple[KernelSide, int, _Staging, int] | None = None  # (piece, tile rows, staging, slot)

    def tiles(
        self, side: KernelSide, rows: int, following: KernelSide | None = None, reads_back: bool = False
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(first row, end row, float32 blocks on the device) for consecutive tiles of `rows` rows.

        Tile j + 1 is copied to its staging buffer and its upload enqueued before tile j is handed
        out, so that the upload overlaps the caller's work on tile j even when that work waits for
        the device (scores read back per block). The first tile of `following` is staged once the
        caller asks for the tile after the last (its work on the last tile enqueued): the host copies
        it while the device computes the last tile, before the caller's call ends by waiting for the
        device (a store's pieces are one tile each: staged before it, the copy and that tile's GEMM ran
        one after the other; a 2 GB store at top-10 on an H200 took 103 ms, 86 since); for a caller
        that `reads_back` (waits for the device on each tile), before the last tile is handed out, so
        that its upload overlaps that wait. The caller must enqueue all its work on a tile before
        asking for the next one: the device buffers of tile j are refilled once that work is done.
        """
        n, device = side.blocks[0].shape[0], self.device
        layout = _layout(side, device)
        ahead, self.ahead = self.ahead, None
        if not layout or n == 0:
            for i0 in range(0, n, rows):
                yield i0, min(i0 + rows, n), [block[i0 : i0 + rows].float() for block in side.blocks]
            return
        staging = self._staging(layout, min(rows, n))
        if ahead is not None and ahead[0] is side and ahead[1] == rows and ahead[2] is staging:
            slot = ahead[3]  # uploaded during the previous piece
        else:
            slot = self._upload(side, layout, 0, rows)
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            staged = iter(staging.take(slot, i1 - i0))
            if i1 < n:
                upcoming = self._upload(side, layout, i1, rows)
            elif following is not None and reads_back:
                self._upload_ahead(following, rows)
            try:
                yield i0, i1, [b[i0:i1].float() if resident(b, device) else next(staged).float() for b in side.blocks]
            finally:
                staging.release(slot)
            if i1 < n:
                slot = upcoming
            elif following is not None and not reads_back:
                self._upload_ahead(following, rows)

    def _staging(self, layout: tuple, rows: int) -> _Staging:
        """The call's staging slots, made anew only for another layout or more rows than they hold."""
        if self.staging is None or self.staging.layout != layout or self.staging.rows < rows:
            self.staging, self.turn = _Staging(layout, rows, self.device), 0
        return self.staging

    def _upload(self, side: KernelSide, layout: tuple, i0: int, rows: int) -> int:
        """Stages rows [i0, i0 + rows) of the side's host blocks in the next slot; returns the slot."""
        slot, self.turn = self.turn, 1 - self.turn
        i1 = min(i0 + rows, side.blocks[0].shape[0])
        self.staging.fill(slot, [host_tensor(side.blocks[b][i0:i1], code) for b, _, code in layout])
        return slot

    def _upload_ahead(self, side: KernelSide, rows: int) -> None:
        """Uploads the first tile of the next piece when it fits the current slots."""
        n = side.blocks[0].shape[0]
        layout = _layout(side, self.device)
        if n and layout == self.staging.layout and min(rows, n) <= self.staging.rows:
            self.ahead = (side, rows, self.staging, self._upload(side, layout, 0, rows))
