"""The kernel benchmark cases: data, contenders (tracin and its peers) and exactness checks.

Each builder yields Case objects holding closures over their data; the runner (benchmarks/kernel.py)
times the contenders of one case interleaved, then checks the results. Data is random Gaussian
float32 (ties are then vanishingly rare, so a row that differs from the reference is a bug).
Every builder takes `isa`: "native" (tracin.top_k as users call it), or an instruction set to force
on tracin's kernel ("avx2" on an AVX-512 CPU measures the AVX2 path there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from . import peers

F32 = 4


@dataclass
class Contender:
    """One timed function. flops / bytes: the work it does and the least memory traffic it needs
    (for GFLOP/s and the roofline); peer: its family (tracin, faiss, numpy, torch, sgemm)."""

    name: str
    peer: str
    run: Callable[[], object]
    flops: float
    bytes: float
    threads: int
    settings: dict = field(default_factory=dict)  # library settings it ran with, saved in the JSON


@dataclass
class Check:
    """Compare the result of contender `ours` with `reference` (a contender name, or a function
    computing the reference result), scoring exactly on (test, train) for one `side`."""

    ours: str
    reference: str | Callable[[], object]
    test: np.ndarray
    train: np.ndarray
    side: str = "proponents"
    reference_name: str = ""


# A side of a ratio: a contender name, or several (the same peer run different ways), of which the
# one with the least median time in the run is used; when both sides list alternatives (faiss at two
# thread counts), the same alternative is used on both (the one faster on the denominator side).
Side = str | tuple[str, ...]


@dataclass
class Case:
    """Contenders timed together; ratios: label -> (numerator, denominator) contender names,
    reported as median time ratio (a "vs" label reads as the speed-up of the denominator)."""

    name: str
    title: str
    params: dict
    contenders: list[Contender]
    ratios: dict[str, tuple[Side, Side]]
    checks: list[Check] = field(default_factory=list)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of every case (full run or --quick)."""

    main: tuple[int, int, int]  # m, n, d of the headline top-10 case
    skinny: tuple[int, int, int]
    ks: tuple[int, ...]
    checkpoints: tuple[int, int, int, int]  # m, n, C, d per checkpoint
    factored: tuple[int, int, int, int]  # m, n, p (left), q (right)
    threads_n: int
    n_scan: tuple[int, int, tuple[int, ...]]  # m, d, ns


FULL = Sizes(
    main=(1000, 100_000, 512),
    skinny=(16, 1_000_000, 128),
    ks=(1, 10, 100, 1000),
    checkpoints=(1000, 20_000, 5, 512),
    factored=(1000, 10_000, 10, 513),
    threads_n=20_000,
    n_scan=(256, 128, (10_000, 30_000, 100_000, 300_000, 1_000_000)),
)
QUICK = Sizes(
    main=(64, 4000, 64),
    skinny=(16, 20_000, 32),
    ks=(1, 10, 100, 1000),
    checkpoints=(64, 2000, 5, 32),
    factored=(64, 1000, 10, 33),
    threads_n=2000,
    n_scan=(32, 32, (1000, 3000, 10_000)),
)


class Data:
    """Random matrices, made once per shape and shared by the cases that use them."""

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._cache: dict[tuple, np.ndarray] = {}

    def matrix(self, rows: int, cols: int, tag: str = "") -> np.ndarray:
        key = (rows, cols, tag)
        if key not in self._cache:
            self._cache[key] = self._rng.standard_normal((rows, cols), dtype=np.float32)
        return self._cache[key]


def native_isa() -> str:
    """The instruction set tracin's kernel picks on this CPU ("avx512", "avx2" or "generic")."""
    from tracin import _core

    return _core.resolve_isa("auto")


def _tracin(test, train, k: int, side: str, threads: int, isa: str = "native") -> Callable[[], object]:
    """tracin.top_k on (test, train); with `isa` other than this CPU's own, the same kernel call with
    its instruction set forced (tracin._core.top_k(..., isa=isa)), results as tracin.top_k gives them."""
    import tracin

    if isa in ("native", native_isa()):
        return lambda: tracin.top_k(test, train, k, side, num_threads=threads)
    from tracin import _core
    from tracin.gradients import GradientSet

    t, x = (s if isinstance(s, GradientSet) else tracin.Gradients(s) for s in (test, train))
    weights = list(x.weights if x.weights_given else t.weights)
    code, kk = {"proponents": 0, "opponents": 1, "both": 2}[side], min(k, x.n_rows)
    t_side, x_side = t.kernel_side(), x.kernel_side()

    def run():
        pv, pi, ov, oi = _core.top_k(t_side, x_side, weights, kk, code, num_threads=threads, isa=isa)
        prop, opp = tracin.TopK(pv, pi), tracin.TopK(ov, oi)
        return {"proponents": prop, "opponents": opp, "both": (prop, opp)}[side]

    return run


def _one_sided(m: int, n: int, d: int, k: int, itemsize: int = F32) -> tuple[float, float]:
    """(flops, least bytes) of a top-k search that never writes the score matrix."""
    return 2.0 * m * n * d, n * d * itemsize + m * d * F32 + m * k * 12.0


def _dense(m: int, n: int, d: int, select: bool) -> tuple[float, float]:
    """(flops, least bytes) of Q @ X.T written out (and read back once to select from, if select)."""
    return 2.0 * m * n * d, (n + m) * d * F32 + m * n * F32 * (2 if select else 1)


def blas_name(name: str) -> str:
    """The name of faiss contender `name` on its BLAS path ("faiss k=10" -> "faiss blas k=10")."""
    return name.replace("faiss", "faiss blas", 1)


def faiss_paths(name: str) -> tuple[str, str]:
    """A ratio side: faiss contender `name` on its default path or on its BLAS path, whichever is faster."""
    return name, blas_name(name)


def faiss_checks(ours: str, name: str, test: np.ndarray, train: np.ndarray, side: str = "proponents") -> list[Check]:
    """Checks of contender `ours` against faiss contender `name` on each of its two paths."""
    return [Check(ours, path, test, train, side) for path in faiss_paths(name)]


def _faiss(
    name: str, search: Callable[[int | None], object], flops: float, nbytes: float, threads: int
) -> list[Contender]:
    """faiss timed both ways: `name` with its default BLAS threshold (128000 queries in faiss 1.15:
    fewer queries take its loop of dot products) and blas_name(name) with threshold 0 (sgemm of
    query blocks, then heaps). `search(threshold)` runs the search with faiss's threshold set."""
    return [
        Contender(
            name,
            "faiss",
            lambda: search(None),
            flops,
            nbytes,
            threads,
            {"faiss_blas_threshold": peers.faiss_default_blas_threshold()},
        ),
        Contender(blas_name(name), "faiss", lambda: search(0), flops, nbytes, threads, {"faiss_blas_threshold": 0}),
    ]


def _all_peers(q: np.ndarray, x: np.ndarray, k: int, side: str, threads: int, isa: str = "native") -> list[Contender]:
    """tracin, faiss, numpy, torch and the bare sgemm on one (q, x) problem."""
    import torch

    m, d = q.shape
    n = x.shape[0]
    searches = 2 if side == "both" else 1
    index = peers.faiss_index(x)
    neg_q = -q
    tq, tx = torch.from_numpy(q), torch.from_numpy(x)
    if side == "both":
        faiss_run = lambda t: peers.faiss_both(index, q, neg_q, k, t)  # noqa: E731
    else:
        faiss_run = lambda t: peers.faiss_top_k(index, q, k, t)  # noqa: E731
    one = _one_sided(m, n, d, k)
    return [
        Contender("tracin", "tracin", _tracin(q, x, k, side, threads, isa), *one, threads),
        *_faiss("faiss", faiss_run, one[0] * searches, one[1] * searches, threads),
        Contender("numpy", "numpy", lambda: peers.numpy_top_k(q, x, k, side), *_dense(m, n, d, True), threads),
        Contender("torch", "torch", lambda: peers.torch_top_k(tq, tx, k, side), *_dense(m, n, d, True), threads),
        Contender("sgemm", "sgemm", peers.bare_sgemm(q, x), *_dense(m, n, d, False), threads),
    ]


_PEER_RATIOS: dict[str, tuple[Side, Side]] = {
    "tracin vs faiss": (faiss_paths("faiss"), "tracin"),
    "tracin vs numpy": ("numpy", "tracin"),
    "tracin vs torch": ("torch", "tracin"),
    "tracin vs sgemm": ("sgemm", "tracin"),
}


def top10(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """Headline: one-sided top-10 against every peer."""
    m, n, d = sizes.main
    q, x = data.matrix(m, d, "test"), data.matrix(n, d)
    checks = [*faiss_checks("tracin", "faiss", q, x), Check("tracin", "numpy", q, x)]
    yield Case(
        "top10",
        f"one-sided top-10, m={m} n={n} d={d} fp32",
        {"m": m, "n": n, "d": d, "k": 10, "side": "proponents", "dtype": "float32", "threads": threads},
        _all_peers(q, x, 10, "proponents", threads, isa),
        dict(_PEER_RATIOS),
        checks,
    )


def both(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """Proponents and opponents in one tracin call; faiss needs two searches (q and -q)."""
    m, n, d = sizes.main
    q, x = data.matrix(m, d, "test"), data.matrix(n, d)
    checks = [*faiss_checks("tracin", "faiss", q, x, "both"), Check("tracin", "numpy", q, x, "both")]
    yield Case(
        "both",
        f"both sides top-10 in one call vs two faiss searches, m={m} n={n} d={d}",
        {"m": m, "n": n, "d": d, "k": 10, "side": "both", "dtype": "float32", "threads": threads},
        _all_peers(q, x, 10, "both", threads, isa),
        dict(_PEER_RATIOS),
        checks,
    )


def skinny(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """Few queries against a large train side, fp32 and fp16 train (faiss and the rest get fp32)."""
    m, n, d = sizes.skinny
    k = 10
    q, x = data.matrix(m, d, "test"), data.matrix(n, d)
    x16 = x.astype(np.float16)
    contenders = _all_peers(q, x, k, "proponents", threads, isa)
    contenders[0].name = "tracin fp32"
    contenders.insert(
        1,
        Contender(
            "tracin fp16",
            "tracin",
            _tracin(q, x16, k, "proponents", threads, isa),
            *_one_sided(m, n, d, k, itemsize=2),
            threads,
        ),
    )
    fp16_reference = lambda: peers.numpy_top_k(q, x16.astype(np.float32), k)  # noqa: E731
    checks = [
        *faiss_checks("tracin fp32", "faiss", q, x),
        Check("tracin fp32", "numpy", q, x),
        Check("tracin fp16", fp16_reference, q, x16, reference_name="numpy on fp16 data"),
    ]
    ratios = {
        "tracin vs faiss": (faiss_paths("faiss"), "tracin fp32"),
        "tracin fp16 vs faiss": (faiss_paths("faiss"), "tracin fp16"),
        "tracin vs numpy": ("numpy", "tracin fp32"),
        "tracin vs torch": ("torch", "tracin fp32"),
        "tracin vs sgemm": ("sgemm", "tracin fp32"),
        "fp16 vs fp32": ("tracin fp32", "tracin fp16"),
    }
    yield Case(
        "skinny",
        f"skinny queries top-10, m={m} n={n} d={d}, fp32 and fp16 train side",
        {"m": m, "n": n, "d": d, "k": k, "side": "proponents", "dtype": "float32+float16", "threads": threads},
        contenders,
        ratios,
        checks,
    )


def k_scan(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """Cost as k grows: tracin and faiss at each k, in one interleaved run."""
    m, n, d = sizes.main
    q, x = data.matrix(m, d, "test"), data.matrix(n, d)
    index = peers.faiss_index(x)
    contenders, checks, ratios = [], [], {}
    ks = [k for k in sizes.ks if k <= n]
    for k in ks:
        flops, nbytes = _one_sided(m, n, d, k)
        contenders.append(
            Contender(f"tracin k={k}", "tracin", _tracin(q, x, k, "proponents", threads, isa), flops, nbytes, threads)
        )
        contenders += _faiss(f"faiss k={k}", lambda t, k=k: peers.faiss_top_k(index, q, k, t), flops, nbytes, threads)
        checks += faiss_checks(f"tracin k={k}", f"faiss k={k}", q, x)
        ratios[f"tracin vs faiss k={k}"] = (faiss_paths(f"faiss k={k}"), f"tracin k={k}")
    for k in ks:
        if k != 10 and 10 in ks:
            ratios[f"tracin k={k} / k=10 cost"] = (f"tracin k={k}", "tracin k=10")
    yield Case(
        "k",
        f"top-k for k in {ks}, m={m} n={n} d={d}",
        {"m": m, "n": n, "d": d, "ks": ks, "side": "proponents", "dtype": "float32", "threads": threads},
        contenders,
        ratios,
        checks,
    )


def checkpoints(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """C checkpoints of d dims against one checkpoint of C*d dims (the same scores)."""
    import tracin

    m, n, c, d = sizes.checkpoints
    k = 10
    weights = [0.1 * (c - i) for i in range(c)]
    qs = [data.matrix(m, d, f"ckpt-test-{i}") for i in range(c)]
    xs = [data.matrix(n, d, f"ckpt-{i}") for i in range(c)]
    q_folded = np.hstack([np.float32(w) * qc for w, qc in zip(weights, qs, strict=True)])
    x_folded = np.hstack(xs)
    many = (tracin.Gradients(qs), tracin.Gradients(xs, weights))
    flops, nbytes = _one_sided(m, n, c * d, k)
    index = peers.faiss_index(x_folded)
    contenders = [
        Contender(f"tracin C={c}", "tracin", _tracin(*many, k, "proponents", threads, isa), flops, nbytes, threads),
        Contender(
            f"tracin 1x{c * d}",
            "tracin",
            _tracin(q_folded, x_folded, k, "proponents", threads, isa),
            flops,
            nbytes,
            threads,
        ),
        *_faiss("faiss", lambda t: peers.faiss_top_k(index, q_folded, k, t), flops, nbytes, threads),
        Contender("sgemm", "sgemm", peers.bare_sgemm(q_folded, x_folded), *_dense(m, n, c * d, False), threads),
    ]
    ratios = {
        "C checkpoints / one wide cost": (f"tracin C={c}", f"tracin 1x{c * d}"),
        "tracin vs faiss": (faiss_paths("faiss"), f"tracin C={c}"),
        "tracin vs sgemm": ("sgemm", f"tracin C={c}"),
    }
    checks = [
        *faiss_checks(f"tracin C={c}", "faiss", q_folded, x_folded),
        *faiss_checks(f"tracin 1x{c * d}", "faiss", q_folded, x_folded),
    ]
    yield Case(
        "checkpoints",
        f"C={c} checkpoints of d={d} vs one of d={c * d}, m={m} n={n} top-10",
        {"m": m, "n": n, "C": c, "d": d, "k": k, "weights": weights, "threads": threads},
        contenders,
        ratios,
        checks,
    )


def _materialise(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(n, p*q) float32 rows left[i] (x) right[i]."""
    return (left[:, :, None] * right[:, None, :]).reshape(left.shape[0], -1)


def factored(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """Last-layer factors (left p, right q with a bias column) against the materialised p*q rows."""
    import tracin

    m, n, p, q = sizes.factored
    k = 10
    sides = []
    for rows, tag in ((m, "test"), (n, "train")):
        left = data.matrix(rows, p, f"left-{tag}")
        right = data.matrix(rows, q, f"right-{tag}").copy()
        right[:, -1] = 1.0  # the bias input
        sides.append((left, right))
    test_f, train_f = (tracin.FactoredGradients(left, right) for left, right in sides)
    test_full, train_full = (_materialise(left, right) for left, right in sides)
    index = peers.faiss_index(train_full)
    full = _one_sided(m, n, p * q, k)
    fact = (2.0 * m * n * (p + q) + m * n, n * (p + q) * F32 + m * (p + q) * F32 + m * k * 12.0)
    contenders = [
        Contender("tracin factored", "tracin", _tracin(test_f, train_f, k, "proponents", threads, isa), *fact, threads),
        Contender(
            "tracin materialised",
            "tracin",
            _tracin(test_full, train_full, k, "proponents", threads, isa),
            *full,
            threads,
        ),
        *_faiss("faiss materialised", lambda t: peers.faiss_top_k(index, test_full, k, t), *full, threads),
        Contender(
            "sgemm materialised", "sgemm", peers.bare_sgemm(test_full, train_full), *_dense(m, n, p * q, False), threads
        ),
    ]
    ratios = {
        "factored vs materialised": ("tracin materialised", "tracin factored"),
        "factored vs faiss materialised": (faiss_paths("faiss materialised"), "tracin factored"),
        "factored vs sgemm materialised": ("sgemm materialised", "tracin factored"),
    }
    checks = [
        *faiss_checks("tracin factored", "faiss materialised", test_full, train_full),
        *faiss_checks("tracin materialised", "faiss materialised", test_full, train_full),
    ]
    yield Case(
        "factored",
        f"factored left {p} x right {q} vs materialised {p * q} dims, m={m} n={n} top-10",
        {"m": m, "n": n, "p": p, "q": q, "k": k, "threads": threads, "flop_ratio": (p * q) / (p + q)},
        contenders,
        ratios,
        checks,
    )


def _limited(fn: Callable[[], object], threads: int) -> Callable[[], object]:
    def run():
        with peers.thread_limits(threads):
            return fn()

    return run


def thread_scan(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """1 thread against `threads` threads for tracin, faiss and the bare sgemm."""
    m, _, d = sizes.main
    n = sizes.threads_n
    q, x = data.matrix(m, d, "test"), data.matrix(sizes.main[1], d)[:n]
    index = peers.faiss_index(x)
    flops, nbytes = _one_sided(m, n, d, 10)
    counts = sorted({1, threads})
    contenders, checks, ratios = [], [], {}
    sgemm = peers.bare_sgemm(q, x)
    for t in counts:
        contenders += [
            Contender(f"tracin t={t}", "tracin", _tracin(q, x, 10, "proponents", t, isa), flops, nbytes, t),
            *_faiss(
                f"faiss t={t}",
                lambda blas, t=t: _limited(lambda: peers.faiss_top_k(index, q, 10, blas), t)(),
                flops,
                nbytes,
                t,
            ),
            Contender(f"sgemm t={t}", "sgemm", _limited(sgemm, t), *_dense(m, n, d, False), t),
        ]
        checks += faiss_checks(f"tracin t={t}", f"faiss t={t}", q, x)
    if len(counts) > 1:
        top = counts[-1]
        ratios[f"tracin t=1 -> t={top}"] = ("tracin t=1", f"tracin t={top}")
        ratios[f"faiss t=1 -> t={top}"] = (faiss_paths("faiss t=1"), faiss_paths(f"faiss t={top}"))
        ratios[f"sgemm t=1 -> t={top}"] = ("sgemm t=1", f"sgemm t={top}")
        checks.append(Check(f"tracin t={top}", "tracin t=1", q, x))
    yield Case(
        "threads",
        f"threads {' -> '.join(map(str, counts))}, top-10, m={m} n={n} d={d}",
        {"m": m, "n": n, "d": d, "k": 10, "thread_counts": counts},
        contenders,
        ratios,
        checks,
    )


def n_scan(sizes: Sizes, data: Data, threads: int, isa: str = "native") -> Iterator[Case]:
    """tracin, faiss and the bare sgemm as the train side grows."""
    m, d, ns = sizes.n_scan
    q, x_all = data.matrix(m, d, "scan-test"), data.matrix(max(ns), d)
    for n in ns:
        x = x_all[:n]
        index = peers.faiss_index(x)
        one = _one_sided(m, n, d, 10)
        contenders = [
            Contender("tracin", "tracin", _tracin(q, x, 10, "proponents", threads, isa), *one, threads),
            *_faiss("faiss", lambda t, index=index: peers.faiss_top_k(index, q, 10, t), *one, threads),
            Contender("sgemm", "sgemm", peers.bare_sgemm(q, x), *_dense(m, n, d, False), threads),
        ]
        yield Case(
            f"n={n}",
            f"top-10 with n={n}, m={m} d={d}",
            {"m": m, "n": n, "d": d, "k": 10, "threads": threads, "scan": "n"},
            contenders,
            {"tracin vs faiss": (faiss_paths("faiss"), "tracin"), "tracin vs sgemm": ("sgemm", "tracin")},
            faiss_checks("tracin", "faiss", q, x),
        )
        del index, contenders


GROUPS: dict[str, Callable[[Sizes, Data, int, str], Iterator[Case]]] = {
    "top10": top10,
    "both": both,
    "skinny": skinny,
    "k": k_scan,
    "checkpoints": checkpoints,
    "factored": factored,
    "threads": thread_scan,
    "n": n_scan,
}
