"""Gradient store benchmark: top-k over an fp16 store on disk against the same in RAM.

    python -m benchmarks.store [--size 1] [--test-rows 64] [--k 10] [--repeats 3] [--dir DIR] [--out DIR]
    python -m benchmarks.store --quick    # a smoke run (JSON in a new temporary folder)

Writes a store of --size GiB (float16, two checkpoints of --dim columns), then times
tracin.top_k(test, store) against tracin.top_k(test, the same matrices loaded in RAM), interleaved:
the store warm (pages in the OS cache, as right after writing) and cold (its pages dropped from
the cache with posix_fadvise before each call). Where the pages stay cached (a store on tmpfs:
--dir there, or a /tmp that is tmpfs; checked with mincore, "cold_check" in the JSON) no cold read
is timed, with a warning. Peak RSS of each, in a fresh process, shows the
store is streamed in bounded chunks. The recorded large run is 4 GiB (--size 4,
results/store_4gib.json). Writes results/store.json (store_SIZE.json for other sizes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import tracin

from .common import (
    add_output_options,
    at_least,
    description,
    output_dir,
    peak_rss_of,
    positive_float,
    quick_or_given,
    record_name,
    size_options,
    time_interleaved,
    write_json,
)

QUICK_GIB = 0.01  # --quick's store size
FULL = {"size": 1.0, "repeats": 3}
QUICK = {"size": QUICK_GIB, "repeats": 1}

BLOCK_ROWS = 4096


def write_store(path: Path, n_rows: int, dims: list[int], seed: int = 0) -> float:
    """Writes a float16 store of random gradients in blocks of BLOCK_ROWS rows; returns the seconds
    spent in the writer (data generation excluded). Blocks are row shuffles of one random pool per
    checkpoint, so later blocks repeat rows (ties for top-k) and generating them is cheap."""
    rng = np.random.default_rng(seed)
    writer = tracin.GradientStore.create(path, n_rows, dims, [0.1, 0.05][: len(dims)], "float16", overwrite=True)
    spent = 0.0
    for c, d in enumerate(dims):
        pool = rng.standard_normal((BLOCK_ROWS, d), dtype=np.float32).astype(np.float16)
        for start in range(0, n_rows, BLOCK_ROWS):
            block = pool[rng.permutation(BLOCK_ROWS)[: n_rows - start]]
            t0 = time.perf_counter()
            writer.write(c, start, block)
            spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.finalize()
    return spent + time.perf_counter() - t0


def evict(store: tracin.GradientStore) -> None:
    """Drops the store's pages from the OS cache (clean pages only; affects no other file)."""
    for name in (p for p in store.path.iterdir() if p.suffix == ".npy"):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


COLD_AT_MOST = 0.01  # resident fraction of the store's pages after evict() below which a read is cold


def resident_fraction(paths: list[Path]) -> float | None:
    """The fraction of the pages of `paths` in the OS page cache (mincore over a read-only shared
    mapping of each file, which faults nothing in); None where that cannot be asked (no mincore)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        c_mmap, c_mincore, c_munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    c_mmap.restype = ctypes.c_void_p
    c_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    c_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        pages = -(-size // mmap.PAGESIZE)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = c_mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                vec = np.zeros(pages, np.uint8)
                if c_mincore(addr, size, vec.ctypes.data) != 0:
                    return None
            finally:
                c_munmap(addr, size)
        finally:
            os.close(fd)
        resident += int(np.count_nonzero(vec & 1))
        total += pages
    return resident / total if total else None


def cold_check(store: tracin.GradientStore) -> dict:
    """Whether evict() leaves the store cold here: evicts, then measures the fraction of its pages still
    cached. On tmpfs / ramfs (a --dir there, or a /tmp that is one) the pages are the files: nothing is
    dropped, and a read after evict() is a warm read."""
    evict(store)
    fraction = resident_fraction(sorted(p for p in store.path.iterdir() if p.suffix == ".npy"))
    return {
        "cold": None if fraction is None else fraction <= COLD_AT_MOST,
        "resident_fraction_after_evict": fraction,
        "cold_at_most": COLD_AT_MOST,
    }


def load_in_ram(path: Path) -> tracin.Gradients:
    """The store's matrices read into RAM with plain NumPy (np.load of the files the manifest names)."""
    manifest = json.loads((path / "manifest.json").read_text())
    return tracin.Gradients(
        [np.load(path / c["file"]) for c in manifest["checkpoints"]], [c["weight"] for c in manifest["checkpoints"]]
    )


def peak_rss(path: Path, test_path: Path, in_ram: bool, k: int) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of a fresh process running top_k over the store or its copy in RAM."""
    train = f"load_in_ram(Path({str(path)!r}))" if in_ram else f"tracin.GradientStore.open({str(path)!r})"
    code = (
        "from pathlib import Path\nimport numpy as np, tracin\nfrom benchmarks.store import load_in_ram\n"
        f"train = {train}\ntest = tracin.Gradients(list(np.load({str(test_path)!r}).values()))\n"
        f"tracin.top_k(test, train, k={k}, side='both')\n"
    )
    return peak_rss_of(code)


def run(args: argparse.Namespace) -> dict:
    dims = [args.dim] * args.checkpoints
    row_bytes = sum(dims) * 2
    n_rows = int(args.size * 2**30) // row_bytes
    root = Path(tempfile.mkdtemp(prefix="tracin-store-bench-", dir=args.dir))
    try:
        write_s = write_store(root / "store", n_rows, dims)
        store = tracin.GradientStore.open(root / "store")
        rng = np.random.default_rng(1)
        test = [rng.standard_normal((args.test_rows, d), dtype=np.float32).astype(np.float16) for d in dims]
        np.savez(root / "test.npz", *test)
        test_set = tracin.Gradients(test)
        in_ram = {"train": load_in_ram(root / "store")}  # dropped before the RSS runs below

        def on_store_cold() -> object:
            evict(store)
            return tracin.top_k(test_set, store, k=args.k, side="both")

        contenders = {
            "ram": lambda: tracin.top_k(test_set, in_ram["train"], k=args.k, side="both"),
            "store_warm": lambda: tracin.top_k(test_set, store, k=args.k, side="both"),
        }
        cold = cold_check(store)
        if cold["cold"] is False:  # a "cold" read would be a warm one: not timed, not labelled cold
            print(
                f"warning: the store's pages stay cached after posix_fadvise(DONTNEED) in {root} "
                f"({cold['resident_fraction_after_evict']:.0%} resident; tmpfs?): no cold read timed "
                "(give --dir a folder on a disk)",
                file=sys.stderr,
            )
        else:
            contenders["store_cold"] = on_store_cold
        times = time_interleaved(contenders, repeats=args.repeats)
        a, b = contenders["ram"](), contenders["store_warm"]()
        identical = all(
            np.array_equal(x.values, y.values) and np.array_equal(x.indices, y.indices)
            for x, y in zip(a, b, strict=True)
        )
        in_ram.clear()
        rss_store, _ = peak_rss(root / "store", root / "test.npz", False, args.k)
        rss_ram, _ = peak_rss(root / "store", root / "test.npz", True, args.k)
    finally:
        shutil.rmtree(root)
    med = {name: t["median_s"] for name, t in times.items()}
    return {
        "config": {
            "size_gib": args.size,
            "n_rows": n_rows,
            "dims": dims,
            "dtype": "float16",
            "test_rows": args.test_rows,
            "k": args.k,
            "side": "both",
            "repeats": args.repeats,
            "chunk_bytes": store.row_chunks() * row_bytes,
        },
        "store_bytes": n_rows * row_bytes,
        "write_s": write_s,
        "write_gib_per_s": n_rows * row_bytes / 2**30 / write_s,
        "times": times,
        "ratios": {
            "store warm / ram time": med["store_warm"] / med["ram"],
            **({"store cold / ram time": med["store_cold"] / med["ram"]} if "store_cold" in med else {}),
        },
        "cold_scored_gib_per_s": n_rows * row_bytes / 2**30 / med["store_cold"] if "store_cold" in med else None,
        "cold_check": cold,
        "peak_rss_mib": {"store": rss_store, "ram": rss_ram},
        "identical_results": identical,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.store", description=description(__doc__))
    p.add_argument(
        "--size",
        type=positive_float,
        default=None,
        help=f"store size in GiB (default 1, {QUICK_GIB} with --quick; results/store_4gib.json used 4)",
    )
    p.add_argument("--dim", type=at_least(1), default=4096, help="columns per checkpoint (default 4096)")
    p.add_argument("--checkpoints", type=int, default=2, choices=(1, 2), help="checkpoints (default 2)")
    p.add_argument("--test-rows", type=at_least(1), default=64, help="test examples (default 64)")
    p.add_argument("--k", type=at_least(1), default=10, help="top-k per side (default 10)")
    p.add_argument(
        "--repeats", type=at_least(1), default=None, help="timed rounds after a warm-up (default 3, 1 with --quick)"
    )
    p.add_argument("--dir", default=None, help="where to write the store (default: the system temp dir)")
    add_output_options(p, f"a {QUICK_GIB} GiB store, one timed round: a smoke run (a size given as a flag wins)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quick_or_given(args, QUICK, FULL)
    result = run(args)
    name = record_name(
        "store",
        args.quick,
        [
            *size_options(args, QUICK, FULL),
            (args.dim, 4096, f"dim{args.dim}"),
            (args.checkpoints, 2, f"checkpoints{args.checkpoints}"),
            (args.test_rows, 64, f"test-rows{args.test_rows}"),
            (args.k, 10, f"k{args.k}"),
        ],
    )
    path = write_json(name, result, output_dir(args.out, args.quick, "store"))
    med = {k: v["median_s"] for k, v in result["times"].items()}
    print(
        f"{result['store_bytes'] / 2**30:.2f} GiB fp16 store, {result['config']['n_rows']} rows, "
        f"dims {result['config']['dims']}; written at {result['write_gib_per_s']:.2f} GiB/s"
    )
    print(
        f"top-{args.k} both sides, {args.test_rows} test rows: RAM {med['ram']:.3f} s, "
        f"store warm {med['store_warm']:.3f} s ({result['ratios']['store warm / ram time']:.2f}x), "
        + (
            f"store cold {med['store_cold']:.3f} s ({result['ratios']['store cold / ram time']:.2f}x)"
            if "store_cold" in med
            else "store cold: not timed (the pages could not be dropped)"
        )
    )
    print(
        f"peak RSS: store {result['peak_rss_mib']['store']:.0f} MiB, RAM {result['peak_rss_mib']['ram']:.0f} MiB; "
        f"identical results: {result['identical_results']}; wrote {path}"
    )
    if not result["identical_results"]:  # written first: the figures kept for diagnosis
        print(f"{_parser().prog}: error: the store's top-{args.k} differs from the same rows' in RAM", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
