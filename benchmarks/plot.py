"""PNG plots of a kernel benchmark payload (benchmarks/kernel.py): speed-ups, k, threads, n, roofline.

    python -m benchmarks.plot --json benchmarks/results/kernel_avx2.json [--out DIR]

draws the plots of a recorded run again, from its JSON alone (as NAME_<plot>.png, NAME its
"benchmark", beside the JSON unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLOURS = {"tracin": "tab:blue", "faiss": "tab:orange", "numpy": "tab:green", "torch": "tab:red", "sgemm": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def speedups(payload: dict, path: Path) -> Path | None:
    """Per headline case, tracin's speed-up over each peer (median time ratio, > 1: tracin faster)."""
    rows = [
        (c["name"], {r.split(" vs ")[1]: v["value"] for r, v in c["ratios"].items() if r.startswith("tracin vs ")})
        for c in payload["cases"]
        if c["group"] in ("top10", "both", "skinny", "checkpoints")
    ]
    rows = [(name, vals) for name, vals in rows if vals]
    if not rows:
        return None
    plt = _pyplot()
    peers = [p for p in ("faiss", "numpy", "torch", "sgemm") if any(p in v for _, v in rows)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        xs = [i + j * width for i, (_, v) in enumerate(rows) if peer in v]
        ys = [v[peer] for _, v in rows if peer in v]
        ax.bar(xs, ys, width, label=f"vs {peer}", color=COLOURS[peer])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(peers) - 1) / 2 for i in range(len(rows))], [n for n, _ in rows])
    ax.set_ylabel("speed-up of tracin (peer time / tracin time)")
    ax.set_title("tracin.top_k against its peers (median of interleaved repeats)")
    ax.legend()
    return _save(fig, path)


def _median(case: dict, name: str) -> float:
    """The median time of contender `name`; for faiss, of the faster of its default and BLAS paths."""
    names = [name, name.replace("faiss", "faiss blas", 1)] if name.startswith("faiss") else [name]
    return min(case["contenders"][n]["median_s"] for n in names if n in case["contenders"])


def _series(case: dict, peer: str, prefix: str) -> tuple[list[float], list[float]]:
    """(parameter, median seconds) of the contenders `peer prefix=value` in one case (faiss: the
    faster path)."""
    pts = sorted(
        (float(name.split("=")[1]), _median(case, name))
        for name, c in case["contenders"].items()
        if c["peer"] == peer and name.startswith(f"{peer} {prefix}=")
    )
    return [p for p, _ in pts], [t for _, t in pts]


def k_scan(payload: dict, path: Path) -> Path | None:
    """Median time against k for tracin and faiss."""
    case = next((c for c in payload["cases"] if c["group"] == "k"), None)
    if case is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for peer in ("tracin", "faiss"):
        ks, ts = _series(case, peer, "k")
        ax.plot(ks, ts, "o-", label=peer, color=COLOURS[peer])
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("k")
    ax.set_ylabel("median time (s)")
    ax.set_title(case["title"], fontsize=9)
    ax.legend()
    return _save(fig, path)


def threads(payload: dict, path: Path) -> Path | None:
    """Median time per thread count for tracin, faiss and the bare sgemm."""
    case = next((c for c in payload["cases"] if c["group"] == "threads"), None)
    if case is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = case["params"]["thread_counts"]
    width = 0.8 / len(counts)
    for j, t in enumerate(counts):
        ys = [_median(case, f"{p} t={t}") for p in ("tracin", "faiss", "sgemm")]
        ax.bar([i + j * width for i in range(3)], ys, width, label=f"{t} thread(s)", alpha=0.5 + 0.5 * j / len(counts))
    ax.set_xticks([i + width * (len(counts) - 1) / 2 for i in range(3)], ["tracin", "faiss", "sgemm"])
    ax.set_ylabel("median time (s)")
    ax.set_title(case["title"], fontsize=9)
    ax.legend()
    return _save(fig, path)


def n_scan(payload: dict, path: Path) -> Path | None:
    """Median time and GFLOP/s against the number of train rows n."""
    scan = sorted((c for c in payload["cases"] if c["group"] == "n"), key=lambda c: c["params"]["n"])
    if not scan:
        return None
    plt = _pyplot()
    fig, (ax_t, ax_g) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [c["params"]["n"] for c in scan]
    for peer in ("tracin", "faiss", "sgemm"):
        times = [_median(c, peer) for c in scan]
        ax_t.plot(ns, times, "o-", label=peer, color=COLOURS[peer])
        gflops = [c["contenders"][peer]["flops"] / t / 1e9 for c, t in zip(scan, times, strict=True)]
        ax_g.plot(ns, gflops, "o-", label=peer, color=COLOURS[peer])
    for ax in (ax_t, ax_g):
        ax.set_xscale("log")
        ax.set_xlabel("n (train rows)")
        ax.legend()
    ax_t.set_yscale("log")
    ax_t.set_ylabel("median time (s)")
    ax_g.set_ylabel("GFLOP/s")
    ax_g.set_ylim(bottom=0)
    p = scan[0]["params"]
    fig.suptitle(f"top-10 as n grows, m={p['m']} d={p['d']}", fontsize=10)
    return _save(fig, path)


def roofline(payload: dict, path: Path) -> Path | None:
    """Every tracin and faiss timing on the roofline of this machine (at the run's thread count)."""
    limits = payload["limits"]
    t = str(payload["config"]["threads"])
    peak, bandwidth = limits["peak_sgemm_gflops"][t], limits["read_bandwidth_gbs"][t]
    points = [
        (c["name"], name, r)
        for c in payload["cases"]
        for name, r in c["contenders"].items()
        if r["peer"] in ("tracin", "faiss") and str(r["threads"]) == t
    ]
    if not points:
        return None
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    intensities = [r["roofline"]["intensity_flop_per_byte"] for _, _, r in points]
    ridge = peak / bandwidth  # FLOP/byte where memory stops being the limit
    xs = np.logspace(np.log10(min(min(intensities), ridge) / 2), np.log10(max(max(intensities), ridge) * 2), 100)
    ax.plot(xs, np.minimum(peak, bandwidth * xs), color="black", label=f"roofline ({t} threads)")
    for case, name, r in points:
        x = r["roofline"]["intensity_flop_per_byte"]
        ax.scatter(x, r["gflops"], color=COLOURS[r["peer"]], s=18)
        if r["peer"] == "tracin":
            ax.annotate(f"{case}: {name}", (x, r["gflops"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for peer in ("tracin", "faiss"):
        ax.scatter([], [], color=COLOURS[peer], label=peer)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of least traffic)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"roofline: peak sgemm {peak:.0f} GFLOP/s, read bandwidth {bandwidth:.1f} GB/s", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {"speedups": speedups, "k": k_scan, "threads": threads, "n": n_scan, "roofline": roofline}


def plot_all(payload: dict, directory: Path, name: str) -> list[Path]:
    """Writes DIRECTORY/NAME_<plot>.png for every plot the payload has data for; their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    made = [fn(payload, directory / f"{name}_{key}.png") for key, fn in PLOTS.items()]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="a kernel benchmark record (benchmarks.kernel's JSON)")
    p.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: beside the JSON)")
    args = p.parse_args(argv)
    try:
        payload = json.loads(args.json.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--json: {args.json}: {e}")
    if not isinstance(payload, dict) or "cases" not in payload or "benchmark" not in payload:
        p.error(f"--json: {args.json} is not a kernel benchmark record")
    made = plot_all(payload, args.out or args.json.parent, payload["benchmark"])
    print("wrote " + ", ".join(str(m) for m in made) if made else "no plot: the record has no data for one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
