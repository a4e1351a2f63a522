"""GPU scoring benchmark: tracin.top_k(device="cuda") against torch matmul + topk on the whole score
matrix and faiss IndexFlatIP (GPU), with the machine's limits measured in the same run.

    python -m benchmarks.gpu [--device cuda] [--quick] [--repeats 5] [--out DIR]

Problem: m test rows, n train rows, d columns, one checkpoint, float32 (default m=1000, n=1,000,000,
d=512; --quick: m=64, n=20,000, d=64). Train rows on the device (torch tensors, used in place), and
the same rows in a GradientStore on the host, streamed to the device in pinned double-buffered tiles.
Limits: cuBLAS sgemm throughput of the same (m x d) @ (d x n) product, and pinned host-to-device
copy bandwidth. Goals (issue 14): device-resident >= 80% of that sgemm throughput, host-streamed
>= 80% of the store's bytes over the copy bandwidth, k=1000 <= 1.3x k=10. Also timed: an export
(tracin.torch.export_gradients of an MLP, modes "factored" and "full") on the device and on the CPU,
measured first. Every timed contender's last result (each k, each side) is checked against the exact
(float64) top-k of 32 sampled test rows (benchmarks.exactness, tie-aware): a wrong one is recorded
under "errors" and the goals it bears on are left None.
`--device cpu` runs the same script at the --quick sizes on the torch backend on the CPU
("torch:cpu") as a smoke test; its figures say nothing about a GPU. Writes results/gpu.json
(--quick or --device cpu: gpu_quick.json in a new temporary folder, unless --out says). A part that
fails (out of memory, a peer that breaks) is recorded under "errors" and the other parts still run
and are written; the exit status is then 1.
The record is rewritten after each part ("complete": false until the end), so a run stopped at a time
limit leaves what it measured. Last, "host_paths": the ways of moving the same rows, written raw to a
file, from the page cache to the device, each alone (benchmarks/gpu_host_paths.py): what bounds the
streamed store.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .common import RESULTS_DIR, at_least, output_dir, require_modules, time_interleaved, write_json
from .exactness import SampledReference

if __name__ == "__main__":  # run as a script: a missing module is one line (before the imports below), no traceback
    require_modules("python -m benchmarks.gpu", ("torch",), "bench")

import torch  # noqa: E402

import tracin  # noqa: E402
from tracin import _tunables  # noqa: E402

from . import gpu_host_paths  # noqa: E402

FULL = {"m": 1000, "n": 1_000_000, "d": 512}
QUICK = {"m": 64, "n": 20_000, "d": 64}
EXPORT_FULL = {"examples": 2048, "hidden": 256}  # MLP 784-hidden-hidden-10, 2 checkpoints
EXPORT_QUICK = {"examples": 64, "hidden": 16}
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


def whole_matrix_top_k(test: torch.Tensor, train: torch.Tensor, k: int) -> object:
    """The peer: torch.topk over the whole (m, n) score matrix, waited for; its (values, indices)."""
    result = torch.topk(test @ train.T, k, dim=1)
    _sync(train.device)
    return result


def write_store(path: Path, train: np.ndarray) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(path, len(train), [train.shape[1]], overwrite=True)
    for i0 in range(0, len(train), STORE_BLOCK_ROWS):
        writer.write(0, i0, train[i0 : i0 + STORE_BLOCK_ROWS])
    writer.finalize()
    return tracin.GradientStore.open(path)


def _faiss_search(test: np.ndarray, train: np.ndarray, device: torch.device) -> Callable[[int], object] | str:
    """faiss IndexFlatIP search (GPU index on a CUDA device), or why faiss is left out (a string)."""
    try:
        import faiss
    except ImportError:
        return "faiss is not installed (pip install faiss-cpu, or faiss-gpu for the GPU index)"
    if device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            return "the installed faiss has no GPU support (pip install faiss-gpu)"
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, train.shape[1])
    else:
        index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    return lambda k: index.search(test, k)


class Errors(dict):
    """What failed, by part name: "ExceptionType: message"."""

    def guard(self, part: str, fn: Callable[[], object], device: torch.device) -> object | None:
        """fn()'s result, or None with the failure recorded (and the device's cached memory freed),
        so that one failing part does not cost the others."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any failure of a part is recorded, the run goes on
            self[part] = f"{type(e).__name__}: {e}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None


def run(args: argparse.Namespace, save: Callable[[dict], object]) -> dict:
    """The whole record; `save` is given the record so far after each part."""
    device = torch.device(args.device)
    tracin_device = "torch:cpu" if device.type == "cpu" else str(device)
    quick = args.quick or device.type == "cpu"
    size = QUICK if quick else FULL
    m, n, d = size["m"], size["n"], size["d"]
    errors = Errors()
    generator = torch.Generator(device).manual_seed(0)  # on the device: seconds fewer than NumPy's 2 GB
    test = torch.randn(m, d, generator=generator, device=device)
    train = torch.randn(n, d, generator=generator, device=device)
    test_host, train_host = test.cpu().numpy(), train.cpu().numpy()
    limits = {
        "sgemm": errors.guard("limits.sgemm", lambda: sgemm_tflops(test, train, args.repeats), device),
        "h2d_gbs": errors.guard(
            "limits.h2d_gbs", lambda: h2d_gbs(min(train_host.nbytes, 1 << 30), device, args.repeats), device
        ),
    }

    export: dict = {}

    def partial(cases: list[dict]) -> None:
        save(
            {
                "config": {**size, "device": str(device), "quick": quick},
                "limits": limits,
                "export": export,
                "cases": cases,
                "errors": dict(errors),
                "complete": False,
            }
        )

    partial([])
    # first, so that a run stopped at a time limit has it: the store and the scoring take the most time
    sizes = EXPORT_QUICK if quick else EXPORT_FULL
    devices = [str(device), "cpu"] if device.type == "cuda" else ["cpu"]
    export.update(sizes, checkpoints=2, devices={})
    for dev in devices:
        export["devices"][dev] = errors.guard(f"export.{dev}", lambda dev=dev: export_seconds(dev, **sizes), device)
        partial([])
    folder = Path(tempfile.mkdtemp(prefix="tracin-gpu-bench-", dir=args.dir))
    try:
        store = write_store(folder / "train", train_host)
        result = _measure(
            args, device, tracin_device, test, train, test_host, train_host, store, limits, errors, partial
        )
        save({**result, "export": export, "errors": dict(errors), "complete": False})
        result["host_paths"] = errors.guard(
            "host_paths", lambda: host_paths(folder / "rows.bin", train_host, device, args.repeats, errors), device
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["export"] = export
    result["config"]["quick"] = quick
    result["errors"] = dict(errors)
    result["complete"] = True
    save(result)
    return result


def host_paths(path: Path, train_host: np.ndarray, device: torch.device, repeats: int, errors: Errors) -> dict:
    """gpu_host_paths.measure on the train rows written raw to `path` (in the page cache); a path that
    failed or moved the wrong bytes is also recorded in `errors` (as "host_paths.NAME": exit status 1)."""
    train_host.tofile(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # written back: no disk writes while the paths are timed (the pages stay cached)
    record = gpu_host_paths.measure(path, train_host.shape[1] * train_host.itemsize, device, repeats)
    errors.update({f"host_paths.{name}": p["error"] for name, p in record["paths"].items() if "error" in p})
    return record


def export_seconds(device: str, examples: int, hidden: int) -> dict:
    """Seconds of tracin.torch.export_gradients of an MLP 784-hidden-hidden-10 with 2 checkpoints on
    `device`, per mode, after a warm-up export of a quarter of the examples."""
    from torch import nn

    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )
    checkpoints = [(copy.deepcopy(model.state_dict()), 0.1), (copy.deepcopy(model.state_dict()), 0.01)]
    data = (torch.randn(examples, 784), torch.randint(0, 10, (examples,)))
    loss = nn.CrossEntropyLoss(reduction="none")
    model = model.to(device)
    out = {}
    for mode in ("factored", "full"):
        warm = (data[0][: max(1, examples // 4)], data[1][: max(1, examples // 4)])
        export_gradients(model, checkpoints, warm, loss, mode=mode, progress=False)
        _sync(torch.device(device))
        start = time.perf_counter()
        export_gradients(model, checkpoints, data, loss, mode=mode, progress=False)
        _sync(torch.device(device))
        seconds = time.perf_counter() - start
        out[mode] = {"seconds": seconds, "examples_x_checkpoints_per_s": 2 * examples / seconds}
    return out


def _measure(args, device, tracin_device, test, train, test_host, train_host, store, limits, errors, partial) -> dict:
    m, n = test.shape[0], train.shape[0]
    on_device = tracin.Gradients(test) if device.type == "cuda" else tracin.Gradients(test_host)
    train_set = tracin.Gradients(train) if device.type == "cuda" else tracin.Gradients(train_host)
    faiss_search = errors.guard("faiss", lambda: _faiss_search(test_host, train_host, device), device)
    faiss_left_out = faiss_search if isinstance(faiss_search, str) else None
    if faiss_left_out is not None:
        faiss_search = None
        print(f"faiss_index_flat_ip not timed: {faiss_left_out}", file=sys.stderr, flush=True)
    full_fits = device.type != "cuda" or 3 * 4 * m * n < torch.cuda.mem_get_info(device)[0]
    ks = [k for k in (10, 1000) if k <= n]
    reference = errors.guard(
        "reference", lambda: SampledReference(test_host, train_host, max(ks), ("proponents", "opponents")), device
    )

    cases = []
    for k in ks:
        contenders: dict[str, Callable[[], object]] = {
            "tracin_device_resident": lambda k=k: tracin.top_k(
                on_device, train_set, k, device=tracin_device, progress=False
            ),
            "tracin_host_store_streamed": lambda k=k: tracin.top_k(
                test_host, store, k, device=tracin_device, progress=False
            ),
        }
        if full_fits:
            contenders["torch_matmul_topk_whole_matrix"] = lambda k=k: whole_matrix_top_k(test, train, k)
        if faiss_search is not None and (device.type != "cuda" or k <= 2048):
            contenders["faiss_index_flat_ip"] = lambda k=k: faiss_search(k)
        last: dict[str, object] = {}
        times = _timed(contenders, args.repeats, f"k={k}", errors, device, last)
        checks = _checks(last, times, reference, f"k={k}", errors, device)
        cases.append({"k": k, "side": "proponents", "times": times, "checks": checks})
        partial(cases)
    both = {
        "tracin_device_resident_both_sides": lambda: tracin.top_k(
            on_device, train_set, 10, side="both", device=tracin_device, progress=False
        )
    }
    last = {}
    times = _timed(both, args.repeats, "k=10 both", errors, device, last)
    checks = _checks(last, times, reference, "k=10 both", errors, device)
    cases.append({"k": 10, "side": "both", "times": times, "checks": checks})
    for case in cases:
        for t in case["times"].values():
            t["tflops"] = 2.0 * m * n * test.shape[1] / t["median_s"] / 1e12
    agreement = None
    if full_fits:
        agreement = errors.guard(
            "agreement", lambda: _agreement(on_device, train_set, tracin_device, test, train), device
        )
    return {
        "config": {
            "device": str(device),
            "tracin_device": tracin_device,
            "m": m,
            "n": n,
            "d": test.shape[1],
            "dtype": "float32",
            "repeats": args.repeats,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "store_bytes": store.nbytes,
            "store_chunk_bytes": store.chunk_bytes,  # one backend call per chunk; the upload runs on across them
            "device_tile_bytes": _tunables.DEVICE_TILE_BYTES,  # one upload per tile
            "device_resident_tile_bytes": _tunables.DEVICE_RESIDENT_TILE_BYTES,
            "faiss": faiss_search is not None,
            "faiss_left_out": faiss_left_out,  # why faiss was not timed, where it was not installed
            "torch_whole_matrix": full_fits,
        },
        "limits": limits,
        "cases": cases,
        "agreement": agreement,
        "goals": _goals(cases, limits, store.nbytes),
    }


def _timed(
    contenders: dict[str, Callable[[], object]], repeats: int, case: str, errors: Errors, device, last: dict
) -> dict:
    """time_interleaved of the contenders that run: each is tried once first, and one that fails is
    recorded (as "CASE NAME") and left out of the timing. `last` receives each one's result of its
    last call, for _checks."""
    kept = {name: lambda name=name, fn=fn: last.__setitem__(name, fn()) for name, fn in contenders.items()}
    working = {
        name: fn for name, fn in kept.items() if errors.guard(f"{case} {name}", lambda fn=fn: fn() or True, device)
    }
    if not working:
        return {}
    times = errors.guard(case, lambda: time_interleaved(working, repeats=repeats, warmup=0, pause_s=0.05), device)
    return times or {}


def _sides(result: object) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """side -> (values, indices) as NumPy arrays, of a tracin TopK or BothSides, torch.topk's result
    (on any device) or faiss's (values, indices)."""
    if hasattr(result, "proponents"):
        return {
            "proponents": _sides(result.proponents)["proponents"],
            "opponents": _sides(result.opponents)["proponents"],
        }
    values, indices = (a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in result)
    return {"proponents": (values, indices)}


def _checks(last: dict, times: dict, reference: SampledReference | None, case: str, errors: Errors, device) -> dict:
    """Each timed contender's last result checked (benchmarks.exactness.check_top_k, tie-aware, float64)
    on the reference's sampled rows, per side; a result that is not ok, or that could not be checked,
    is recorded in `errors` (as "CASE NAME check": exit status 1)."""
    checks = {}
    for name in times:
        part = f"{case} {name} check"
        if reference is None:
            errors[part] = "not checked: the float64 reference failed"
            continue
        found = errors.guard(
            part, lambda name=name: {s: reference.check(*r, s) for s, r in _sides(last[name]).items()}, device
        )
        if found is None:
            continue
        checks[name] = found
        wrong = {s: c for s, c in found.items() if not c["ok"]}
        if wrong:
            errors[part] = "; ".join(f"{s}: {_why(c)}" for s, c in wrong.items())
    return checks


def _why(check: dict) -> str:
    """One line: why a check_top_k result is not ok."""
    if "problem" in check:
        return check["problem"]
    return (
        f"{check['wrong_rows']} of {check['rows']} sampled rows wrong, values off by up to "
        f"{check['max_value_error']:.3g} (relative)"
    )


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
    """Each goal's figure (None where a part it needs failed or gave a result that failed its check),
    whether it is met, and the targets."""
    by_k = {c["k"]: c for c in cases if c["side"] == "proponents"}

    def median(k: int, name: str) -> float | None:
        case = by_k.get(k, {})
        checked = case.get("checks", {}).get(name, {})
        if not checked or not all(c["ok"] for c in checked.values()):
            return None
        return case["times"].get(name, {}).get("median_s")

    resident, streamed = median(10, "tracin_device_resident"), median(10, "tracin_host_store_streamed")
    figures = {
        "device_resident_fraction_of_sgemm": (
            limits["sgemm"]["seconds"] / resident if limits["sgemm"] and resident else None
        ),
        "host_streamed_fraction_of_h2d_bound": (
            store_bytes / (limits["h2d_gbs"] * 1e9) / streamed if limits["h2d_gbs"] and streamed else None
        ),
        "k1000_over_k10": (
            median(1000, "tracin_device_resident") / resident
            if resident and median(1000, "tracin_device_resident")
            else None
        ),
    }
    met = {
        "device_resident_fraction_of_sgemm": lambda v: v >= GOALS["device_resident_fraction_of_sgemm"],
        "host_streamed_fraction_of_h2d_bound": lambda v: v >= GOALS["host_streamed_fraction_of_h2d_bound"],
        "k1000_over_k10": lambda v: v <= GOALS["k1000_over_k10_at_most"],
    }
    return {
        **figures,
        "met": {name: None if v is None else bool(met[name](v)) for name, v in figures.items()},
        "targets": GOALS,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="'cuda', 'cuda:N' or 'cpu' (smoke test at --quick sizes)")
    p.add_argument("--quick", action="store_true", help=f"small sizes {QUICK} instead of {FULL}")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed rounds after a warm-up (default 5)")
    p.add_argument("--dir", default=None, help="where to write the store (default: the system temp dir)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default {RESULTS_DIR}; a new temporary folder with --quick or --device cpu)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu: torch {torch.__version__} sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    smoke = args.quick or torch.device(args.device).type == "cpu"
    name = "gpu_quick" if smoke else "gpu"
    args.out = output_dir(args.out, smoke, "gpu")  # a smoke run leaves nothing in the checkout
    path = args.out / f"{name}.json"
    result = run(args, lambda record: write_json(name, record, args.out))
    for case in result["cases"]:
        for contender, t in case["times"].items():
            print(f"k={case['k']:<5} {case['side']:<10} {contender:34s} {t['median_s'] * 1e3:9.2f} ms")
    limits = result["limits"]
    if limits["sgemm"]:
        print(f"sgemm {limits['sgemm']['tflops']:.2f} TFLOP/s")
    if limits["h2d_gbs"]:
        print(f"host-to-device {limits['h2d_gbs']:.1f} GB/s")
    for name, p in (result.get("host_paths") or {}).get("paths", {}).items():
        figures = f"{p['gbs']:7.1f} GB/s (best {p['best_gbs']:.1f})" if "gbs" in p else p["error"]
        print(f"host path {name:28s} {figures}")
    for dev, modes in result["export"]["devices"].items():
        if modes:
            print(f"export on {dev}: " + ", ".join(f"{mode} {t['seconds']:.3f} s" for mode, t in modes.items()))
    goals = result["goals"]
    print("goals:", {k: round(v, 3) for k, v in goals.items() if isinstance(v, float)}, "met:", goals["met"])
    for part, message in result["errors"].items():
        print(f"FAILED {part}: {message}", file=sys.stderr)
    print(f"wrote {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
