"""GPU scoring benchmark: tracin.top_k(device="cuda") against torch matmul + topk on the whole score
matrix and faiss IndexFlatIP (GPU), with the machine's limits measured in the same run.

    python -m benchmarks.gpu [--device cuda] [--quick] [--repeats 5] [--out DIR]

Problem: m test rows, n train rows, d columns, one checkpoint, float32 (default m=1000, n=1,000,000,
d=512; --quick: m=64, n=20,000, d=64). Train rows on the device (torch tensors, used in place), and
the same rows in a GradientStore on the host, streamed to the device in pinned double-buffered tiles.
Limits: cuBLAS sgemm throughput of the same (m x d) @ (d x n) product, and pinned host-to-device
copy bandwidth. Goals (issue 14): device-resident >= 80% of that sgemm throughput, host-streamed
>= 80% of the store's bytes over the copy bandwidth, k=1000 <= 1.3x k=10.
`--device cpu` runs the same script on the torch backend on the CPU ("torch:cpu") as a smoke test;
its figures say nothing about a GPU. Writes results/gpu.json (gpu_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import tracin
from tracin import _tunables

from .common import RESULTS_DIR, time_interleaved, write_json

FULL = {"m": 1000, "n": 1_000_000, "d": 512}
QUICK = {"m": 64, "n": 20_000, "d": 64}
GOALS = {
    "device_resident_fraction_of_sgemm": 0.8,
    "host_streamed_fraction_of_h2d_bound": 0.8,
    "k1000_over_k10_at_most": 1.3,
}
STORE_BLOCK_ROWS = 65536


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_tflops(test: torch.Tensor, train: torch.Tensor, repeats: int) -> dict:
    """Best TFLOP/s of torch.mm(test, train.T) (cuBLAS on a GPU), train cut in column blocks that
    fit in a quarter of the free memory so the product itself is what is timed."""
    device = train.device
    m, n = test.shape[0], train.shape[0]
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 32
    step = max(1, min(n, free // 4 // max(4 * m, 1)))
    best = float("inf")
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        for i0 in range(0, n, step):
            torch.mm(test, train[i0 : i0 + step].T)
        _sync(device)
        if r:  # round 0 warms up
            best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "tflops": 2.0 * m * n * test.shape[1] / best / 1e12}


def h2d_gbs(nbytes: int, device: torch.device, repeats: int) -> float:
    """Best GB/s (1e9 bytes) of copying `nbytes` from pinned host memory to the device."""
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=device.type == "cuda")
    dev = torch.empty_like(host, device=device)
    best = float("inf")
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        _sync(device)
        if r:
            best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def write_store(path: Path, train: np.ndarray) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(path, len(train), [train.shape[1]], overwrite=True)
    for i0 in range(0, len(train), STORE_BLOCK_ROWS):
        writer.write(0, i0, train[i0 : i0 + STORE_BLOCK_ROWS])
    writer.finalize()
    return tracin.GradientStore.open(path)


def _faiss_search(test: np.ndarray, train: np.ndarray, device: torch.device) -> Callable[[int], object] | None:
    """faiss IndexFlatIP search (GPU index on a CUDA device), or None when faiss (GPU) is missing."""
    try:
        import faiss
    except ImportError:
        return None
    if device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            return None
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, train.shape[1])
    else:
        index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    return lambda k: index.search(test, k)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tracin_device = "torch:cpu" if device.type == "cpu" else str(device)
    size = QUICK if args.quick else FULL
    m, n, d = size["m"], size["n"], size["d"]
    rng = np.random.default_rng(0)
    test_host = rng.standard_normal((m, d), dtype=np.float32)
    train_host = rng.standard_normal((n, d), dtype=np.float32)
    test, train = torch.from_numpy(test_host).to(device), torch.from_numpy(train_host).to(device)
    limits = {
        "sgemm": sgemm_tflops(test, train, args.repeats),
        "h2d_gbs": h2d_gbs(min(train_host.nbytes, 1 << 30), device, args.repeats),
    }
    folder = Path(tempfile.mkdtemp(prefix="tracin-gpu-bench-", dir=args.dir))
    try:
        store = write_store(folder / "train", train_host)
        return _measure(args, device, tracin_device, test, train, test_host, train_host, store, limits)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure(args, device, tracin_device, test, train, test_host, train_host, store, limits) -> dict:
    m, n = test.shape[0], train.shape[0]
    on_device = tracin.Gradients(test) if device.type == "cuda" else tracin.Gradients(test_host)
    train_set = tracin.Gradients(train) if device.type == "cuda" else tracin.Gradients(train_host)
    faiss_search = _faiss_search(test_host, train_host, device)
    full_fits = device.type != "cuda" or 3 * 4 * m * n < torch.cuda.mem_get_info(device)[0]

    def torch_full(k: int) -> None:
        torch.topk(test @ train.T, k, dim=1)
        _sync(device)

    cases = []
    for k in (10, 1000):
        if k > n:
            continue
        contenders: dict[str, Callable[[], object]] = {
            "tracin_device_resident": lambda k=k: tracin.top_k(
                on_device, train_set, k, device=tracin_device, progress=False
            ),
            "tracin_host_store_streamed": lambda k=k: tracin.top_k(
                test_host, store, k, device=tracin_device, progress=False
            ),
        }
        if full_fits:
            contenders["torch_matmul_topk_whole_matrix"] = lambda k=k: torch_full(k)
        if faiss_search is not None and (device.type != "cuda" or k <= 2048):
            contenders["faiss_index_flat_ip"] = lambda k=k: faiss_search(k)
        times = time_interleaved(contenders, repeats=args.repeats, pause_s=0.05)
        for t in times.values():
            t["tflops"] = 2.0 * m * n * test.shape[1] / t["median_s"] / 1e12
        cases.append({"k": k, "side": "proponents", "times": times})
    both = time_interleaved(
        {
            "tracin_device_resident_both_sides": lambda: tracin.top_k(
                on_device, train_set, 10, side="both", device=tracin_device, progress=False
            )
        },
        repeats=args.repeats,
        pause_s=0.05,
    )
    cases.append({"k": 10, "side": "both", "times": both})
    return {
        "config": {
            "device": str(device),
            "tracin_device": tracin_device,
            "quick": args.quick,
            "m": m,
            "n": n,
            "d": test.shape[1],
            "dtype": "float32",
            "repeats": args.repeats,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "store_bytes": store.nbytes,
            "store_chunk_bytes": store.chunk_bytes,  # one backend call per chunk: the stream restarts
            "device_tile_bytes": _tunables.DEVICE_TILE_BYTES,  # one upload per tile, overlapped within a chunk
            "faiss": faiss_search is not None,
            "torch_whole_matrix": full_fits,
        },
        "limits": limits,
        "cases": cases,
        "agreement": _agreement(on_device, train_set, tracin_device, test, train) if full_fits else None,
        "goals": _goals(cases, limits, store.nbytes),
    }


def _agreement(on_device, train_set, tracin_device, test, train) -> dict:
    """tracin's top-10 against torch's on the whole matrix: equal indices per row, largest value gap."""
    ours = tracin.top_k(on_device, train_set, 10, device=tracin_device, progress=False)
    values, indices = torch.topk(test @ train.T, 10, dim=1)
    same = (ours.indices == indices.cpu().numpy()).all(1)
    gap = float(np.abs(ours.values - values.cpu().numpy()).max(initial=0.0))
    scale = float(torch.linalg.norm(test, dim=1).max() * torch.linalg.norm(train, dim=1).max())
    return {
        "rows_with_equal_indices": float(same.mean()),
        "max_value_gap": gap,
        "max_value_gap_over_norm_product": gap / scale if scale else 0.0,
    }


def _goals(cases: list[dict], limits: dict, store_bytes: int) -> dict:
    by_k = {c["k"]: c["times"] for c in cases if c["side"] == "proponents"}
    k10 = by_k[10]
    resident = limits["sgemm"]["seconds"] / k10["tracin_device_resident"]["median_s"]
    streamed = store_bytes / (limits["h2d_gbs"] * 1e9) / k10["tracin_host_store_streamed"]["median_s"]
    out = {"device_resident_fraction_of_sgemm": resident, "host_streamed_fraction_of_h2d_bound": streamed}
    if 1000 in by_k:
        out["k1000_over_k10"] = (
            by_k[1000]["tracin_device_resident"]["median_s"] / k10["tracin_device_resident"]["median_s"]
        )
    out["met"] = {
        "device_resident_fraction_of_sgemm": resident >= GOALS["device_resident_fraction_of_sgemm"],
        "host_streamed_fraction_of_h2d_bound": streamed >= GOALS["host_streamed_fraction_of_h2d_bound"],
        **({"k1000_over_k10": out["k1000_over_k10"] <= GOALS["k1000_over_k10_at_most"]} if 1000 in by_k else {}),
    }
    out["targets"] = GOALS
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="'cuda', 'cuda:N' or 'cpu' (smoke test; default cuda)")
    p.add_argument("--quick", action="store_true", help=f"small sizes {QUICK} instead of {FULL}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (default 5)")
    p.add_argument("--dir", default=None, help="where to write the store (default: the system temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output directory (default {RESULTS_DIR})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu: torch {torch.__version__} sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    result = run(args)
    path = write_json("gpu_quick" if args.quick else "gpu", result, args.out)
    for case in result["cases"]:
        for name, t in case["times"].items():
            print(f"k={case['k']:<5} {case['side']:<10} {name:34s} {t['median_s'] * 1e3:9.2f} ms")
    limits = result["limits"]
    print(f"sgemm {limits['sgemm']['tflops']:.2f} TFLOP/s, host-to-device {limits['h2d_gbs']:.1f} GB/s")
    print(
        "goals:",
        {k: round(v, 3) for k, v in result["goals"].items() if isinstance(v, float)},
        "met:",
        result["goals"]["met"],
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
