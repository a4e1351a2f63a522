"""tracin.Projection against an independent NumPy re-implementation of the entry generator (the spec
that must hold on every machine), float64 products, JL statistics, determinism and bad input."""

from __future__ import annotations

import json
import math
import warnings

import ml_dtypes
import numpy as np
import pytest

import tracin
from tracin.projection import SPARSE_NONZEROS, LayerMatrix

KINDS = ["rademacher", "gaussian", "sparse"]
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# --- the generator of csrc/src/projection_kernels.hpp, written again in NumPy / Python ints ---


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _row_key(seed: int, stream: int, row: int) -> tuple[np.uint32, np.uint32]:
    base = _mix64(_mix64((seed + GOLDEN) & M64) ^ ((stream * GOLDEN + 0x632BE59BD9B4E019) & M64))
    key = _mix64((base + (row + 1) * GOLDEN) & M64)
    return np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)


def _mix32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _word(key: tuple[np.uint32, np.uint32], g: np.ndarray) -> np.ndarray:
    x = _mix32(g.astype(np.uint32) ^ key[0])
    return _mix32(x ^ key[1] ^ (g >> np.uint64(32)).astype(np.uint32))


def reference_matrix(kind: str, seed: int, dim: int, d: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    """P (dim, d) in float64, columns [offset, offset + d)."""
    k = np.arange(offset, offset + d, dtype=np.uint64)
    p = np.zeros((dim, d))
    if kind == "sparse":
        s = min(SPARSE_NONZEROS, dim)
        for j in range(s):
            w = _word(_row_key(seed, stream, j), k).astype(np.uint64)
            lo, length = j * dim // s, (j + 1) * dim // s - j * dim // s
            pos = lo + (((w & np.uint64(0x7FFFFFFF)) * np.uint64(length)) >> np.uint64(31))
            p[pos.astype(np.int64), np.arange(d)] += np.where(w >> np.uint64(31), -1.0, 1.0)
        return p / math.sqrt(s)
    for i in range(dim):
        key = _row_key(seed, stream, i)
        if kind == "rademacher":
            bits = (_word(key, k >> np.uint64(5)) >> (k & np.uint64(31)).astype(np.uint32)) & np.uint32(1)
            p[i] = np.where(bits, -1.0, 1.0)
        else:  # Box-Muller in float64
            w1 = _word(key, k & ~np.uint64(1)).astype(np.float64)
            w2 = _word(key, k | np.uint64(1)).astype(np.float64)
            u1 = (np.floor(w1 / 256) + 1) * 2.0**-24
            theta = 2 * np.pi * np.floor(w2 / 256) * 2.0**-24
            p[i] = np.sqrt(-2 * np.log(u1)) * np.where(k % 2 == 1, np.sin(theta), np.cos(theta))
    return p / math.sqrt(dim)


def _explicit(proj: tracin.Projection, d: int) -> np.ndarray:
    """P (dim, d) as our kernel applies it: the projections of the unit vectors."""
    return proj.apply(np.eye(d, dtype=np.float32)).T.astype(np.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


# --- the matrix and the product ---


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim,d,seed", [(1, 5, 0), (37, 70, 3), (72, 300, 2**64 - 1)])
def test_entries_match_the_numpy_generator(kind, dim, d, seed):
    ours = _explicit(tracin.Projection(dim, seed, kind), d)
    ref = reference_matrix(kind, seed, dim, d)
    if kind == "gaussian":  # polynomial log / sin / cos versus libm
        np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
    else:
        np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_column_offset_reaches_the_last_int64_column_and_no_further(kind):
    d = 6
    last = 2**63 - 1 - d  # columns [last, 2**63 - 1)
    proj = tracin.Projection(16, 3, kind)
    ours = proj.apply(np.eye(d, dtype=np.float32), column_offset=last).T
    ref = reference_matrix(kind, 3, 16, d, offset=last)
    if kind == "gaussian":
        np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
    else:
        np.testing.assert_array_equal(ours, ref.astype(np.float32))
    for offset in (last + 1, 2**63 - 5, 2**63, 2**64):
        message = rf"^column_offset must be at most 2\*\*63 - 1 - d = {last} for a matrix of d = 6 "
        with pytest.raises(ValueError, match=message):
            proj.apply(np.eye(d, dtype=np.float32), column_offset=offset)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [7, 129])
def test_entries_at_odd_column_offsets_match_the_numpy_generator(kind, offset):
    # Gaussian columns are drawn in (even, odd) pairs: at an odd offset every panel of the kernel
    # starts and ends with half a pair.
    ours = tracin.Projection(40, 3, kind).apply(np.eye(300, dtype=np.float32), column_offset=offset).T
    ref = reference_matrix(kind, 3, 40, 300, offset=offset)
    if kind == "gaussian":
        np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
    else:
        np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_product_matches_float64_reference(kind, rng):
    x = rng.standard_normal((23, 517)).astype(np.float32)
    proj = tracin.Projection(130, seed=9, kind=kind)
    p = reference_matrix(kind, 9, 130, 517)
    exact = x.astype(np.float64) @ p.T
    bound = np.abs(x.astype(np.float64)) @ np.abs(p.T)
    assert np.all(np.abs(proj.apply(x) - exact) <= 1e-5 * bound + 1e-30)


def test_gaussian_entries_are_standard_normal():
    from scipy import stats

    z = _explicit(tracin.Projection(64, 5, "gaussian"), 400).ravel() * 8.0
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.02 and abs(stats.kurtosis(z)) < 0.1


@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_unit_columns(kind):
    p = _explicit(tracin.Projection(48, 1, kind), 200)
    np.testing.assert_allclose(np.linalg.norm(p, axis=0), 1.0, rtol=1e-6)
    if kind == "sparse":
        assert np.all((p != 0).sum(axis=0) == SPARSE_NONZEROS)


# --- statistics: unbiased inner products, distortion within the JL bound ---


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_unbiased(kind, rng):
    d, dim, seeds = 300, 16, 300
    g = rng.standard_normal(d)
    h = 0.6 * g + 0.8 * rng.standard_normal(d)
    x = np.stack([g, h]).astype(np.float32)
    est = np.array([np.dot(*tracin.Projection(dim, s, kind).apply(x).astype(np.float64)) for s in range(seeds)])
    exact = float(g @ h)
    sigma = math.sqrt((g @ g * (h @ h) + exact**2) / dim)  # per-seed std of the Gaussian kind
    assert abs(est.mean() - exact) < 4 * sigma / math.sqrt(seeds)
    if kind != "sparse":
        assert 0.5 * sigma**2 < est.var() < 1.5 * sigma**2


def _jl_epsilon(k: int, m: int) -> float:
    """Smallest eps <= 1 with k >= 8 ln m / (eps^2 / 2 - eps^3 / 3): by Dasgupta and Gupta's
    proof, all m (m - 1) / 2 pairwise distances then keep within 1 +- eps with probability
    >= 1 - 1 / m^2 for a Gaussian map."""
    assert k >= 48 * math.log(m), "the bound needs eps <= 1"
    lo, hi = 1e-6, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if k >= 8 * math.log(m) / (mid**2 / 2 - mid**3 / 3) else (mid, hi)
    return hi


@pytest.mark.filterwarnings("ignore:.*widens them:RuntimeWarning")  # dim above the width, on purpose
@pytest.mark.parametrize("kind", KINDS)
def test_distortion_within_jl_bound(kind, rng):
    m, d = 30, 2000
    x = rng.standard_normal((m, d))
    x[:5] = np.eye(5, d)  # axis-aligned points
    x[5] = np.ones(d)  # a dense constant point
    x[6, ::7] = 10.0  # a spiky point
    diff = (x[:, None, :] - x[None, :, :])[np.triu_indices(m, 1)].astype(np.float32)
    exact = np.sum(diff.astype(np.float64) ** 2, axis=1)
    worst = []
    for dim in (256, 1024, 4096):
        y = tracin.Projection(dim, 11, kind).apply(diff).astype(np.float64)
        distortion = np.abs(np.sum(y**2, axis=1) / exact - 1)
        assert distortion.max() <= _jl_epsilon(dim, m), (dim, distortion.max())
        worst.append(distortion.max())
    assert worst[2] < worst[0] / 2  # distortion shrinks like 1 / sqrt(dim)


# --- determinism ---


@pytest.mark.parametrize("kind", KINDS)
def test_same_bits_for_any_chunking_threads_and_split(kind, rng):
    x = rng.standard_normal((50, 700)).astype(np.float32)
    proj = tracin.Projection(100, 4, kind)
    whole = proj.apply(x, num_threads=1)
    assert np.array_equal(proj.apply(x, num_threads=3), whole)
    assert np.array_equal(np.concatenate([proj.apply(x[a:b]) for a, b in [(0, 1), (1, 17), (17, 50)]]), whole)
    assert np.array_equal(proj.apply([x[:, :3], x[:, 3:400], x[:, 400:]]), whole)
    assert np.array_equal(tracin.Projection(100, 4, kind).apply(x), whole)  # same spec, same bits
    assert not np.array_equal(tracin.Projection(100, 5, kind).apply(x), whole)
    # Pieces projected alone at their column offsets sum to the whole (up to rounding).
    parts = proj.apply(x[:, :250]) + proj.apply(x[:, 250:], column_offset=250)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-4)


def test_num_threads_beyond_the_usable_cores_is_capped(monkeypatch, rng):
    """num_threads=4096 on 2 cores started 4096 kernel threads: gaussian 20000 x 1024 -> 1024 took
    5.3 s against 1.6 s, with 475 MB against 272 MB (review107 F4). The kernel is handed at most the
    usable cores, as in scoring (whole rows, per layer, Kronecker layers, factored), with the same bits."""
    seen = []
    real = tracin.projection._core.project
    monkeypatch.setattr(
        tracin.projection._core, "project", lambda *a, **kw: seen.append(kw["num_threads"]) or real(*a, **kw)
    )
    monkeypatch.setattr(tracin._validate, "usable_cores", lambda: 2)
    x = rng.standard_normal((30, 8 * 10 + 8 + 20)).astype(np.float32)
    calls = {
        "whole": lambda p, t: p.apply(x, num_threads=t),
        "per_layer": lambda p, t: p.apply(x, segments=[50, 58], num_threads=t),
        "kronecker": lambda p, t: p.apply(x, segments=[LayerMatrix(8, 10, bias=True), 20], num_threads=t),
        "factored": lambda p, t: np.concatenate(p.apply_factored(x[:, :40], x[:, 40:], num_threads=t), axis=1),
    }
    for name, call in calls.items():
        proj = tracin.Projection(
            24, 3, "gaussian", per_layer=name in ("per_layer", "kronecker"), kronecker=name == "kronecker"
        )
        for threads, expected in ((None, 0), (1, 1), (2, 2), (3, 2), (4096, 2)):
            seen.clear()
            got = call(proj, threads)
            if threads is None:
                first = got
            assert np.array_equal(got, first), (name, threads)
            assert seen and set(seen) == {expected}, (name, threads, seen)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_many_rows_same_bits_as_row_chunks(kind, rng):
    # More rows than one dense task takes (4096) and than one tile of rows (96).
    x = rng.standard_normal((4203, 45)).astype(np.float32)
    proj = tracin.Projection(40, 2, kind)
    whole = proj.apply(x, num_threads=2)
    chunks = np.concatenate([proj.apply(x[a:b], num_threads=1) for a, b in [(0, 97), (97, 4100), (4100, 4203)]])
    assert np.array_equal(chunks, whole)
    ref = x.astype(np.float64) @ reference_matrix(kind, 2, 40, 45).T
    np.testing.assert_allclose(whole, ref, rtol=1e-4, atol=1e-4)


def test_columns_do_not_depend_on_d():
    proj = tracin.Projection(20, 8)
    assert np.array_equal(_explicit(proj, 300)[:, :100], _explicit(proj, 100))


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_and_framework_inputs(kind, rng):
    import jax.numpy as jnp
    import torch

    x = rng.standard_normal((9, 300)).astype(np.float32)
    proj = tracin.Projection(40, 2, kind)
    for low in (np.float16, ml_dtypes.bfloat16):
        xl = x.astype(low)
        assert np.array_equal(proj.apply(xl), proj.apply(xl.astype(np.float32)))
    xb = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(proj.apply(xb), proj.apply(xb.float().numpy()))
    assert np.array_equal(proj.apply(torch.from_numpy(x).requires_grad_()), proj.apply(x))
    assert np.array_equal(proj.apply(jnp.asarray(x)), proj.apply(x))
    assert np.array_equal(proj.apply(x[:, ::2]), proj.apply(np.ascontiguousarray(x[:, ::2])))


# --- per-layer and factored ---


@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_projects_each_segment_on_its_own(kind, rng):
    x = rng.standard_normal((6, 90)).astype(np.float32)
    proj = tracin.Projection(11, 3, kind, per_layer=True)
    assert proj.segment_dims(3) == [4, 4, 3]
    y = proj.apply(x, segments=[20, 1, 69])
    starts, out = [0, 20, 21, 90], [0, 4, 8, 11]
    for j in range(3):
        p = reference_matrix(kind, 3, proj.segment_dims(3)[j], starts[j + 1] - starts[j], stream=1 + j)
        np.testing.assert_allclose(
            y[:, out[j] : out[j + 1]], x[:, starts[j] : starts[j + 1]] @ p.T, rtol=1e-4, atol=1e-5
        )
    assert np.array_equal(proj.apply([x[:, :20], x[:, 20:21], x[:, 21:]]), y)  # pieces as segments
    assert np.array_equal(proj.apply([x[:, :5], x[:, 5:]], segments=[20, 1, 69]), y)


def test_factored_dims():
    assert tracin.Projection(2048).factored_dims == (64, 32)
    assert tracin.Projection(12).factored_dims == (4, 3)
    assert tracin.Projection(7).factored_dims == (7, 1)


def _largest_divisor_up_to_sqrt(n: int) -> int:
    """Reference: the largest divisor of n not above sqrt(n), from n's prime factors (trial division)."""
    factors, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    factors += [m] if m > 1 else []
    divisors = {1}
    for f in factors:
        divisors |= {d * f for d in divisors}
    return max(d for d in divisors if d * d <= n)


@pytest.mark.parametrize(
    "dim", [1, 2, 36, 97, 2**20, 3 * 5 * 7 * 11 * 13 * 17, 2**31 - 1, 2**31 - 2, 2147483629, 2**31, 46337 * 46327]
)
def test_factored_dims_up_to_the_largest_dim(dim):
    dr = _largest_divisor_up_to_sqrt(dim)
    assert tracin.Projection(dim).factored_dims == (dim // dr, dr)


def test_dims_above_the_maximum_are_refused_naming_dim():
    assert tracin.projection.MAX_DIM == 2**31
    for dim in (2**31 + 1, 10**14, 2**62):  # factoring 2**62 - 57 by trial division took minutes
        with pytest.raises(ValueError, match=rf"dim must be at most 2\*\*31 = 2147483648 .* got {dim}"):
            tracin.Projection(dim)
        with pytest.raises(ValueError, match="dim must be at most 2"):
            tracin.Projection.kronecker_dims(dim, LayerMatrix(3, 4))
        with pytest.raises(ValueError, match="dim must be at most 2"):
            tracin.Projection.from_dict({**tracin.Projection(8).to_dict(), "dim": dim})
    with pytest.raises(ValueError, match="dim must be at most 2"):
        tracin.Projection(8, per_layer=True).project_segment(np.ones((1, 3), np.float32), 0, 3, 2**32)


@pytest.mark.parametrize("kind", KINDS)
def test_factored_is_a_kronecker_projection(kind, rng):
    left, right = rng.standard_normal((5, 30)), rng.standard_normal((5, 8))
    proj = tracin.Projection(24, 6, kind)
    lp, rp = proj.apply_factored(left.astype(np.float32), right.astype(np.float32))
    assert lp.shape == (5, 6) and rp.shape == (5, 4)
    pl = reference_matrix(kind, 6, 6, 30, stream=1 << 62)
    pr = reference_matrix(kind, 6, 4, 8, stream=(1 << 62) + 1)
    full = np.einsum("np,nq->npq", left, right).reshape(5, -1)
    kron = np.einsum("np,nq->npq", lp, rp).reshape(5, -1)
    np.testing.assert_allclose(kron, full @ np.kron(pl, pr).T, rtol=1e-4, atol=1e-5)


def test_factored_inner_products_unbiased(rng):
    left, right = rng.standard_normal((2, 40)), rng.standard_normal((2, 10))
    exact = float(left[0] @ left[1] * (right[0] @ right[1]))
    est = []
    for seed in range(300):
        lp, rp = tracin.Projection(64, seed).apply_factored(left.astype(np.float32), right.astype(np.float32))
        est.append(float(lp[0] @ lp[1]) * float(rp[0] @ rp[1]))
    assert abs(np.mean(est) - exact) < 4 * np.std(est) / math.sqrt(len(est))


# --- the spec ---


def test_spec_round_trip_and_equality():
    proj = tracin.Projection(512, 7, "sparse", per_layer=True)
    spec = json.loads(json.dumps(proj.to_dict()))
    assert tracin.Projection.from_dict(spec) == proj
    assert hash(tracin.Projection.from_dict(spec)) == hash(proj)
    assert proj != tracin.Projection(512, 7, "sparse")
    proj.check_compatible(spec)
    proj.check_compatible(tracin.Projection(512, 7, "sparse", per_layer=True))


def test_mismatch_names_what_differs():
    proj = tracin.Projection(512, 7)
    with pytest.raises(ValueError, match=r"dim: 512 here, 256.*seed: 7 here, 8"):
        proj.check_compatible(tracin.Projection(256, 8))
    with pytest.raises(ValueError, match="kind: 'rademacher' here, 'gaussian'"):
        proj.check_compatible(tracin.Projection(512, 7, "gaussian").to_dict())
    with pytest.raises(ValueError, match="not projected"):
        proj.check_compatible(None)
    with pytest.raises(ValueError, match="generator version"):
        tracin.Projection.from_dict({**proj.to_dict(), "generator": 99})
    with pytest.raises(ValueError, match="not a tracin.Projection"):
        tracin.Projection.from_dict({"dim": 3})


def test_values_of_a_spec_are_quoted_cut_short_in_errors():
    # review140 F4: a store's metadata['projection'] (up to a 64 MiB manifest) was quoted whole: a 1 MB error line
    long = "x" * 100_000
    spec = tracin.Projection(8).to_dict()
    cases = [
        (lambda: tracin.Projection.from_dict({**spec, "kind": long}), ValueError, "kind must be one of"),
        (lambda: tracin.Projection.from_dict({**spec, "kind": [long]}), TypeError, "kind must be a str"),
        (lambda: tracin.Projection.from_dict({**spec, "generator": long}), ValueError, "generator version 'xxx"),
        (lambda: tracin.Projection.from_dict({"type": long}), ValueError, "not a tracin.Projection spec"),
        (lambda: tracin.Projection(8).check_compatible({**spec, "kind": long}), ValueError, "kind: 'rademacher' here"),
        (lambda: tracin.Projection(8).check_compatible({**spec, "seed": long}), ValueError, "seed: 0 here, 'xxx"),
        (lambda: tracin.Projection(8).check_compatible({**spec, "dim": [long]}), ValueError, "dim: 8 here, ['xxx"),
        (
            lambda: tracin.Projection(8, kronecker=True, per_layer=True).apply(
                np.ones((1, 4), np.float32), segments=[{long: 1}]
            ),
            ValueError,
            "segments entry {'xxx",
        ),
        (
            lambda: tracin.Projection(8, kronecker=True, per_layer=True).kronecker_dims(8, {long: 1}),
            TypeError,
            "layer: {'xxx",
        ),
        (
            lambda: tracin.Projection(8, per_layer=True).apply(np.ones((1, 4), np.float32), segments=long),
            TypeError,
            "segments must be a sequence",
        ),
    ]
    for call, error, start in cases:
        with pytest.raises(error) as failure:
            call()
        text = str(failure.value)
        assert start in text and len(text) < 600, (start, len(text), text[:300])


@pytest.mark.parametrize(
    "field,value,shown",
    [
        ("dim", 10**4000, "got 100000000000... (4001 digits)"),
        ("dim", 2 * 10**5000 + 7, "got 200000000000... (5001 digits)"),  # beyond str(int)'s 4300 digits
        ("dim", -(10**30) - 1, "got -100000000000... (31 digits)"),
        ("seed", 10**4000 - 1, "got 999999999999... (4000 digits)"),
        ("dim", 10**23, "got 100000000000000000000000"),  # below 10**24: in full
    ],
    ids=["4001-digits", "5001-digits", "negative", "seed", "in-full"],
)
def test_huge_ints_of_a_spec_are_cut_short_in_errors(field, value, shown):
    # review153 F5: a 4001-digit dim in a store's metadata['projection'] made a 4497-character error line
    with pytest.raises(ValueError) as failure:
        tracin.Projection.from_dict({**tracin.Projection(8).to_dict(), field: value})
    text = str(failure.value)
    assert text.endswith(shown) and len(text) < 300, text[:300]


# --- bad input ---


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((0,), {}, ValueError, "dim must be >= 1"),
        ((1.5,), {}, TypeError, "dim must be an int"),
        ((True,), {}, TypeError, "dim must be an int"),
        ((8, -1), {}, ValueError, "seed must be in"),
        ((8, 2**64), {}, ValueError, "seed must be in"),
        ((8, 0, "dense"), {}, ValueError, "kind must be one of"),
        (
            (8, 0, ["gaussian"]),
            {},
            TypeError,
            r"kind must be a str, one of \['gaussian', 'rademacher', 'sparse'\], got list",
        ),
        ((8,), {"kind": {"sparse": 1}}, TypeError, "kind must be a str"),
        ((8,), {"per_layer": 1}, TypeError, "per_layer must be a bool"),
    ],
)
def test_bad_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tracin.Projection(*args, **kwargs)


def test_bad_apply_input(rng):
    proj = tracin.Projection(8)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    with pytest.raises(ValueError, match="must be 2-D"):
        proj.apply(x[0])
    with pytest.raises(TypeError, match="float64"):
        proj.apply(x.astype(np.float64))
    with pytest.raises(TypeError, match="int32"):
        proj.apply(x.astype(np.int32))
    with pytest.raises(ValueError, match="no columns"):
        proj.apply(np.zeros((4, 0), np.float32))
    with pytest.raises(ValueError, match="same number of rows"):
        proj.apply([x, x[:3]])
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        proj.apply(x, num_threads=0)
    with pytest.raises(ValueError, match="column_offset must be >= 0"):
        proj.apply(x, column_offset=-1)
    with pytest.raises(ValueError, match="same number of rows"):
        proj.apply_factored(x, x[:2])
    for kind in KINDS:
        bad = x.copy()
        bad[2, 3] = np.nan
        with pytest.raises(ValueError, match="row 2 is not finite"):
            tracin.Projection(8, kind=kind).apply(bad)
    assert proj.apply(np.zeros((0, 10), np.float32)).shape == (0, 8)


def test_bad_segments(rng):
    x = rng.standard_normal((4, 10)).astype(np.float32)
    layered = tracin.Projection(3, per_layer=True)
    with pytest.raises(ValueError, match="sum to the number of columns 10"):
        layered.apply(x, segments=[4, 4])
    with pytest.raises(ValueError, match="4 segments need dim >= 4"):
        layered.apply(x, segments=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="segments entry must be >= 1"):
        layered.apply(x, segments=[10, 0])
    with pytest.raises(ValueError, match="column_offset applies with per_layer=False only"):
        layered.apply(x, column_offset=3)
    with pytest.raises(ValueError, match="segments applies with per_layer=True only"):
        tracin.Projection(3).apply(x, segments=[4, 6])  # was ignored
    for bad in (10, np.int64(10), np.array(10), "ab", {"rows": 2, "cols": 5}):
        with pytest.raises(TypeError, match="segments must be a sequence of the segments' widths"):
            layered.apply(x, segments=bad)
    assert np.array_equal(layered.apply(x, segments=(w for w in [4, 6])), layered.apply(x, segments=[4, 6]))


def test_a_list_of_rows_is_not_taken_for_pieces(rng):
    x = rng.standard_normal((4, 10)).astype(np.float32)
    proj = tracin.Projection(8)
    message = "matrix must be a 2-D array or a sequence of 2-D pieces taken side by side"
    with pytest.raises(TypeError, match=rf"{message}, got a list whose item 0 is a list \(rows given as a list"):
        proj.apply(x.tolist())
    with pytest.raises(TypeError, match=rf"{message}, got a tuple whose item 1 is a float"):
        proj.apply((x, 1.0))
    with pytest.raises(ValueError, match=rf"{message}, got a list whose item 0 is of shape \(10,\)"):
        proj.apply(list(x))
    with pytest.raises(ValueError, match=rf"{message}, got a list whose item 1 is of shape \(1, 4, 10\)"):
        proj.apply([x, x[None]])
    assert np.array_equal(proj.apply([x[:, :3], x[:, 3:]]), proj.apply(x))


def test_a_non_finite_row_error_has_a_public_name_and_is_a_value_error(rng):
    x = rng.standard_normal((4, 10)).astype(np.float32)
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="row 2 is not finite") as caught:
        tracin.Projection(8).apply(x)
    assert type(caught.value) is tracin.projection.NonFiniteRowError and caught.value.row == 2
    assert not type(caught.value).__name__.startswith("_")


def test_an_export_takes_a_projection_only():
    from tracin._export.projection import check_projection, project

    class Mine:  # apply and to_dict, but not a tracin.Projection
        def apply(self, rows):
            return rows[:, :2]

        def to_dict(self):
            return {"type": "mine"}

        def apply_factored(self, left, right):
            return left, right

    for factored in (False, True):
        with pytest.raises(TypeError, match=r"projection must be a tracin.Projection .* got Mine, which is not one"):
            check_projection(Mine(), factored=factored)
    check_projection(tracin.Projection(4), factored=False)
    # the parameter widths go to apply only when it projects per layer
    x = np.arange(20, dtype=np.float32).reshape(2, 10)
    assert np.array_equal(project(tracin.Projection(4), x, [4, 6]), tracin.Projection(4).apply(x))
    layered = tracin.Projection(4, per_layer=True)
    assert np.array_equal(project(layered, x, [4, 6]), layered.apply(x, segments=[4, 6]))


# --- Kronecker (kronecker=True) ---

KRONECKER = 1 << 61  # the streams of segment j: KRONECKER + 2j (rows), + 2j + 1 (columns)


def _layer_grid(g: np.ndarray, layer: LayerMatrix) -> np.ndarray:
    """(n, rows, cols [+ 1]) float64 matrices of a LayerMatrix segment's flat columns, written out."""
    n, weights = g.shape[0], layer.rows * layer.cols
    w = g[:, :weights].astype(np.float64)
    w = w.reshape(n, layer.cols, layer.rows).transpose(0, 2, 1) if layer.transposed else w.reshape(n, layer.rows, -1)
    return np.concatenate([w, g[:, weights:, None]], axis=2) if layer.bias else w


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias,transposed", [(False, False), (True, False), (True, True), (False, True)])
def test_kronecker_segments_are_the_kronecker_product_of_two_generated_matrices(kind, bias, transposed, rng):
    layer = LayerMatrix(9, 5, bias=bias, transposed=transposed)
    x = rng.standard_normal((4, 7 + layer.width + 3)).astype(np.float32)
    proj = tracin.Projection(3 * 12, 4, kind, per_layer=True, kronecker=True)
    y = proj.apply(x, segments=[7, layer, 3])
    assert y.shape == (4, 36) and proj.segment_dims(3) == [12, 12, 12]
    k_rows, k_cols = proj.kronecker_dims(12, layer)
    assert (k_rows, k_cols) == (4, 3)  # the larger factor on the larger side (9 rows)
    p_rows = reference_matrix(kind, 4, k_rows, 9, stream=KRONECKER + 2)
    p_cols = reference_matrix(kind, 4, k_cols, 5 + bias, stream=KRONECKER + 3)
    grid = _layer_grid(x[:, 7 : 7 + layer.width], layer)
    want = grid.reshape(4, -1) @ np.kron(p_rows, p_cols).T
    np.testing.assert_allclose(y[:, 12:24], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # plain segments are projected as with per_layer alone, on streams 1 + j
    np.testing.assert_allclose(y[:, :12], x[:, :7] @ reference_matrix(kind, 4, 12, 7, stream=1).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        y[:, 24:], x[:, -3:] @ reference_matrix(kind, 4, 12, 3, stream=3).T, rtol=1e-4, atol=1e-5
    )
    f_rows, f_cols = proj.layer_factors(1, layer, 12)
    np.testing.assert_allclose(f_rows, p_rows, rtol=1e-6)
    np.testing.assert_allclose(f_cols, p_cols, rtol=1e-6)
    assert not f_rows.flags.writeable
    # the same from each segment's columns alone, from dict specs, from half precision, from pieces
    np.testing.assert_array_equal(proj.project_segment(x[:, 7 : 7 + layer.width], 1, layer, 12), y[:, 12:24])
    assert np.array_equal(proj.apply(x, segments=[7, layer.to_dict(), 3]), y)
    assert np.array_equal(proj.apply([x[:, :10], x[:, 10:]], segments=[7, layer, 3]), y)
    half = x.astype(np.float16)
    np.testing.assert_array_equal(
        proj.apply(half.astype(ml_dtypes.bfloat16), segments=[7, layer, 3]),
        proj.apply(half.astype(ml_dtypes.bfloat16).astype(np.float32), segments=[7, layer, 3]),
    )
    np.testing.assert_array_equal(
        proj.apply(half, segments=[7, layer, 3]), proj.apply(half.astype(np.float32), segments=[7, layer, 3])
    )


def test_kronecker_per_token_sum_equals_the_projected_gradient(rng):
    """sum_t (P_rows b_t)(P_cols [a_t, 1])^T is the projection of sum_t b_t [a_t, 1]^T (what tracin.torch uses)."""
    a, b = rng.standard_normal((6, 10)), rng.standard_normal((6, 8))
    layer = LayerMatrix(8, 10, bias=True)
    proj = tracin.Projection(20, 1, per_layer=True, kronecker=True)
    p_rows, p_cols = (f.astype(np.float64) for f in proj.layer_factors(0, layer, 20))
    a1 = np.hstack([a, np.ones((6, 1))])
    per_token = sum(np.outer(p_rows @ b[t], p_cols @ a1[t]) for t in range(6)).reshape(1, -1)
    grad = sum(np.outer(b[t], a1[t]) for t in range(6))  # (8, 11): [dW | dc]
    flat = np.concatenate([grad[:, :10].reshape(-1), grad[:, 10]])[None].astype(np.float32)
    np.testing.assert_allclose(proj.apply(flat, segments=[layer]), per_token, rtol=1e-5, atol=1e-5)


def test_kronecker_inner_products_unbiased(rng):
    g = rng.standard_normal((2, 6 * 5)).astype(np.float32)
    exact = float(g[0].astype(np.float64) @ g[1])
    est = [
        float(
            np.prod(
                tracin.Projection(16, s, per_layer=True, kronecker=True).apply(g, segments=[LayerMatrix(6, 5)]), 0
            ).sum()
        )
        for s in range(300)
    ]
    assert abs(np.mean(est) - exact) < 4 * np.std(est) / math.sqrt(len(est))


def test_kronecker_spec_is_recorded_and_refused_against_other_projections():
    proj = tracin.Projection(64, 2, per_layer=True, kronecker=True)
    spec = json.loads(json.dumps({**proj.to_dict(), "segments": [3, LayerMatrix(4, 2).to_dict()]}))
    assert tracin.Projection.from_dict(spec) == proj and hash(tracin.Projection.from_dict(spec)) == hash(proj)
    assert repr(proj) == "Projection(dim=64, seed=2, kind='rademacher', per_layer=True, kronecker=True)"
    proj.check_compatible(spec)
    plain = tracin.Projection(64, 2, per_layer=True)
    assert "kronecker" not in plain.to_dict()  # specs written before kronecker existed stay equal
    for a, b in ((proj, plain), (plain, proj), (plain, spec)):
        with pytest.raises(ValueError, match="kronecker: (True here, False|False here, True)"):
            a.check_compatible(b)


def test_bad_kronecker_use(rng):
    x = rng.standard_normal((2, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="kronecker=True projects layer by layer: pass per_layer=True"):
        tracin.Projection(8, kronecker=True)
    with pytest.raises(TypeError, match="kronecker must be a bool"):
        tracin.Projection(8, per_layer=True, kronecker="yes")
    with pytest.raises(ValueError, match="a LayerMatrix entry needs a Projection\\(..., kronecker=True\\)"):
        tracin.Projection(8, per_layer=True).apply(x, segments=[LayerMatrix(3, 4)])
    proj = tracin.Projection(8, per_layer=True, kronecker=True)
    with pytest.raises(ValueError, match="sum to the number of columns 12, got sum 15"):
        proj.apply(x, segments=[LayerMatrix(3, 4, bias=True)])
    with pytest.raises(ValueError, match="not a LayerMatrix spec"):
        proj.apply(x, segments=[{"rows": 3, "columns": 4}])
    with pytest.raises(ValueError, match="LayerMatrix.rows must be >= 1"):
        LayerMatrix(0, 4)
    with pytest.raises(TypeError, match="LayerMatrix.bias must be a bool"):
        LayerMatrix(3, 4, bias=1)
    with pytest.raises(ValueError, match="matrix has 12 columns, segment .* covers 15"):
        proj.project_segment(x, 0, LayerMatrix(3, 4, bias=True), 8)
    with pytest.raises(ValueError, match="not factored rows"):
        proj.apply_factored(x, x)
    with pytest.raises(ValueError, match="layer_factors needs"):
        tracin.Projection(8, per_layer=True).layer_factors(0, LayerMatrix(3, 4), 8)
    bad = x.copy()
    bad[1, 5] = np.inf
    with pytest.raises(ValueError, match="row 1 is not finite"):
        proj.apply(bad, segments=[LayerMatrix(3, 4)])


@pytest.mark.parametrize(
    "layer,dim,want",
    [
        (LayerMatrix(3, 64, bias=True), 1024, (3, 65)),  # both sides small: the exact gradient, 829 zeros after
        (LayerMatrix(3, 1000), 1024, (3, 341)),  # the 3 rows kept, the columns take 1024 // 3
        (LayerMatrix(1000, 20, transposed=True), 4096, (204, 20)),
        (LayerMatrix(40, 40), 67, (40, 1)),  # a prime share: 67 x 1, the 67 capped at 40
        (LayerMatrix(9, 5), 12, (4, 3)),  # no side smaller than its factor: the balanced factors
    ],
)
def test_kronecker_factors_are_capped_at_their_sides(layer, dim, want):
    assert tracin.Projection.kronecker_dims(dim, layer) == want
    assert tracin.Projection.kronecker_dims(dim, layer.to_dict()) == want


@pytest.mark.parametrize("kind", KINDS)
def test_a_small_layer_fills_the_first_columns_of_its_share_and_leaves_zeros(kind, rng):
    proj = tracin.Projection(2 * 64, 3, kind, per_layer=True, kronecker=True)
    whole, wide = LayerMatrix(3, 7, bias=True), LayerMatrix(3, 40)  # (3, 8) kept as is; (3, 21 of 40)
    x = rng.standard_normal((5, whole.width + wide.width)).astype(np.float32)
    y = proj.apply(x, segments=[whole, wide])
    assert proj.kronecker_dims(64, whole) == (3, 8) and proj.kronecker_dims(64, wide) == (3, 21)
    np.testing.assert_array_equal(y[:, :24], _layer_grid(x[:, : whole.width], whole).reshape(5, -1).astype(np.float32))
    p_cols = reference_matrix(kind, 3, 21, 40, stream=KRONECKER + 3)
    want = (_layer_grid(x[:, whole.width :], wide) @ p_cols.T).reshape(5, -1)  # P_rows is the 3 x 3 identity
    np.testing.assert_allclose(y[:, 64 : 64 + 63], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not y[:, 24:64].any() and not y[:, 127:].any()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "pieces"])
def test_kronecker_rows_are_projected_in_blocks_with_the_same_bits(dtype, rng, monkeypatch):
    import tracemalloc

    from tracin import projection as module

    layer = LayerMatrix(96, 80, bias=True)
    g = rng.standard_normal((48, 5 + layer.width)).astype(np.float32)
    x = {"float16": g.astype(np.float16), "bfloat16": g.astype(ml_dtypes.bfloat16)}.get(dtype, g)
    x = [x[:, :2000], x[:, 2000:]] if dtype == "pieces" else x
    proj = tracin.Projection(2 * 1024, per_layer=True, kronecker=True)
    monkeypatch.setattr(module, "_BLOCK_BYTES", 1 << 40)
    whole = proj.apply(x, segments=[5, layer])
    monkeypatch.setattr(module, "_BLOCK_BYTES", 1 << 16)  # a few rows at a time
    tracemalloc.start()
    try:
        blocked = proj.apply(x, segments=[5, layer])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(blocked, whole)
    head = [piece[:7] for piece in x] if dtype == "pieces" else x[:7]
    np.testing.assert_array_equal(proj.apply(head, segments=[5, layer]), whole[:7])  # any batch size
    # the output plus blocks of a few rows; all rows at once hold 48 x (96 x 32 + 32 x 32 [+ 7761]) float32
    assert peak < blocked.nbytes + 16 * (96 * 32 + 32 * 32 + layer.width) * 4


def test_kronecker_dims_and_layer_factors_name_a_layer_of_the_wrong_type():
    proj = tracin.Projection(8, per_layer=True, kronecker=True)
    with pytest.raises(TypeError, match="layer must be a LayerMatrix \\(or its to_dict\\(\\)\\), got int"):
        tracin.Projection.kronecker_dims(64, 5)
    with pytest.raises(TypeError, match="layer must be a LayerMatrix .*got str"):
        proj.layer_factors(0, "fc", 8)
    with pytest.raises(TypeError, match="layer: .* is not a LayerMatrix spec"):
        proj.layer_factors(0, {"rows": 3}, 8)
    assert [f.shape for f in proj.layer_factors(0, {"rows": 4, "cols": 5}, 8)] == [(2, 4), (4, 5)]


_THREADS_SCRIPT = """
import hashlib, sys
import numpy as np
import tracin
from tracin.projection import LayerMatrix
proj = tracin.Projection(2 * 1024, 3, sys.argv[1], per_layer=True, kronecker=True)
rng = np.random.default_rng(0)
digest = hashlib.sha256()
for layer in (LayerMatrix(300, 700, bias=True), LayerMatrix(200, 300, bias=True, transposed=True)):
    x = rng.standard_normal((9, layer.width)).astype(np.float32)
    y = proj.apply(x, segments=[layer], num_threads=int(sys.argv[2]))
    digest.update(y.tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_kronecker_bits_do_not_depend_on_blas_or_kernel_threads(kind):
    import os
    import subprocess
    import sys

    digests = set()
    for threads in ("1", "2"):
        env = {**os.environ, **{v: threads for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
        done = subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT, kind, threads], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        digests.add(done.stdout.strip())
    assert len(digests) == 1, digests


@pytest.mark.parametrize("transposed", [False, True])
def test_kronecker_overflow_names_the_row_like_the_dense_path(transposed, rng, monkeypatch):
    from tracin import projection as module

    layer = LayerMatrix(8, 8, bias=True, transposed=transposed)
    x = rng.standard_normal((5, layer.width)).astype(np.float32)
    x[3] = 2e38  # finite, but the products overflow float32
    proj = tracin.Projection(16, per_layer=True, kronecker=True)
    monkeypatch.setattr(module, "_BLOCK_BYTES", 1)  # a row at a time: rows numbered across blocks
    message = "the projection of row 3 is not finite: the input holds NaN or Inf, or its values overflow float32"
    with pytest.raises(ValueError, match=message):
        proj.apply(x, segments=[layer])
    with pytest.raises(ValueError, match=message):
        proj.project_segment(x, 0, layer, 16)
    with pytest.raises(ValueError, match=message.replace("row 3", "row 0")):
        tracin.Projection(16).apply(x[3:])  # the dense path's message
    assert np.isfinite(proj.apply(x[:3], segments=[layer])).all()


# --- rows whose unscaled sums pass FLT_MAX while their projection is finite (review67 F1) ---

FLT_MAX = float(np.finfo(np.float32).max)


def _aligned_row(p: np.ndarray, top: float) -> np.ndarray:
    """(d,) float32: a row whose float64 projection by p (dim, d) has max |.| = top, its signs those of
    p's row with the largest sum of |entries| (so that output sums its columns with one sign: the
    kernel's unscaled sum is top times sqrt(dim) there, sqrt(8) for the sparse kind)."""
    signs = np.where(p[np.argmax(np.abs(p).sum(axis=1))] < 0, -1.0, 1.0)
    return (signs * (top / np.abs(p @ signs).max())).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_a_finite_projection_whose_unscaled_sum_overflows_is_returned(kind, rng):
    dim, d = 256, 512
    proj = tracin.Projection(dim, seed=3, kind=kind)
    p = reference_matrix(kind, 3, dim, d)
    x = rng.standard_normal((6, d)).astype(np.float32)
    x[1] = _aligned_row(p, 2e38)  # a projection of 2e38 at most: the kernel's sums reach 2e38 * 16 (sparse: * 2.8)
    x[4] = _aligned_row(p, 5e37) * np.float32(-1)
    y = proj.apply(x, num_threads=2)
    assert np.isfinite(y).all()
    want = x.astype(np.float64) @ p.T
    bound = np.abs(x).astype(np.float64) @ np.abs(p).T  # the float32 chains' rounding, relative to it
    np.testing.assert_array_less(np.abs(y - want), 1e-5 * bound + 1e-30)
    assert np.abs(y[1]).max() > 1.9e38
    # The other rows keep the bits of a batch without the large ones, whatever the threads.
    normal = [0, 2, 3, 5]
    np.testing.assert_array_equal(y[normal], proj.apply(x[normal], num_threads=1))
    np.testing.assert_array_equal(y[[1, 4]], proj.apply(x[[4, 1]], num_threads=1)[::-1])
    # A projection beyond float32's range is still refused, naming its row.
    x[3] = np.where(_aligned_row(p, 1.0) < 0, np.float32(-1e38), np.float32(1e38))
    assert np.abs(x[3].astype(np.float64) @ p.T).max() > 2 * FLT_MAX
    with pytest.raises(tracin.projection.NonFiniteRowError, match="the projection of row 3 is not finite") as caught:
        proj.apply(x)
    assert caught.value.row == 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_positive_row_whose_first_kronecker_product_overflows_is_summed_again_by_its_largest_magnitude(kind):
    """r325 K11: a row of G <= 0 (maximum -1e30, minimum about -1e39) whose G P_cols^T passes FLT_MAX while
    P_rows G P_cols^T does not (its large part lies in P_rows' null space): the rescue's shift comes from the
    largest |entry|, not the row maximum (which left the product infinite: a NonFiniteRowError)."""
    from scipy.optimize import nnls

    layer = LayerMatrix(20, 30, bias=True)
    proj = tracin.Projection(64, seed=2, kind=kind, per_layer=True, kronecker=True)
    p_rows, p_cols = (f.astype(np.float64) for f in proj.layer_factors(0, layer, 64))
    v, residual = nnls(np.vstack([p_rows, np.ones(20)]), np.r_[np.zeros(len(p_rows)), 1.0])  # v >= 0, P_rows v = 0
    assert residual < 1e-12
    grid = -1e30 - 1e39 / np.abs(np.outer(v, p_cols.sum(axis=1))).max() * np.outer(v, np.ones(31))
    x = np.concatenate([grid[:, :30].reshape(-1), grid[:, 30]]).astype(np.float32)[None]
    g = _layer_grid(x, layer)
    assert np.abs(g[0] @ p_cols.T).max() > 2 * FLT_MAX and x.max() < 0
    y = proj.apply(x, segments=[layer])
    want = (p_rows @ g @ p_cols.T).reshape(1, -1)
    bound = (np.abs(p_rows) @ np.abs(g) @ np.abs(p_cols).T).reshape(1, -1)
    assert np.isfinite(y).all()
    np.testing.assert_array_less(np.abs(y - want), 1e-5 * bound)


def test_the_overflow_rescue_through_column_offset_and_pieces(rng):
    dim, d = 64, 96
    proj = tracin.Projection(dim, seed=9, kind="gaussian")
    p = reference_matrix("gaussian", 9, dim, d, offset=2**40)
    x = rng.standard_normal((3, d)).astype(np.float32)
    x[0] = _aligned_row(p, 1e38)
    half = x.astype(ml_dtypes.bfloat16)
    y = proj.apply([x[:, :30], half[:, 30:]], column_offset=2**40)
    want = np.hstack([x[:, :30], half[:, 30:].astype(np.float32)]).astype(np.float64) @ p.T
    bound = np.abs(want).max(axis=1, keepdims=True) + np.abs(x).astype(np.float64) @ np.abs(p).T
    np.testing.assert_array_less(np.abs(y - want), 1e-5 * bound)
    assert np.abs(y[0]).max() > 0.9e38
    np.testing.assert_array_equal(y[1:], proj.apply([x[1:, :30], half[1:, 30:]], column_offset=2**40))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_a_finite_kronecker_projection_whose_first_product_overflows_is_returned(kind, transposed, rng):
    """P_rows G P_cols^T within float32 although its first product passes FLT_MAX: rows 2 and 4 (its negation) are
    summed again scaled, and every row is within float32 rounding of the float64 product."""
    layer = LayerMatrix(20, 30, bias=True, transposed=transposed)
    proj = tracin.Projection(64, seed=2, kind=kind, per_layer=True, kronecker=True)
    k_rows, k_cols = proj.kronecker_dims(64, layer)
    p_rows = reference_matrix(kind, 2, k_rows, 20, stream=KRONECKER)
    p_cols = reference_matrix(kind, 2, k_cols, 31, stream=KRONECKER + 1)
    # G = a s_r s_c^T + 1e38 (the product's first factor's null vector) (x) s_c or s_r (x) (the second's):
    # P_rows G P_cols^T peaks at 2e38 (a's term), while the first product (G P_cols^T, or P_rows G when
    # transposed, which is computed first) passes FLT_MAX.
    s_r = np.where(p_rows[0] < 0, -1.0, 1.0)
    s_c = np.where(p_cols[0] < 0, -1.0, 1.0)
    a = 2e38 / np.abs(np.outer(p_rows @ s_r, p_cols @ s_c)).max()
    if transposed:
        null = np.linalg.svd(p_cols)[2][-1]
        grid = a * np.outer(s_r, s_c) + 1e38 / np.abs(null).max() * np.outer(s_r, null)
        first = p_rows @ grid
    else:
        null = np.linalg.svd(p_rows)[2][-1]
        grid = a * np.outer(s_r, s_c) + 1e38 / np.abs(null).max() * np.outer(null, s_c)
        first = grid @ p_cols.T
    assert np.abs(first).max() > 1.5 * FLT_MAX
    weights = grid[:, :30].T if transposed else grid[:, :30]
    big = np.concatenate([weights.reshape(-1), grid[:, 30]]).astype(np.float32)
    x = rng.standard_normal((5, layer.width)).astype(np.float32)
    x[2], x[4] = big, -big  # two such rows, one negated (r325 C2: only the first was summed again)
    y = proj.apply(x, segments=[layer])
    assert np.isfinite(y).all()
    g = _layer_grid(x, layer)
    want = (p_rows @ g @ p_cols.T).reshape(5, -1)
    bound = (np.abs(p_rows) @ np.abs(g) @ np.abs(p_cols).T).reshape(5, -1)
    np.testing.assert_array_less(np.abs(y - want), 1e-5 * bound + 1e-30)
    assert np.abs(y[2]).max() > 1.9e38
    normal = [0, 1, 3, 4]
    np.testing.assert_array_equal(y[normal], proj.apply(x[normal], segments=[layer]))
    np.testing.assert_array_equal(y[2:3], proj.project_segment(x[2:3], 0, layer, 64))
    x[4] = np.float32(1.8) * big  # 3.6e38: beyond float32 whatever the order of the products
    with pytest.raises(tracin.projection.NonFiniteRowError, match="the projection of row 4 is not finite"):
        proj.apply(x, segments=[layer])


def _digest_rows(n: int, d: int, salt: int) -> np.ndarray:
    """(n, d) float32 from integer arithmetic alone; row i scaled by 2**(13 i - 40) (2e-11 to 3e32)."""
    k = np.arange(n * d, dtype=np.int64).reshape(n, d)
    v = ((k * 2654435761 + salt * 97) % 2001 - 1000).astype(np.float64) / 37.0
    return (v * 2.0 ** (np.arange(n) * 13 - 40)[:, None]).astype(np.float32)


# sha256 of the outputs below, computed before the overflow rescue (review67 F1) was added: rows whose
# projection does not overflow keep their bits (stores' projections stay valid).
_DIGESTS = {
    "rademacher": "61399f0815cea1ad810bb683fa0c734ef2d7fa3e78f37554d3043d7d804df851",
    "gaussian": "cd6b9648581e61c80a52725671d0bda652089f532ffe4510e87ca94987dcc2be",
    "sparse": "c9d89dd7c9ae0cfefa3bd209da09a888f957b739f54605ae8b5aae9c0a96c87c",
}


@pytest.mark.parametrize("kind", KINDS)
def test_projection_bits_are_those_recorded_before_the_overflow_rescue(kind):
    import hashlib

    h = hashlib.sha256()
    x = _digest_rows(12, 300, 1)
    h.update(tracin.Projection(100, seed=5, kind=kind).apply(x).tobytes())
    h.update(tracin.Projection(37, seed=6, kind=kind).apply(x, column_offset=2**40).tobytes())
    proj = tracin.Projection(64, seed=7, kind=kind, per_layer=True, kronecker=True)
    segments = [LayerMatrix(10, 12, bias=True), 40, LayerMatrix(6, 20, transposed=True)]
    h.update(proj.apply(_digest_rows(12, 130 + 40 + 120, 2), segments=segments).tobytes())
    left, right = tracin.Projection(64, seed=8, kind=kind).apply_factored(
        _digest_rows(12, 50, 3), _digest_rows(12, 70, 4)
    )
    h.update(left.tobytes())
    h.update(right.tobytes())
    assert h.hexdigest() == _DIGESTS[kind]


# --- LayerMatrix and index checks (review67 F4, F5) ---


def test_layer_matrix_stores_numpy_scalars_as_python_ones():
    layer = LayerMatrix(np.int64(3), np.int32(64), bias=np.bool_(True), transposed=np.bool_(False))
    assert [type(v) for v in (layer.rows, layer.cols, layer.bias, layer.transposed)] == [int, int, bool, bool]
    assert json.loads(json.dumps(layer.to_dict())) == {"rows": 3, "cols": 64, "bias": True, "transposed": False}
    assert layer == LayerMatrix(3, 64, bias=True) and hash(layer) == hash(LayerMatrix(3, 64, bias=True))
    assert repr(layer) == "LayerMatrix(rows=3, cols=64, bias=True, transposed=False)"


def test_segment_index_is_bounded_by_the_most_segments_apply_makes():
    proj = tracin.Projection(16, per_layer=True, kronecker=True)
    x = np.eye(8, dtype=np.float32)
    message = r"index must be in \[0, 2147483647\], got "
    for index in (2**31, 2**61 - 1, 2**63, 2**64):
        with pytest.raises(ValueError, match=message + str(index)):
            proj.project_segment(x, index, 8, 4)
        with pytest.raises(ValueError, match=message + str(index)):
            proj.project_segment(x, index, LayerMatrix(8, 1), 4)
        with pytest.raises(ValueError, match=message + str(index)):
            proj.layer_factors(index, LayerMatrix(4, 4), 4)
    with pytest.raises(ValueError, match=r"index must be in \[0, 2147483647\], got -1"):
        proj.layer_factors(-1, LayerMatrix(4, 4), 4)
    last = proj.project_segment(x, 2**31 - 1, 8, 4)  # the largest index apply can use
    np.testing.assert_allclose(last, x @ reference_matrix("rademacher", 0, 4, 8, stream=2**31).T, rtol=1e-6)
    assert proj.layer_factors(2**31 - 1, LayerMatrix(4, 4), 4)[0].shape == (2, 4)


def test_kronecker_extra_memory_stays_within_the_block_budget(rng, monkeypatch):
    import tracemalloc

    from tracin import projection as module

    layer = LayerMatrix(64, 2048)  # a wide layer: checks on the whole input block would cost block x width
    x = rng.standard_normal((32, layer.width)).astype(np.float32)
    proj = tracin.Projection(64, per_layer=True, kronecker=True)
    monkeypatch.setattr(module, "_BLOCK_BYTES", 1 << 20)
    proj.apply(x[:1], segments=[layer])  # factors cached
    tracemalloc.start()
    try:
        out = proj.apply(x, segments=[layer])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - out.nbytes < 1 << 20


def test_zero_width_piece_is_named_with_per_layer(rng):
    x = rng.standard_normal((7, 37)).astype(np.float32)
    proj = tracin.Projection(8, per_layer=True)
    with pytest.raises(ValueError, match=r"matrix\[0\] has no columns: with per_layer=True and no segments"):
        proj.apply([x[:, :0], x])
    with pytest.raises(ValueError, match=r"^matrix has no columns"):
        proj.apply(x[:, :0])
    np.testing.assert_array_equal(proj.apply([x[:, :0], x], segments=[37]), proj.apply(x, segments=[37]))


def test_num_threads_bounded_like_scoring():
    """num_threads above 4096 is refused naming it (was accepted: 10**8 raised MemoryError from the
    kernel's per-thread workspaces, 2**31 a raw pybind11 TypeError); bools and floats are TypeErrors;
    up to the limit the result is the one-thread result, bit for bit (the kernel's scratch follows the
    threads that run, at most one per task)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    for kind in KINDS:
        proj, layered = tracin.Projection(8, 1, kind), tracin.Projection(8, 1, kind, per_layer=True)
        layer = 10  # a plain segment: its width
        assert np.array_equal(proj.apply(x, num_threads=4096), proj.apply(x, num_threads=1))
        assert np.array_equal(
            layered.project_segment(x, 0, layer, 8, num_threads=4096), layered.project_segment(x, 0, layer, 8)
        )
        for bad in (4097, 10**8, 2**31, 2**64):
            with pytest.raises(ValueError, match=r"num_threads must be a positive integer no larger than 4096"):
                proj.apply(x, num_threads=bad)
            with pytest.raises(ValueError, match=r"num_threads .* no larger than 4096"):
                layered.project_segment(x, 0, layer, 8, num_threads=bad)
            with pytest.raises(ValueError, match=r"num_threads .* no larger than 4096"):
                proj.apply_factored(x, x, num_threads=bad)
        for bad in (True, 2.0, "2"):
            with pytest.raises(TypeError, match="num_threads"):
                proj.apply(x, num_threads=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_ctrl_c_inside_one_long_task(kind):
    """Ctrl-C lands while one kernel task runs (one thread; 1024 rows x 409,600 columns, the same
    block as 200 side-by-side pieces: seconds of work in a single task): KeyboardInterrupt comes within
    a panel of columns (measured ~1-60 ms), not at the task's end (2.6 s dense, 6 s sparse before)."""
    import os
    import signal
    import threading
    import time

    block = np.full((1024, 2048), 0.5, np.float32)
    proj = tracin.Projection(4096 if kind == "sparse" else 256, 3, kind)
    sent = []

    def interrupt():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.3, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            proj.apply([block] * 200, num_threads=1)
        late = time.perf_counter() - sent[0]
    finally:
        timer.cancel()
    assert late < 1.0, f"KeyboardInterrupt {late:.2f} s after SIGINT"


@pytest.mark.filterwarnings("ignore:.*widens them:RuntimeWarning")  # dim above the width, on purpose
def test_factored_rows_refuse_a_per_layer_projection_naming_the_one_to_use(rng):
    # review136 F3: per_layer=True was ignored by apply_factored (same bits as per_layer=False) yet recorded
    left, right = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    expected = r"per_layer=True projection .* use Projection\(16, seed=3, kind='sparse'\) \(per_layer=False\)"
    with pytest.raises(ValueError, match=expected):
        tracin.Projection(16, 3, "sparse", per_layer=True).apply_factored(left, right)
    lp, rp = tracin.Projection(16, 3, "sparse").apply_factored(left, right)
    assert lp.shape == (3, 4) and rp.shape == (3, 4)


def test_no_columns_are_refused_naming_the_argument(rng):
    # review136 F4: the kernel's "the matrix to project has no columns" named no argument
    x = rng.standard_normal((3, 6)).astype(np.float32)
    proj = tracin.Projection(8)
    with pytest.raises(ValueError, match=r"^matrix has no columns"):
        proj.apply(x[:, :0])
    with pytest.raises(ValueError, match=r"^matrix \(its pieces together\) has no columns"):
        proj.apply([x[:, :0], x[:, :0]])
    with pytest.raises(ValueError, match=r"^left has no columns"):
        proj.apply_factored(x[:, :0], x)
    with pytest.raises(ValueError, match=r"^right has no columns"):
        proj.apply_factored(x, x[:, :0])


def test_kronecker_factors_are_freed_with_their_owner_beyond_a_small_cache(monkeypatch):
    # review136 F2: an lru_cache of 64 factors kept 516 MiB for the life of the process
    import gc
    import tracemalloc
    from collections import OrderedDict

    from tracin import projection as module

    monkeypatch.setattr(module, "_FACTOR_CACHE", OrderedDict(), raising=False)
    monkeypatch.setattr(module, "_FACTOR_CACHE_BYTES", 1 << 20, raising=False)
    layer = LayerMatrix(256, 511, bias=True)  # 128 x 128 factors at 16384 dims: 128 + 256 KiB
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        proj = tracin.Projection(16 * 16384, per_layer=True, kronecker=True)
        made = sum(f.nbytes for j in range(16) for f in proj.layer_factors(j, layer, 16384))
        again = proj.layer_factors(15, layer, 16384)  # the most recent: kept, not computed again
        assert all(a is b for a, b in zip(again, proj.layer_factors(15, layer, 16384), strict=True))
        del proj, again
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert made == 16 * (128 * 256 + 128 * 512) * 4
    assert kept <= (1 << 20) + (64 << 10), kept
    assert sum(f.nbytes for f in module._FACTOR_CACHE.values()) <= 1 << 20
    assert module._FACTOR_CACHE_BYTES <= 1 << 20  # the patched bound; the default below
    monkeypatch.undo()
    assert module._FACTOR_CACHE_BYTES <= 64 << 20


def test_apply_and_apply_factored_warn_when_the_output_is_no_narrower(rng):
    """review153 F2: Projection(4096).apply of 10 columns and apply_factored of (3, 9) widened silently."""
    rows = rng.standard_normal((2, 10)).astype(np.float32)
    for proj in (tracin.Projection(4096), tracin.Projection(10, per_layer=True)):
        with pytest.warns(
            RuntimeWarning, match=rf"\.apply projects rows of width 10 to {proj.dim} columns, not fewer"
        ) as w:
            proj.apply(rows, segments=[6, 4] if proj.per_layer else None)
        assert [x.filename for x in w] == [__file__]
    with pytest.warns(RuntimeWarning) as w:
        left, right = tracin.Projection(4096).apply_factored(rows[:, :3], rows[:, :9])
    assert (left.shape, right.shape) == ((2, 64), (2, 64))
    texts = [str(x.message) for x in w if x.category is RuntimeWarning]
    assert len(texts) == 2 and "left factors of width 3 to 64 columns" in texts[0]
    assert "right factors of width 9 to 64 columns" in texts[1] and "factored_dims are below (3, 9)" in texts[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.Projection(9).apply(rows)
        tracin.Projection(9, per_layer=True).apply(rows, segments=[6, 4])
        tracin.Projection(64).apply(rows, column_offset=5)  # a piece of a wider row
        tracin.Projection(16).apply_factored(rows[:, :5], rows)  # (4, 4) below (5, 10)


@pytest.mark.parametrize("store", [False, True])
def test_a_gradient_set_is_refused_by_name_with_the_call_to_use(store, tmp_path, rng):
    """review153 F1: apply(gradient set) failed with "gradient sets can be sliced by contiguous row ranges only"."""
    rows = rng.standard_normal((4, 6)).astype(np.float32)
    g = tracin.Gradients([rows, rows])
    if store:
        writer = tracin.GradientStore.create(tmp_path / "s", 4, [6, 6])
        writer.write(0, 0, rows)
        writer.write(1, 0, rows)
        writer.finalize()
        g = tracin.GradientStore.open(tmp_path / "s")
    proj = tracin.Projection(4)
    expected = r"P\.apply_store\(store, path\)" if store else r"P\.apply\(g\.matrices\[c\]\)"
    for call in (lambda: proj.apply(g), lambda: proj.apply([g]), lambda: proj.apply_factored(g, rows)):
        with pytest.raises(TypeError, match=rf"is a {type(g).__name__}, a gradient set .*{expected}") as e:
            call()
        assert "sliced" not in str(e.value)
    factored = tracin.FactoredGradients([rows[:, :2]], [rows])
    with pytest.raises(TypeError, match=r"matrix is a FactoredGradients.*P\.apply_factored\(g\.left\[c\], g\.right"):
        proj.apply(factored)


def test_apply_warns_of_a_kronecker_share_an_export_refuses(rng):
    """review153 F4: dim=2049 over three 64 x 65 layers (share 683, prime: factors (10, 65)) is refused by the
    exports, suggesting 2046, but apply took it silently."""
    from tracin._export.kronecker_share import check_balanced

    layer = LayerMatrix(64, 64, bias=True)
    rows = rng.standard_normal((2, 3 * layer.width)).astype(np.float32)
    with pytest.raises(ValueError, match=r"e\.g\. 3 x 682 = 2046"):
        check_balanced(2049, [(f"layer {j}", 683, layer) for j in range(3)], 3)
    proj = tracin.Projection(2049, per_layer=True, kronecker=True)
    with pytest.warns(
        RuntimeWarning, match=r"segment 0 \(LayerMatrix.*gets 683 outputs, factored \(10, 65\).*3 x 682 = 2046"
    ):
        assert proj.apply(rows, segments=[layer] * 3).shape == (2, 2049)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.Projection(2046, per_layer=True, kronecker=True).apply(rows, segments=[layer] * 3)


# --- apply_store: store in, store out (review153 F1) ---


def _source_store(path, rows, dtype, chunk_rows, **kwargs):
    """A finished store of `rows` (one float32 matrix, or (left, right) pair, per checkpoint), opened with
    chunks of `chunk_rows` rows."""
    factored = isinstance(rows[0], tuple)
    dims = [(r[0].shape[1], r[1].shape[1]) if factored else r.shape[1] for r in rows]
    n_rows = (rows[0][0] if factored else rows[0]).shape[0]
    writer = tracin.GradientStore.create(path, n_rows, dims, dtype=dtype, factored=factored, **kwargs)
    for c, r in enumerate(rows):
        writer.write(c, 0, r)
    writer.finalize()
    row_bytes = tracin.GradientStore.open(path).row_bytes
    return tracin.GradientStore.open(path, chunk_bytes=chunk_rows * row_bytes)


def _stored_float64(rows: np.ndarray, dtype: str) -> np.ndarray:
    """The values a store of `dtype` holds for float32 `rows`, in float64 (ml_dtypes rounds as the store does)."""
    narrow = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return rows.astype(narrow).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_apply_store_matches_float64_and_resumes_after_an_interrupt(dtype, tmp_path, rng, monkeypatch):
    import tracin._export.projection as host

    rows = [rng.standard_normal((37, d)).astype(np.float32) for d in (20, 24)]
    ids = [f"ex{i}" for i in range(37)]
    source = _source_store(tmp_path / "src", rows, dtype, 5, weights=[0.5, 2.0], ids=ids, metadata={"note": "x"})
    proj = tracin.Projection(8, seed=3, kind="sparse")
    project, calls = host.project, []

    def interrupted(*args):
        calls.append(args[1])
        if len(calls) == 11:  # 8 chunks of 5 rows make checkpoint 0; checkpoint 1's third chunk
            raise KeyboardInterrupt
        return project(*args)

    monkeypatch.setattr(host, "project", interrupted)
    with pytest.raises(KeyboardInterrupt):
        proj.apply_store(source, tmp_path / "out")
    partial = tracin.GradientStore.open(tmp_path / "out", allow_partial=True)
    assert not partial.complete and partial.n_rows == 10  # checkpoint 0 whole, checkpoint 1 to row 10
    calls.clear()
    out = proj.apply_store(source, tmp_path / "out")  # the same call
    assert len(calls) == 6  # the 27 rows left of checkpoint 1, in chunks of 5 rows
    assert out.complete and out.dims == (8, 8) and out.dtype == "float32"
    blocks = out.kernel_side().blocks
    for c, r in enumerate(rows):
        dense = proj.apply(np.eye(r.shape[1], dtype=np.float32)).T.astype(np.float64)  # P (8, d)
        want = _stored_float64(r, dtype) @ dense.T
        np.testing.assert_allclose(blocks[c], want, rtol=1e-5, atol=1e-5)
        assert np.array_equal(blocks[c], proj.apply(_stored_float64(r, dtype).astype(np.float32)))
    assert out.metadata == {"note": "x", "projection": proj.to_dict()}
    assert out.weights.tolist() == [0.5, 2.0] and list(out.ids) == ids
    calls.clear()  # a finished store is returned as it is; the source by its path
    assert proj.apply_store(tmp_path / "src", tmp_path / "out").complete and not calls


def test_apply_store_is_checked_by_scoring_and_refuses_a_mix(tmp_path, rng):
    rows = [rng.standard_normal((6, 30)).astype(np.float32)]
    source = _source_store(tmp_path / "src", rows, "float32", 4, metadata={"note": "x"})
    a = tracin.Projection(8, seed=1).apply_store(source, tmp_path / "a")
    b = tracin.Projection(8, seed=2).apply_store(source, tmp_path / "b")
    want = rows[0].astype(np.float64) @ rows[0].astype(np.float64).T  # E<Pg, Pg'> = <g, g'>: finite, same shape
    assert tracin.scores(a, a).shape == want.shape
    with pytest.raises(ValueError, match="projection mismatch.*seed"):
        tracin.scores(a, b)
    with pytest.raises(ValueError, match="is already projected"):
        tracin.Projection(4).apply_store(a, tmp_path / "c")
    with pytest.raises(ValueError, match="seed"):  # resuming with another projection
        tracin.Projection(8, seed=3).apply_store(source, tmp_path / "a")
    replaced = tracin.Projection(8, seed=3).apply_store(source, tmp_path / "a", overwrite=True)
    assert replaced.metadata["projection"]["seed"] == 3
    with pytest.raises(ValueError, match=r"no metadata\['params'\] .*pass segments="):
        tracin.Projection(8, per_layer=True).apply_store(source, tmp_path / "d")
    with pytest.raises(ValueError, match="source store's own directory"):  # fr153: overwrite deleted the source
        tracin.Projection(8).apply_store(source, tmp_path / "src" / ".." / "src", overwrite=True)
    assert tracin.GradientStore.open(tmp_path / "src").dims == source.dims
    writer = tracin.GradientStore.create(tmp_path / "partial", 6, [30])
    writer.write(0, 0, rows[0][:4])
    writer.close()
    partial = tracin.GradientStore.open(tmp_path / "partial", allow_partial=True)
    with pytest.raises(ValueError, match="unfinished"):  # fr153: its 4 usable rows became a finished store
        tracin.Projection(8).apply_store(partial, tmp_path / "e")


def test_apply_store_of_an_unfinished_source_names_the_rows_written_however_it_was_opened(tmp_path, rng):
    """review165 F4: the error said "opened with allow_partial=True" for a path or a store opened without it."""
    rows = rng.standard_normal((6, 30)).astype(np.float32)
    writer = tracin.GradientStore.create(tmp_path / "src", 6, [30])
    writer.write(0, 0, rows[:3])
    writer.close()
    said = r"is unfinished \(rows written per checkpoint: \[3\] of 6\): finish writing it first$"
    for source in (
        tmp_path / "src",
        tracin.GradientStore.open(tmp_path / "src"),
        tracin.GradientStore.open(tmp_path / "src", allow_partial=True),
    ):
        with pytest.raises(ValueError, match=said) as refused:
            tracin.Projection(8).apply_store(source, tmp_path / "out")
        assert "opened with" not in str(refused.value)
    with tracin.GradientStore.create(tmp_path / "src", 6, [30]) as writer:  # every row, but not finalized
        writer.write(0, 3, rows[3:])
    with pytest.raises(
        ValueError, match=r"every row is written .*\[6\] of 6.*GradientStore\.create\(.*\)\.finalize\(\)"
    ):
        tracin.Projection(8).apply_store(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_apply_store_per_layer_and_factored(tmp_path, rng):
    rows = [rng.standard_normal((9, 30)).astype(np.float32)]
    params = [{"name": "w", "shape": [4, 6]}, {"name": "b", "shape": [6]}]
    source = _source_store(tmp_path / "src", rows, "bfloat16", 4, metadata={"params": params})
    proj = tracin.Projection(6, seed=5, per_layer=True)
    out = proj.apply_store(source, tmp_path / "out")
    widened = _stored_float64(rows[0], "bfloat16").astype(np.float32)
    assert np.array_equal(out.kernel_side().blocks[0], proj.apply(widened, segments=[24, 6]))
    with pytest.raises(ValueError, match="kronecker=True projection needs segments="):
        tracin.Projection(6, per_layer=True, kronecker=True).apply_store(source, tmp_path / "kron")
    layout = [LayerMatrix(4, 6).to_dict(), 6]  # a Kronecker layer and a plain segment, as exports record it
    kron = tracin.Projection(6, seed=5, per_layer=True, kronecker=True)
    out = kron.apply_store(source, tmp_path / "kron", segments=layout)
    assert out.metadata["projection"] == {**kron.to_dict(), "segments": layout}
    assert np.array_equal(out.kernel_side().blocks[0], kron.apply(widened, segments=layout))
    factors = [(rng.standard_normal((9, 5)).astype(np.float32), rng.standard_normal((9, 7)).astype(np.float32))]
    source = _source_store(tmp_path / "fsrc", factors, "float32", 4)
    proj = tracin.Projection(4, seed=6)
    out = proj.apply_store(source, tmp_path / "fout")
    assert out.factored and out.dims == ((2, 2),)
    left, right = proj.apply_factored(*factors[0])
    assert np.array_equal(out.kernel_side().blocks[0], left) and np.array_equal(out.kernel_side().blocks[1], right)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_kronecker_segment_row_holding_nan_or_either_infinity_is_named(value):
    """_finite_rows checks row maxima and minima: -Inf among finite values shows only in the minimum
    (review256 F3: checking the maxima alone passed every test)."""
    x = np.arange(24, dtype=np.float32).reshape(2, 12)
    x[1, 5] = value
    proj = tracin.Projection(4, per_layer=True, kronecker=True)
    with pytest.raises(ValueError, match=r"^matrix: row 1 is not finite \(NaN or Inf\)"):
        proj.apply(x, segments=[LayerMatrix(3, 4)])


@pytest.mark.parametrize("kind", KINDS)
def test_layer_factors_are_each_segments_own_streams_for_wide_and_repeated_layers(kind):
    """Every factor is its own stream's matrix (P_rows, P_cols of a square layer and the same shapes in
    two segments differ, also once cached), over every block of identity rows (sides beyond 256)."""
    proj = tracin.Projection(64, seed=5, kind=kind, per_layer=True, kronecker=True)
    square, wide = LayerMatrix(7, 6, bias=True), LayerMatrix(300, 270)
    for index, layer, dim in [(0, square, 9), (1, square, 9), (0, square, 9), (2, wide, 16)]:
        k_rows, k_cols = proj.kronecker_dims(dim, layer)
        f_rows, f_cols = proj.layer_factors(index, layer, dim)
        stream = KRONECKER + 2 * index
        want_rows = reference_matrix(kind, 5, k_rows, layer.rows, stream=stream)
        want_cols = reference_matrix(kind, 5, k_cols, layer.cols + int(layer.bias), stream=stream + 1)
        np.testing.assert_allclose(f_rows, want_rows, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f_cols, want_cols, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(*proj.layer_factors(0, square, 9))  # 3 x 3 factors of a 7 x 7 layer


def test_apply_store_names_an_overflowing_row_of_a_later_chunk_by_its_store_row(tmp_path, rng):
    """A finite row whose projection is beyond float32, in the third chunk of 5 rows of checkpoint 1: the
    error names its row in the store (13), not its row in the chunk (3)."""
    proj = tracin.Projection(8, seed=3, kind="gaussian")
    p = reference_matrix("gaussian", 3, 8, 20)
    rows = [rng.standard_normal((17, 20)).astype(np.float32) for _ in range(2)]
    rows[1][13] = np.where(_aligned_row(p, 1.0) < 0, np.float32(-1e38), np.float32(1e38))
    source = _source_store(tmp_path / "src", rows, "float32", 5)
    with pytest.raises(tracin.projection.NonFiniteRowError, match="checkpoint 1: the projection of row 13 ") as caught:
        proj.apply_store(source, tmp_path / "out")
    assert caught.value.row == 13


def test_kronecker_rows_checked_block_by_block_are_named_by_their_row(rng, monkeypatch):
    """Blocks of one row (_BLOCK_BYTES tiny): a NaN in row 3 is named as row 3 of the matrix."""
    from tracin import projection as module

    monkeypatch.setattr(module, "_BLOCK_BYTES", 1)
    layer = LayerMatrix(4, 5)
    x = rng.standard_normal((6, layer.width)).astype(np.float32)
    x[3, 7] = np.nan
    proj = tracin.Projection(6, seed=1, per_layer=True, kronecker=True)
    with pytest.raises(tracin.projection.NonFiniteRowError, match="matrix: row 3 is not finite") as caught:
        proj.apply(x, segments=[layer])
    assert caught.value.row == 3


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"per_layer": False}, ValueError, "kronecker=True projects layer by layer"),
        ({"kronecker": "yes"}, TypeError, "kronecker must be a bool"),
    ],
)
def test_from_dict_refuses_a_kronecker_field_the_constructor_refuses(change, error, message):
    """r325 A17: a spec with kronecker but not per_layer (or a kronecker that is not a bool) is refused as the
    constructor refuses it, not read as another projection."""
    spec = {**tracin.Projection(8, 3, per_layer=True, kronecker=True).to_dict(), **change}
    with pytest.raises(error, match=message):
        tracin.Projection.from_dict(spec)


def test_apply_store_projects_each_checkpoint_of_a_factored_store_from_its_own_factors(tmp_path, rng):
    """r325 B7: three checkpoints of factored rows (their own widths): checkpoint c of the projected store is
    apply_factored of checkpoint c's (left, right), not of the blocks beside them in kernel order."""
    factors = [
        (rng.standard_normal((9, p)).astype(np.float32), rng.standard_normal((9, q)).astype(np.float32))
        for p, q in ((5, 7), (6, 8), (9, 4))
    ]
    source = _source_store(tmp_path / "src", factors, "float32", 4)
    proj = tracin.Projection(4, seed=6)
    out = proj.apply_store(source, tmp_path / "out")
    blocks = out.kernel_side().blocks
    for c, (left, right) in enumerate(factors):
        want_left, want_right = proj.apply_factored(left, right)
        assert np.array_equal(blocks[2 * c], want_left) and np.array_equal(blocks[2 * c + 1], want_right), c
