"""Ways of getting a file's rows from the host's page cache onto the device, each timed alone: the
figures that choose how a store is streamed to a GPU (issue 14: a 2 GB store streamed at 45% of the
pinned host-to-device bound on an H200, where the goal is 80%).

Part of benchmarks/gpu.py's record ("host_paths"). Each path moves a whole file of rows (the
benchmark's train rows, written raw, in the page cache) in pieces of _tunables.DEVICE_TILE_BYTES:

- map_copy: a fresh read-only map of each piece (as a store maps its chunks per call), copied by
  torch into a staging buffer (pinned on a GPU), as the device backend stages rows today;
- map_populated_copy: the same after madvise(MADV_POPULATE_READ) (the map's pages filled in one
  system call, instead of one page fault per page or fault-around block during the copy);
- pread: os.preadv of each piece into the staging buffer (the kernel copies from its cache; no map);
- pread_threads: the same with PREAD_THREADS threads, each reading a slice of the piece;
- map_copy_then_upload, pread_threads_then_upload (CUDA only): the path above into two staging
  buffers in turn, each uploaded on a side stream while the next is filled (the pipeline of the
  device backend without its GEMMs: the best a store can stream through that path);
- registered_upload (CUDA only): each piece's map registered with cudaHostRegister (read-only) and
  uploaded from there, with no staging copy (registration and unregistration included);
- pageable_upload (CUDA only): each piece's map copied to the device straight from pageable memory.

Every piece each path moved is compared with the file's bytes in a last, untimed round, before its
buffer is reused (a path that moves the wrong bytes is recorded as an error). Figures: GB/s (1e9
bytes) of the median and of the fastest of `repeats` timed rounds after one warm-up round.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tracin import _tunables

PREAD_THREADS = 8
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.14 names it
_CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly (CUDA 11.1+)


class _Pieces:
    """The file's pieces: (byte offset, bytes), each a whole number of rows of `row_bytes`."""

    def __init__(self, path: Path, row_bytes: int, piece_bytes: int):
        self.path, self.size = path, path.stat().st_size
        self.piece = max(1, piece_bytes // row_bytes) * row_bytes
        self.spans = [(o, min(self.piece, self.size - o)) for o in range(0, self.size, self.piece)]

    def mapped(self, offset: int, nbytes: int, populate: bool = False) -> tuple[mmap.mmap, torch.Tensor, torch.Tensor]:
        """A fresh read-only map of the bytes [offset, offset + nbytes) (from the page before), and
        uint8 tensors on the whole map and on those bytes."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            m = mmap.mmap(f.fileno(), offset - start + nbytes, access=mmap.ACCESS_READ, offset=start)
        if populate:
            m.madvise(_MADV_POPULATE_READ)
        with warnings.catch_warnings():  # read-only map: nothing here writes it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            whole = torch.from_numpy(np.frombuffer(m, np.uint8))
        return m, whole, whole[offset - start :]


def _pread_into(fd: int, buffer: torch.Tensor, offset: int, threads: ThreadPoolExecutor | None) -> None:
    """Fills the uint8 `buffer` with the file's bytes from `offset` (in slices across `threads`)."""
    view = memoryview(buffer.numpy()).cast("B")

    def read(lo: int, hi: int) -> None:
        done = lo
        while done < hi:
            got = os.preadv(fd, [view[done:hi]], offset + done)
            if got <= 0:
                raise OSError(f"the file ended {offset + done} bytes in")
            done += got

    if threads is None:
        read(0, len(view))
        return
    step = -(-len(view) // PREAD_THREADS // 4096) * 4096
    list(threads.map(lambda lo: read(lo, min(lo + step, len(view))), range(0, len(view), step)))


def _round_trip(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    times = []
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r:  # round 0 warms up
            times.append(time.perf_counter() - t0)
    return times


def measure(path: Path, row_bytes: int, device: torch.device, repeats: int) -> dict:
    """{"piece_bytes", "file_bytes", "paths": {name: {"gbs", "best_gbs", "times_s"} or {"error": ...}}}
    for the raw file of rows at `path` (rows of `row_bytes`), moved to `device` by each path: gbs from
    the median round, best_gbs from the fastest (as the pinned host-to-device bound is measured)."""
    cuda = device.type == "cuda"
    pieces = _Pieces(path, row_bytes, _tunables.DEVICE_TILE_BYTES)
    slots = [torch.empty(pieces.piece, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    dev = [torch.empty(pieces.piece, dtype=torch.uint8, device=device) for _ in range(2)] if cuda else []
    copy_stream = torch.cuda.Stream(device) if cuda else None
    uploaded = [torch.cuda.Event() for _ in range(2)] if cuda else []
    fd = os.open(path, os.O_RDONLY)
    threads = ThreadPoolExecutor(PREAD_THREADS)
    Check = Callable[[int, torch.Tensor], None] | None  # check(j, piece j as moved), before its buffer is reused

    def staged(fill: Callable[[int, int, torch.Tensor], None], upload: bool) -> Callable[[Check], None]:
        """Moves every piece through `fill(offset, bytes, host slot)`, alternating slots; with
        `upload`, each filled slot is uploaded on the side stream while the next is filled."""

        def run(check: Check = None) -> None:
            spans = pieces.spans
            for j, (offset, nbytes) in enumerate(spans):
                slot = j % 2
                if upload:
                    uploaded[slot].synchronize()  # its previous upload has read the host slot
                    if check is not None and j >= 2:
                        check(j - 2, dev[slot][: spans[j - 2][1]])
                fill(offset, nbytes, slots[slot][:nbytes])
                if not upload:
                    if check is not None:
                        check(j, slots[slot][:nbytes])
                    continue
                with torch.cuda.stream(copy_stream):
                    dev[slot][:nbytes].copy_(slots[slot][:nbytes], non_blocking=True)
                    uploaded[slot].record(copy_stream)
            if upload:
                torch.cuda.current_stream(device).wait_stream(copy_stream)
                for j in range(max(0, len(spans) - 2), len(spans)):
                    if check is not None:
                        check(j, dev[j % 2][: spans[j][1]])

        return run

    def map_copy(offset: int, nbytes: int, slot: torch.Tensor, populate: bool = False) -> None:
        m, whole, rows = pieces.mapped(offset, nbytes, populate)
        slot.copy_(rows)
        del whole, rows
        m.close()

    def pread(offset: int, nbytes: int, slot: torch.Tensor, parallel: bool = False) -> None:
        _pread_into(fd, slot, offset, threads if parallel else None)

    def direct(register: bool) -> Callable[[Check], None]:
        def run(check: Check = None) -> None:
            cudart = torch.cuda.cudart()
            for j, (offset, nbytes) in enumerate(pieces.spans):
                slot = j % 2
                m, whole, rows = pieces.mapped(offset, nbytes)
                try:
                    if register:
                        status = cudart.cudaHostRegister(whole.data_ptr(), whole.numel(), _CUDA_HOST_REGISTER_READ_ONLY)
                        if int(status) != 0:
                            raise RuntimeError(f"cudaHostRegister of a read-only map failed: {status}")
                    try:
                        dev[slot][:nbytes].copy_(rows, non_blocking=register)
                        torch.cuda.synchronize(device)  # before the map goes
                    finally:
                        if register:
                            cudart.cudaHostUnregister(whole.data_ptr())
                finally:
                    del whole, rows
                    m.close()
                if check is not None:
                    check(j, dev[slot][:nbytes])

        return run

    def compare(j: int, moved: torch.Tensor) -> None:
        offset, nbytes = pieces.spans[j]
        if not np.array_equal(moved.cpu().numpy(), np.fromfile(path, np.uint8, nbytes, offset=offset)):
            raise AssertionError(f"piece {j} (bytes {offset} to {offset + nbytes}) differs from the file's bytes")

    paths: dict[str, Callable[[Check], None]] = {
        "map_copy": staged(map_copy, False),
        "map_populated_copy": staged(lambda o, b, s: map_copy(o, b, s, populate=True), False),
        "pread": staged(pread, False),
        "pread_threads": staged(lambda o, b, s: pread(o, b, s, parallel=True), False),
    }
    if cuda:
        paths["map_copy_then_upload"] = staged(map_copy, True)
        paths["pread_threads_then_upload"] = staged(lambda o, b, s: pread(o, b, s, parallel=True), True)
        paths["registered_upload"] = direct(register=True)
        paths["pageable_upload"] = direct(register=False)
    results: dict[str, dict] = {}
    try:
        for name, fn in paths.items():
            try:
                times = _round_trip(fn, repeats, device)
                fn(compare)  # untimed: every piece as moved, before its buffer is reused
                results[name] = {
                    "gbs": pieces.size / statistics.median(times) / 1e9,
                    "best_gbs": pieces.size / min(times) / 1e9,
                    "times_s": times,
                }
            except Exception as e:  # noqa: BLE001 - a path that fails is recorded, the others still run
                results[name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        threads.shutdown()
        os.close(fd)
    return {"piece_bytes": pieces.piece, "file_bytes": pieces.size, "pread_threads": PREAD_THREADS, "paths": results}
