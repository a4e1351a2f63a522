"""Tile sizes of the device backends, swept: tracin.top_k on the device at each pair of tile bytes
(train rows per tile: _tunables.DEVICE_RESIDENT_TILE_BYTES for rows on the device, DEVICE_TILE_BYTES
for rows streamed from the host; both set) and DEVICE_TILE_SCORES (scores per block).

    python -m benchmarks.gpu_tiles [--device cuda] [--quick] [--repeats 3] [--out DIR] [--dir DIR]

Problem as benchmarks/gpu.py's (m=1000 test rows, n=1,000,000 train rows, d=512, float32, one
checkpoint; --quick or --device cpu: m=64, n=20,000, d=64 and smaller tiles, with --device cpu on the
torch backend on the CPU, a smoke test whose figures say nothing about a GPU). Three workloads per
pair: top-10 and top-1000 with the train rows on the device, and top-10 with them in a GradientStore
on the host, streamed to the device. All pairs of a workload are timed interleaved (median of
--repeats rounds); each median is also given over the default pair's, where it is among them. The
last result of each pair is checked against an exact (float64) top-k of a sample of test rows
(benchmarks.exactness, tie-aware): one that is wrong is recorded under "errors", exit status 1. Writes
DIR/gpu_tiles.json (--quick or --device cpu: gpu_tiles_quick.json in a new temporary folder, unless
--out says). On an H200 (2026-12-04) 256 MiB tiles with 2^27 scores per block were the fastest of
pairs up to those sizes for all three workloads; probes then found 1 GiB tiles with 2^28 scores
faster for rows on the device (wider GEMMs: _tunables.DEVICE_RESIDENT_TILE_BYTES), and the grid
grew to include them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .common import add_output_options, at_least, output_dir, require_modules, time_interleaved, write_json
from .exactness import SampledReference

if __name__ == "__main__":  # run as a script: a missing module is one line (before the imports below), no traceback
    require_modules("python -m benchmarks.gpu_tiles", ("torch",), "bench")

import torch  # noqa: E402

import tracin  # noqa: E402
from tracin import _tunables  # noqa: E402

from .gpu import FULL, QUICK, _sides, _why, write_store  # noqa: E402

MIB = 2**20
TILE_BYTES = (64 * MIB, 256 * MIB, 1024 * MIB)
TILE_SCORES = (2**25, 2**27, 2**28)
QUICK_TILE_BYTES = (256 * 1024, 1 * MIB)
QUICK_TILE_SCORES = (2**16, 2**20)


def with_tiles(tile_bytes: int, tile_scores: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the tile bytes (resident and streamed alike) and scores per block set (restored after)."""

    def call() -> object:
        names = ("DEVICE_TILE_BYTES", "DEVICE_RESIDENT_TILE_BYTES", "DEVICE_TILE_SCORES")
        saved = [getattr(_tunables, name) for name in names]
        for name, value in zip(names, (tile_bytes, tile_bytes, tile_scores), strict=True):
            setattr(_tunables, name, value)
        try:
            result = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return result
        finally:
            for name, value in zip(names, saved, strict=True):
                setattr(_tunables, name, value)

    return call


def _keeping(last: dict, label: str, fn: Callable[[], object]) -> Callable[[], None]:
    """fn, its result of each call kept as last[label] (for the check after the timing)."""

    def call() -> None:
        last[label] = fn()

    return call


def sweep(args: argparse.Namespace) -> dict:
    """The record: config, per workload each pair's times and check, and errors (see the module
    docstring)."""
    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu"
    size = QUICK if quick else FULL
    tracin_device = "torch:cpu" if device.type == "cpu" else str(device)
    generator = torch.Generator(device).manual_seed(0)
    test = torch.randn(size["m"], size["d"], generator=generator, device=device)
    train = torch.randn(size["n"], size["d"], generator=generator, device=device)
    test_host = test.cpu().numpy()
    on_cpu = device.type == "cpu"
    on_device = tracin.Gradients(test_host if on_cpu else test)
    train_set = tracin.Gradients(train.numpy() if on_cpu else train)
    pairs = [
        (b, s)
        for b in (QUICK_TILE_BYTES if quick else TILE_BYTES)
        for s in (QUICK_TILE_SCORES if quick else TILE_SCORES)
    ]
    resident = (_tunables.DEVICE_RESIDENT_TILE_BYTES, _tunables.DEVICE_TILE_SCORES)
    streamed = (_tunables.DEVICE_TILE_BYTES, _tunables.DEVICE_TILE_SCORES)
    folder = Path(tempfile.mkdtemp(prefix="tracin-gpu-tiles-", dir=args.dir))
    try:
        train_host = train.cpu().numpy()
        store = write_store(folder / "train", train_host)
        reference = SampledReference(test_host, train_host, 1000, ("proponents",))
        workloads: dict[str, Callable[[], object]] = {
            "device_resident_k10": lambda: tracin.top_k(on_device, train_set, 10, device=tracin_device, progress=False),
            "device_resident_k1000": lambda: tracin.top_k(
                on_device, train_set, 1000, device=tracin_device, progress=False
            ),
            "host_store_streamed_k10": lambda: tracin.top_k(test_host, store, 10, device=tracin_device, progress=False),
        }
        results, errors = {}, {}
        for name, fn in workloads.items():
            last: dict[str, object] = {}
            contenders = {f"{b // 1024}KiB_{s}": with_tiles(b, s, fn) for b, s in pairs}
            contenders = {label: _keeping(last, label, tiled) for label, tiled in contenders.items()}
            times = time_interleaved(contenders, repeats=args.repeats, warmup=1, pause_s=0.02)
            default = streamed if name.startswith("host") else resident
            base = times.get(f"{default[0] // 1024}KiB_{default[1]}")
            for label, t in times.items():
                b, s = label.split("_")
                t.update(tile_bytes=int(b[:-3]) * 1024, tile_scores=int(s))
                t["check"] = reference.check(*_sides(last[label])["proponents"])
                if not t["check"]["ok"]:
                    errors[f"{name} {label} check"] = _why(t["check"])
                if base:
                    t["over_default"] = t["median_s"] / base["median_s"]
            results[name] = times
            print(name, {label: round(t["median_s"] * 1e3, 2) for label, t in times.items()}, "ms", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "config": {
            **size,
            "device": str(device),
            "quick": quick,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "repeats": args.repeats,
            "default_tile_bytes": streamed[0],
            "default_resident_tile_bytes": resident[0],
            "default_tile_scores": streamed[1],
            "store_chunk_bytes": store.chunk_bytes,
        },
        "workloads": results,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tiles", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="'cuda', 'cuda:N' or 'cpu' (smoke test at small sizes)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed rounds after a warm-up (default 3)")
    p.add_argument("--dir", default=None, help="where to write the store (default: the system temp dir)")
    add_output_options(p, quick_help="small sizes and tiles (as --device cpu does)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu_tiles: torch {torch.__version__} sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    smoke = args.quick or torch.device(args.device).type == "cpu"
    name = "gpu_tiles_quick" if smoke else "gpu_tiles"
    args.out = output_dir(args.out, smoke, "gpu_tiles")
    record = sweep(args)
    path = write_json(name, record, args.out)
    for part, message in record["errors"].items():
        print(f"FAILED {part}: {message}", file=sys.stderr)
    print(f"wrote {path}")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
