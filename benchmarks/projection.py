"""Random projection: speed against torch's matmul with an explicit Gaussian matrix, and top-k
recall of projected against exact influence on a real model's per-example gradients.

    PYTHONPATH=src python benchmarks/projection.py            # the recorded sizes (results/projection.json)
    PYTHONPATH=src python benchmarks/projection.py --quick    # a smoke run (JSON in a temporary folder)
    PYTHONPATH=src python benchmarks/projection.py --isa native,avx2   # AVX2 measured too on AVX-512

Each speed figure is recorded with the instruction set tracin's kernel ran with (--isa: native, the
one it picks on this CPU, or one forced through tracin._core.project(isa=...)) and the load average.

Speed: project n gradients of d dims to `dim` dims (default 1000 x 200 000 -> 2048). The peer
draws a (d, dim) Gaussian matrix with torch.randn and multiplies (creation counted). Medians of
interleaved repeats. Before timing, the first rows of each contender's result are checked once against
float64 products with its explicit matrix (above AGREEMENT_TOL: exit 1, nothing timed or written).

Recall: an MLP trained briefly on sklearn digits; per-example gradients of all its parameters by
torch.func (vmap of grad); exact influence = test . train^T; for each kind and dim, the fraction of
each test point's exact top-k proponents found in the projected top-k.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tracin  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_output_options,
    add_size_options,
    at_least,
    check_agreement,
    description,
    output_dir,
    peer_versions,
    quick_or_given,
    record_name,
    require_modules,
    size_options,
    time_interleaved,
    write_json,
)
from tracin.projection import quiet_widening  # noqa: E402

FULL = {"n": 1000, "d": 200_000, "dim": 2048, "repeats": 3}
QUICK = {"n": 200, "d": 5000, "dim": 256, "repeats": 1}  # --quick: a smoke run

KINDS = ("rademacher", "gaussian", "sparse")
PROG = "python -m benchmarks.projection"
AGREEMENT_TOL = 1e-3  # largest |rows - reference| / max |reference| of a contender's checked rows
CHECKED_ROWS = 4  # rows of each contender's projection checked against float64 products before timing


def _project(kind: str, dim: int, isa: str) -> Callable[[np.ndarray], np.ndarray]:
    """x -> tracin.Projection(dim, 0, kind).apply(x), the kernel's instruction set forced to `isa`
    (through tracin._core.project) unless that is the one it picks on this CPU."""
    from tracin import _core
    from tracin.projection import KINDS as KIND_CODES
    from tracin.projection import SPARSE_NONZEROS

    if isa == _core.resolve_isa("auto"):
        return tracin.Projection(dim, 0, kind).apply

    def forced(x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), dim), dtype=np.float32)
        _core.project(KIND_CODES[kind], 0, 0, dim, min(SPARSE_NONZEROS, dim), (False, [x], [0]), 0, out, isa=isa)
        return out

    return forced


def reference_rows(rows: np.ndarray, kind: str, dim: int, block: int = 512) -> np.ndarray:
    """(r, dim) float64 products of (r, d) float32 `rows` with the explicit matrix of
    tracin.Projection(dim, 0, kind): its columns made `block` at a time (the projections of unit
    vectors at their column offset, the native kernel), products and sums in float64."""
    proj = tracin.Projection(dim, 0, kind)
    out = np.zeros((len(rows), dim))
    for a in range(0, rows.shape[1], block):
        b = min(rows.shape[1], a + block)
        with quiet_widening():  # a block of a wider row: not widened when dim >= block
            columns = proj.apply(np.eye(b - a, dtype=np.float32), column_offset=a)  # (b - a, dim)
        out += rows[:, a:b].astype(np.float64) @ columns.astype(np.float64)
    return out


def torch_reference_rows(rows: np.ndarray, dim: int, block: int = 8192) -> np.ndarray:
    """(r, dim) float64 products of `rows` with the torch peer's matrix (the same generator and seed)."""
    import torch

    matrix = torch.randn(rows.shape[1], dim, generator=torch.Generator().manual_seed(0)).numpy()
    out = np.zeros((len(rows), dim))
    for a in range(0, rows.shape[1], block):
        out += rows[:, a : a + block].astype(np.float64) @ matrix[a : a + block].astype(np.float64)
    return out / dim**0.5


def check_contenders(x: np.ndarray, dim: int, contenders: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The first CHECKED_ROWS rows of each contender's projection of `x` (one call each) against
    reference_rows (torch_reference_rows for the peer): a gap above AGREEMENT_TOL, or another shape,
    ends the program (exit code 1) naming the contender (common.check_agreement). Returns the gaps."""
    rows = x[:CHECKED_ROWS]
    refs = {kind: reference_rows(rows, kind, dim) for kind in KINDS}
    refs["torch_randn_matmul"] = torch_reference_rows(rows, dim)
    gaps = {}
    for name, fn in contenders.items():
        got = np.asarray(fn())
        got = got[:CHECKED_ROWS] if got.ndim == 2 and len(got) == len(x) else got
        ref = refs[name.split()[0]]
        gaps[name] = check_agreement(PROG, name, got, ref, AGREEMENT_TOL, "float64 products with its matrix")
    return gaps


def speed(n: int, d: int, dim: int, repeats: int, isas: list[str]) -> dict:
    """Per kernel instruction set of `isas`, each kind against torch, timed interleaved in one run."""
    import torch

    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    xt = torch.from_numpy(x)

    def torch_matmul():
        gen = torch.Generator().manual_seed(0)
        return xt @ (torch.randn(d, dim, generator=gen) / dim**0.5)

    contenders = {"torch_randn_matmul": torch_matmul}
    for isa in isas:
        for kind in KINDS:
            contenders[f"{kind} {isa}"] = (lambda f: lambda: f(x))(_project(kind, dim, isa))
    gaps = check_contenders(x, dim, contenders)
    load_before = os.getloadavg()[0]
    timings = time_interleaved(contenders, repeats=repeats)
    gigabytes = x.nbytes / 1e9
    for t in timings.values():
        t["gb_per_s"] = gigabytes / t["median_s"]
    peer = timings["torch_randn_matmul"]["median_s"]
    by_isa = {}
    for isa in isas:
        med = {kind: timings[f"{kind} {isa}"]["median_s"] for kind in KINDS}
        by_isa[isa] = {
            "speed_vs_torch": {k: peer / med[k] for k in KINDS},
            "sparse_speedup_over_rademacher": med["rademacher"] / med["sparse"],
            "sparse_speedup_over_gaussian": med["gaussian"] / med["sparse"],
        }
    return {
        "n": n,
        "d": d,
        "dim": dim,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "timings": timings,
        "agreement": {"checked_rows": min(n, CHECKED_ROWS), "tol": AGREEMENT_TOL, "rel_gap": gaps},
        "by_isa": by_isa,
    }


def digits_gradients(n_train: int, n_test: int, hidden: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-example loss gradients (all parameters, flattened) of an MLP trained on sklearn digits."""
    import torch
    from sklearn.datasets import load_digits
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x))
    train, test = perm[:n_train], perm[n_train : n_train + n_test]
    layers, width = [], x.shape[1]
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        for batch in torch.split(train[torch.randperm(len(train))], 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def flat(idx):
        rows = []
        for batch in torch.split(idx, 256):
            g = per_example(params, x[batch], y[batch])
            rows.append(torch.cat([g[k].reshape(len(batch), -1) for k in params], dim=1))
        return torch.cat(rows).numpy()

    return flat(train), flat(test)


def recall(train: np.ndarray, test: np.ndarray, dims: list[int], k: int) -> dict:
    exact = test.astype(np.float64) @ train.T.astype(np.float64)
    exact_top = np.argsort(-exact, axis=1)[:, :k]
    table = {}
    for kind in KINDS:
        table[kind] = {}
        for dim in dims:
            proj = tracin.Projection(dim, 0, kind)
            got = tracin.top_k(tracin.Gradients(proj.apply(test)), tracin.Gradients(proj.apply(train)), k=k)
            hits = [len(set(a) & set(b)) / k for a, b in zip(got.indices, exact_top, strict=True)]
            table[kind][dim] = float(np.mean(hits))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=description(__doc__))
    helps = {"n": "gradients projected", "d": "their dims", "dim": "projected dims", "repeats": "timed rounds"}
    add_size_options(parser, FULL, QUICK, helps)
    parser.add_argument("--k", type=at_least(1), default=10, help="top-k of the recall (default 10)")
    add_output_options(parser, "small sizes, to check the script runs (a size given as a flag wins)")
    parser.add_argument(
        "--isa",
        default="native",
        help="comma-separated kernel instruction sets to time: native (the one tracin picks "
        "here), avx512, avx2, generic (default: native)",
    )
    args = parser.parse_args(argv)
    require_modules(parser.prog, ("torch", "sklearn"), "bench")  # the torch peer, the digits data: before any work
    from tracin import _core

    isas: list[str] = []
    for name in (i.strip() for i in args.isa.split(",") if i.strip()):
        if name not in ("native", "avx512", "avx2", "generic"):
            parser.error(f"--isa: unknown {name!r}; choose from native, avx512, avx2, generic")
        isa = _core.resolve_isa("auto" if name == "native" else name)
        if isa not in isas:
            isas.append(isa)
    quick_or_given(args, QUICK, FULL)
    isa_option = (isas, [_core.resolve_isa("auto")], "-".join(isas))  # another ISA: a record of its own
    hidden = (32,) if args.quick else (256, 128)
    dims = [256, 512] if args.quick else [256, 512, 1024, 2048, 4096, 8192]

    result = {"speed": speed(args.n, args.d, args.dim, args.repeats, isas), "versions": peer_versions(("torch",))}
    s = result["speed"]
    load = s["load_average_1min"]
    print(f"project {args.n} x {args.d} -> {args.dim} (load average {load['before']:.1f} -> {load['after']:.1f}):")
    for name, t in s["timings"].items():
        print(f"  {name:20s} {t['median_s']:8.3f} s  {t['gb_per_s']:6.2f} GB/s")
    for isa, r in s["by_isa"].items():
        for kind, ratio in r["speed_vs_torch"].items():
            print(f"  [{isa}] {kind} speed / torch: {ratio:.2f}x")
        print(
            f"  [{isa}] sparse speedup over rademacher {r['sparse_speedup_over_rademacher']:.1f}x, "
            f"over gaussian {r['sparse_speedup_over_gaussian']:.1f}x"
        )
    train, test = digits_gradients(1000, 100, hidden)
    table = recall(train, test, dims, args.k)
    result["recall"] = {
        "model": f"MLP 64-{'-'.join(map(str, hidden))}-10 on sklearn digits",
        "d": train.shape[1],
        "n_train": len(train),
        "n_test": len(test),
        "k": args.k,
        "top_k_recall": table,
    }
    print(f"top-{args.k} recall of projected vs exact influence (d = {train.shape[1]}):")
    print("  dim    " + "  ".join(f"{kind:>10s}" for kind in KINDS))
    for dim in dims:
        print(f"  {dim:<6d} " + "  ".join(f"{table[kind][dim]:10.3f}" for kind in KINDS))
    out = output_dir(args.out, args.quick, "projection")
    name = record_name(
        "projection", args.quick, [*size_options(args, QUICK, FULL), (args.k, 10, f"k{args.k}"), isa_option]
    )
    path = write_json(name, result, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
