"""Distributed top-k benchmark: a LocalCluster against tracin.top_k on the same store, and a scaling model.

    python -m benchmarks.distributed [--size 1] [--workers 2] [--test-rows 64] [--k 10] [--repeats 5]

Writes a float16 store of --size GiB, starts a LocalCluster of --workers single-threaded worker
processes on 127.0.0.1 and times tracin.distributed.top_k(test, store, side="both") against
tracin.top_k(test, store, side="both", num_threads=--workers), interleaved, the store warm in the
OS cache. From Dask's task stream: the time of each shard task and merge task. The fixed cost per
task comes from a store of --tiny-shards rows cut into one shard per row, against one shard per
worker. A projection for 10, 100 and 1000 workers on a 1 TiB store is built from these measured
parts and a simulation of the default shards handed to free workers (not measured: see
"projection" in the JSON). Writes results/distributed.json (--quick: toy sizes, distributed_quick.json
in a new temporary folder).

    python -m benchmarks.distributed --only export [--export-rows 4000] [--workers 2] [--repeats 2]

times tracin.distributed.export_gradients("torch", ...) on the LocalCluster (one row range per
worker) against tracin.torch.export_gradients with --workers torch threads, both into a fresh store
each call (deleted after the call, outside the timed part), checks that the data files are
byte-identical to a one-thread export (a task's threads), and records it under "export" in
results/distributed.json (the rest of the record kept).
"""

from __future__ import annotations

import argparse
import filecmp
import heapq
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import tracin

from .common import (
    add_output_options,
    at_least,
    description,
    output_dir,
    peer_versions,
    positive_float,
    quick_or_given,
    record_name,
    require_modules,
    size_options,
    time_interleaved,
    write_json,
)

if TYPE_CHECKING:
    from distributed import Client
from .store import write_store

TIB = 2**40
PROJECTED_WORKERS = (10, 100, 1000)


def _compute_seconds(stream: list[dict], prefix: str) -> list[float]:
    """Compute time of each task in a Dask task stream whose key starts with `prefix`."""
    return [
        s["stop"] - s["start"]
        for t in stream
        if str(t["key"]).startswith(prefix)
        for s in t["startstops"]
        if s["action"] == "compute"
    ]


def _fixed_cost(client: Client, root: Path, workers: int, shards: int, repeats: int) -> dict:
    """Extra wall time per extra task: a tiny store cut into `shards` one-row shards against one
    shard per worker, both doing (almost) no kernel work."""
    import tracin.distributed as td  # here and below: the distributed extra, checked by main first

    small = write_store(root / "tiny", shards, [8]) and tracin.GradientStore.open(root / "tiny")
    test = tracin.Gradients(np.ones((1, 8), dtype=np.float16))
    times = time_interleaved(
        {
            "per_worker": lambda: td.top_k(test, small, 1, client=client, shards=workers, progress=False),
            "per_row": lambda: td.top_k(test, small, 1, client=client, shards=shards, progress=False),
        },
        repeats=repeats,
    )
    few, many = times["per_worker"]["median_s"], times["per_row"]["median_s"]
    return {
        "tasks": shards,
        "times": times,
        "call_s_one_shard_per_worker": few,
        # Clamped at 0: a negative difference is timing noise, and a negative task cost would let
        # the projection's schedule finish shards in less than no time.
        "fixed_cost_per_task_s": max(0.0, (many - few) / (shards - workers)),
    }


def _projection(shard_s_per_byte: float, merge_s: float, call_s: float, task_s: float) -> list[dict]:
    """Projected seconds for a 1 TiB store: tracin.distributed's default shards handed in order to
    whichever worker is free first (as Dask's scheduler does), each costing its bytes at the measured
    kernel time per byte plus the fixed cost per task; then the merge tree (its depth in merge
    tasks) and the fixed cost of one call."""
    from tracin.distributed._run import FAN_IN
    from tracin.distributed._shards import shard_ranges

    rows = []
    row_bytes = 2**14  # 16 KiB rows, as in the measured store; only the byte count matters
    for w in PROJECTED_WORKERS:
        ranges = shard_ranges(TIB // row_bytes, row_bytes, w, None)
        free = [0.0] * w
        for a, b in ranges:
            heapq.heappush(free, heapq.heappop(free) + (b - a) * row_bytes * shard_s_per_byte + task_s)
        depth = math.ceil(math.log(len(ranges), FAN_IN))
        scoring = max(free)
        rows.append(
            {
                "workers": w,
                "shards": len(ranges),
                "largest_shard_mib": max(b - a for a, b in ranges) * row_bytes / 2**20,
                "smallest_shard_mib": min(b - a for a, b in ranges) * row_bytes / 2**20,
                "ideal_scoring_s": TIB * shard_s_per_byte / w,
                "scoring_s": scoring,
                "merge_depth": depth,
                "projected_s": call_s + scoring + depth * (merge_s + task_s),
            }
        )
    return rows


def _cluster(args: argparse.Namespace, client: Client | None, stack: ExitStack) -> Client:
    """`client`, or a LocalCluster of --workers single-threaded processes on loopback for this run."""
    from distributed import Client, LocalCluster

    if client is not None:
        return client
    cluster = stack.enter_context(
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        )
    )
    return stack.enter_context(Client(cluster, set_as_default=False))


def run(args: argparse.Namespace, client: Client | None = None) -> dict:
    """The measurements as a JSON-ready dict; on `client` if given (with --workers single-threaded
    workers), else on a LocalCluster started for the run."""
    from distributed import get_task_stream

    import tracin.distributed as td
    from tracin.distributed._shards import MAX_SHARD_BYTES

    dims = [args.dim] * args.checkpoints
    row_bytes = sum(dims) * 2
    n_rows = int(args.size * 2**30) // row_bytes
    root = Path(tempfile.mkdtemp(prefix="tracin-distributed-bench-", dir=args.dir))
    try:
        write_store(root / "store", n_rows, dims)
        store = tracin.GradientStore.open(root / "store")
        rng = np.random.default_rng(1)
        test = tracin.Gradients(
            [rng.standard_normal((args.test_rows, d), dtype=np.float32).astype(np.float16) for d in dims]
        )
        with ExitStack() as stack:
            client = _cluster(args, client, stack)
            contenders = {
                "single_machine": lambda: tracin.top_k(test, store, args.k, "both", num_threads=args.workers),
                "distributed": lambda: td.top_k(
                    test, store, args.k, "both", client=client, shards=args.shards, progress=False
                ),
            }
            times = time_interleaved(contenders, repeats=args.repeats)
            with get_task_stream(client=client) as stream:
                found = contenders["distributed"]()
            expected = contenders["single_machine"]()
            identical = all(
                np.array_equal(a.values, b.values) and np.array_equal(a.indices, b.indices)
                for a, b in zip(found, expected, strict=True)
            )
            fixed = _fixed_cost(client, root, args.workers, args.tiny_shards, args.repeats)
    finally:
        shutil.rmtree(root)
    shard_s = _compute_seconds(stream.data, "tracin_top_k_part")
    merge_s = _compute_seconds(stream.data, "tracin_merge_parts")
    med = {name: t["median_s"] for name, t in times.items()}
    per_byte = sum(shard_s) / store.nbytes  # shards differ in size: compute seconds per byte over all
    merge = statistics.median(merge_s) if merge_s else 0.0
    return {
        "config": {
            "size_gib": args.size,
            "n_rows": n_rows,
            "dims": dims,
            "dtype": "float16",
            "test_rows": args.test_rows,
            "k": args.k,
            "side": "both",
            "workers": args.workers,
            "threads_per_worker": 1,
            "single_machine_threads": args.workers,
            "repeats": args.repeats,
            "cache": "warm (store pages in the OS cache)",
        },
        "load_average_after": os.getloadavg(),
        "store_bytes": store.nbytes,
        "times": times,
        "ratio_distributed_over_single_machine": med["distributed"] / med["single_machine"],
        "goal_ratio": 1.15,
        "identical_results": identical,
        "shards": len(shard_s),
        "shard_compute_s": shard_s,
        "shard_gib_per_s_per_worker": 1 / per_byte / 2**30,
        "merge_tasks": len(merge_s),
        "merge_compute_s": merge_s,
        "fixed_cost": fixed,
        "projection": {
            "note": "PROJECTION, not a measurement: 1 TiB float16 store, this machine's measured per-byte shard time "
            "(single-threaded task, warm cache), merge time and fixed costs; assumes storage feeds every "
            f"worker at >= {1 / per_byte / 2**30:.2f} GiB/s; default shards (at most "
            f"{MAX_SHARD_BYTES // 2**20} MiB, large first) handed to the first free worker.",
            "rows": _projection(per_byte, merge, fixed["call_s_one_shard_per_worker"], fixed["fixed_cost_per_task_s"]),
        },
    }


def _export_problem(n_rows: int) -> tuple:
    """A small torch MLP (32 -> 256 -> 10, 11k parameters), two checkpoints, n_rows examples, its loss."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    checkpoints = []
    for lr in (0.1, 0.05):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        checkpoints.append(({k: v.clone() for k, v in model.state_dict().items()}, lr))
    data = (torch.randn(n_rows, 32), torch.randint(0, 10, (n_rows,)))
    return model, checkpoints, data, torch.nn.CrossEntropyLoss(reduction="none")


def run_export(args: argparse.Namespace, client: Client | None = None) -> dict:
    """Distributed export (one row range per worker) against one process, as a JSON-ready dict."""
    import torch

    import tracin.distributed as td
    import tracin.torch

    model, checkpoints, data, loss = _export_problem(args.export_rows)
    kw = {"batch_size": args.export_batch}
    root = Path(tempfile.mkdtemp(prefix="tracin-distributed-export-bench-", dir=args.dir))
    stores = {"single_process": root / "one", "distributed": root / "many"}  # each deleted after each call
    try:
        with ExitStack() as stack:
            client = _cluster(args, client, stack)

            def single() -> Path:
                torch.set_num_threads(args.workers)
                path = stores["single_process"]
                tracin.torch.export_gradients(model, checkpoints, data, loss, store=path, progress=False, **kw)
                return path

            def spread() -> Path:
                path = stores["distributed"]
                td.export_gradients(
                    "torch",
                    model,
                    checkpoints,
                    data,
                    loss,
                    store=path,
                    client=client,
                    shards=args.workers,
                    progress=False,
                    **kw,
                )
                return path

            times = time_interleaved(
                {"single_process": single, "distributed": spread},
                repeats=args.repeats,
                after=lambda name: shutil.rmtree(stores[name]),  # outside the timed part: one store on disk at a time
            )
            torch.set_num_threads(1)  # the bits of torch's kernels depend on its threads: compare like with like
            path = root / "one-thread"
            tracin.torch.export_gradients(model, checkpoints, data, loss, store=path, progress=False, **kw)
            one, many = path, spread()
            files = sorted(f.name for f in one.glob("*.npy"))
            identical = bool(files) and all(filecmp.cmp(one / f, many / f, shallow=False) for f in files)
            nbytes = sum((one / f).stat().st_size for f in files)
    finally:
        shutil.rmtree(root)
    med = {name: t["median_s"] for name, t in times.items()}
    rows = args.export_rows * len(checkpoints)
    return {
        "config": {
            "model": "MLP 32-256-10 (11,018 parameters), full gradients, float32",
            "n_rows": args.export_rows,
            "checkpoints": len(checkpoints),
            "batch_size": args.export_batch,
            "workers": args.workers,
            "threads_per_worker": 1,
            "shards": args.workers,
            "single_process_torch_threads": args.workers,
            "repeats": args.repeats,
        },
        "load_average_after": os.getloadavg(),
        "store_data_bytes": nbytes,
        "times": times,
        "rows_per_s": {name: rows / t for name, t in med.items()},
        "speedup_distributed_over_single_process": med["single_process"] / med["distributed"],
        "identical_data_files_to_one_thread_export": identical,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=description(__doc__))
    sizes = [
        ("size", positive_float, "store size in GiB"),
        ("dim", at_least(1), "columns per checkpoint"),
        ("test_rows", at_least(1), "test examples"),
        ("repeats", at_least(1), "timed rounds after a warm-up"),
        ("tiny_shards", at_least(1), "tasks of the fixed-cost run"),
        ("export_rows", at_least(1), "examples exported"),
    ]
    for name, kind, text in sizes:
        flag = "--" + name.replace("_", "-")
        size = f"default {FULL[name]:g}, {QUICK[name]:g} with --quick"
        p.add_argument(flag, type=kind, default=None, help=f"{text} ({size})")
    p.add_argument("--checkpoints", type=int, default=2, choices=(1, 2), help="checkpoints (default 2)")
    p.add_argument("--k", type=at_least(1), default=10, help="top-k per side (default 10)")
    p.add_argument("--workers", type=at_least(1), default=2, help="LocalCluster workers, one thread each (default 2)")
    p.add_argument("--shards", type=at_least(1), default=None, help="shards (default: tracin.distributed's choice)")
    p.add_argument("--dir", default=None, help="where to write the store (default: the system temp dir)")
    add_output_options(
        p,
        "toy sizes (a 4 MiB store of 2 x 256 columns, 8 test rows, 8 tiny shards, 40 export rows), one timed "
        "round; a size given as a flag wins",
    )
    p.add_argument(
        "--only",
        choices=("top_k", "export"),
        default="top_k",
        help="top_k: the scoring record; export: the export record, kept beside it",
    )
    p.add_argument("--export-batch", type=at_least(1), default=50, help="export batch size (default 50)")
    return p


FULL = {"size": 1.0, "dim": 4096, "test_rows": 64, "repeats": 5, "tiny_shards": 64, "export_rows": 4000}
# --quick: a smoke run of every step (the LocalCluster too, on loopback), in seconds.
QUICK = {"size": 4 / 1024, "dim": 256, "test_rows": 8, "repeats": 1, "tiny_shards": 8, "export_rows": 40}
PEERS = ("dask", "distributed", "torch")  # versions recorded with the results


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    require_modules(parser.prog, ("dask", "distributed"), "distributed")
    given_batch = args.export_batch
    if args.quick:
        args.export_batch = min(args.export_batch, (args.export_rows or QUICK["export_rows"]) // 2 or 1)
    quick_or_given(args, QUICK, FULL)
    # each part (scoring, export) writes the recorded file only at the defaults of what it runs
    if args.only == "export":
        options = size_options(args, QUICK, FULL, skip=tuple(k for k in FULL if k != "export_rows"))
        options.append((given_batch, 50, f"export-batch{given_batch}"))
    else:
        options = size_options(args, QUICK, FULL, skip=("repeats", "export_rows"))
        options += [(args.checkpoints, 2, f"checkpoints{args.checkpoints}"), (args.k, 10, f"k{args.k}")]
        options.append((args.shards, None, f"shards{args.shards}"))
    name = record_name("distributed", args.quick, [*options, (args.workers, 2, f"workers{args.workers}")])
    args.out = output_dir(args.out, args.quick, "distributed")
    t0 = time.perf_counter()
    if args.only == "export":
        return _main_export(args, t0, name)
    result = run(args)
    result["versions"] = peer_versions(PEERS)
    # the export record (--only export) lives in the same file: a scoring run keeps it, as an export run
    # keeps the scoring record (README cites both)
    kept = _recorded(args.out / f"{name}.json")
    if "export" in kept:
        result["export"] = kept["export"]
    path = write_json(name, result, args.out)
    med = {k: v["median_s"] for k, v in result["times"].items()}
    print(
        f"{result['store_bytes'] / 2**30:.2f} GiB fp16 store, top-{args.k} both sides, {args.test_rows} test rows: "
        f"single machine ({args.workers} threads) {med['single_machine']:.3f} s, LocalCluster ({args.workers} "
        f"workers, {result['shards']} shards) {med['distributed']:.3f} s = "
        f"{result['ratio_distributed_over_single_machine']:.3f}x (goal <= 1.15x); identical: "
        f"{result['identical_results']}"
    )
    print(
        f"{result['shards']} shard tasks, {result['shard_gib_per_s_per_worker']:.2f} GiB/s per worker; merge task "
        f"{statistics.median(result['merge_compute_s'] or [0]) * 1e3:.2f} ms, fixed cost per task "
        f"{result['fixed_cost']['fixed_cost_per_task_s'] * 1e3:.1f} ms, per call "
        f"{result['fixed_cost']['call_s_one_shard_per_worker'] * 1e3:.0f} ms"
    )
    for r in result["projection"]["rows"]:
        print(
            f"PROJECTION 1 TiB, {r['workers']:>4} workers: {r['shards']} shards, {r['projected_s']:.0f} s "
            f"(scoring {r['scoring_s']:.0f} s, ideal {r['ideal_scoring_s']:.0f} s)"
        )
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    if not result["identical_results"]:  # written first: the figures kept for diagnosis
        print(
            f"{_parser().prog}: error: the distributed top-{args.k} differs from the single machine's", file=sys.stderr
        )
        return 1
    return 0


def _recorded(record: Path) -> dict:
    """What `record` holds (nothing where it does not exist), less the facts write_json adds again."""
    kept = json.loads(record.read_text()) if record.exists() else {}
    return {k: v for k, v in kept.items() if k not in ("benchmark", "machine")}


def _main_export(args: argparse.Namespace, t0: float, name: str) -> int:
    found = run_export(args)
    kept = _recorded(args.out / f"{name}.json")
    path = write_json(name, {**kept, "export": found, "versions": peer_versions(PEERS)}, args.out)
    med = {k: v["median_s"] for k, v in found["times"].items()}
    print(
        f"export of {args.export_rows} rows x 2 checkpoints: one process ({args.workers} torch threads) "
        f"{med['single_process']:.2f} s, LocalCluster ({args.workers} workers) {med['distributed']:.2f} s = "
        f"{found['speedup_distributed_over_single_process']:.2f}x speed-up; identical files: "
        f"{found['identical_data_files_to_one_thread_export']}"
    )
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    if not found["identical_data_files_to_one_thread_export"]:  # written first: the figures kept for diagnosis
        print(
            f"{_parser().prog}: error: the distributed export's data files differ from a one-thread export's",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
