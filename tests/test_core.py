"""tracin._core itself: the instruction set a call runs with, Ctrl-C during a long call, the
packed test copy's and top-k selection's memory bounds, argument checks (k, block formats),
self_influence's weight checks, and the type stub against the module."""

from __future__ import annotations

import ast
import inspect
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tracin
from reference import assert_close_to_exact, exact_scores, score_bound
from tracin import _core

# The CPU features (as NumPy names them) each instruction set of the kernel needs.
ISA_FEATURES = {
    "generic": (),
    "avx2": ("AVX2", "FMA3", "F16C"),
    "avx512": ("AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "FMA3"),
}


def missing_cpu_features(isa: str) -> list[str]:
    """The features `isa` needs that this CPU lacks, by NumPy's own detection (not the kernel's)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return [f for f in ISA_FEATURES[isa] if not __cpu_features__.get(f, False)]


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_every_instruction_set_is_exact(rng, isa):
    missing = missing_cpu_features(isa)
    if missing:
        used = _core.resolve_isa(isa)
        assert used != isa and not missing_cpu_features(used), f"{isa} without {missing} runs as {used}"
        pytest.skip(f"this CPU lacks {', '.join(missing)}, needed by {isa}")
    assert _core.resolve_isa(isa) == isa
    test = [rng.standard_normal((19, d), dtype=np.float32) for d in (300, 5)]
    train = [rng.standard_normal((130, d), dtype=np.float32) for d in (300, 5)]
    w = [1.0, -0.5]
    got = _core.scores(tracin.Gradients(test).kernel_side(), tracin.Gradients(train).kernel_side(), w, isa=isa)
    assert_close_to_exact(got, test, train, w)


# (weights, test scales, train scales) per checkpoint: the weighted test rows are subnormal (1e-42)
# or overflow (1e39) in float32 while every score is a normal float (review12 t20), or they are in
# range while the unweighted dot products are not (a, b, e) or one checkpoint's weight is far from
# the other's (c, d): review17, where one exponent from the largest weight failed or was wrong.
FAR_WEIGHTS = {
    "t20 subnormal": ([1e-30], [1e-12], [1e25]),
    "t20 overflow": ([1e45], [1e-6], [1e-6]),
    "a": ([1e-30], [1e20], [1e20]),
    "b": ([1e-5], [3e19], [3e19]),
    "c": ([1e-30, 1e30], [1.0, 1e-30], [1.0, 1e-30]),
    "d": ([1.0, 2.0**40], [1e-30, 1.0], [1e10, 1e-30]),
    "e 1e-3": ([1e-3], [1e20], [1e20]),
    "e 1e-10": ([1e-10], [1e20], [1e20]),
    "e 1e-35": ([1e-35], [1e20], [1e20]),
}


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
@pytest.mark.parametrize("case", list(FAR_WEIGHTS))
def test_weights_far_from_one_keep_the_bound(rng, isa, case):
    """Scores and top_k within the bound of the float64 scores, every instruction set: the kernel
    packs w / 2^e, e from the weighted rows' magnitudes (0 unless they leave float32's comfortable
    range), and scales each tile by 2^e."""
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {isa}")
    w, test_scales, train_scales = FAR_WEIGHTS[case]
    test = [(rng.standard_normal((3, 16)) * s).astype(np.float32) for s in test_scales]
    train = [(rng.standard_normal((20, 16)) * s).astype(np.float32) for s in train_scales]
    sides = tracin.Gradients(test, w).kernel_side(), tracin.Gradients(train, w).kernel_side()
    got = _core.scores(*sides, w, isa=isa)
    assert_close_to_exact(got, test, train, w)
    values, indices, _, _ = _core.top_k(*sides, w, 4, 0, isa=isa)
    np.testing.assert_array_equal(values, np.take_along_axis(got, indices, 1))
    exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
    fourth = np.sort(exact, 1)[:, -4:-3]  # the 4 chosen are the top 4 up to the bound
    assert np.all(np.take_along_axis(exact + 2 * bound, indices, 1) >= fourth)


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_each_test_row_gets_its_own_weight_exponent(rng, isa):
    """One pass whose test rows' weighted values are far apart (review21 case A): weight 1e-30, row 0
    ~1e10 (1e-20 packed, normal), rows 1-2 ~1e-12 (1e-42 packed, subnormal), train ~1e25. Rows 1-2
    are within the bound of the float64 scores and have the bits they have alone (one exponent per
    pass left them subnormal: 27x the bound); top_k picks within the bound, every instruction set."""
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {isa}")
    w = [1e-30]
    test = [np.vstack([rng.standard_normal((1, 16)) * 1e10, rng.standard_normal((2, 16)) * 1e-12]).astype(np.float32)]
    train = [(rng.standard_normal((20, 16)) * 1e25).astype(np.float32)]
    side = lambda x: tracin.Gradients(x, w).kernel_side()  # noqa: E731
    got = _core.scores(side(test), side(train), w, isa=isa)
    assert_close_to_exact(got, test, train, w)
    np.testing.assert_array_equal(got[1:], _core.scores(side([test[0][1:]]), side(train), w, isa=isa))
    values, indices, _, _ = _core.top_k(side(test), side(train), w, 4, 0, isa=isa)
    np.testing.assert_array_equal(values, np.take_along_axis(got, indices, 1))
    exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
    fourth = np.sort(exact, 1)[:, -4:-3]
    assert np.all(np.take_along_axis(exact + 2 * bound, indices, 1) >= fourth)


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_a_row_near_float32s_top_gets_its_exponent_whatever_else_the_pass_holds(isa):
    """review154 F1: a test row whose largest weighted value is in [2^127, 2^128) was lowered only when
    another row of its pass was tiny or overflowed, so its bits changed with the pass's rows (thread
    count, k, a store's chunks). Row [2^127, 2^-100 (1 + 2^-23)] against train rows scoring exactly 1
    and 1 + 2^-23: the same bits alone, beside a zero row, and in top_k passes of any size."""
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {isa}")
    row = np.array([[2.0**127, np.float32(2.0**-100) * np.float32(1 + 2.0**-23)]], np.float32)
    train = np.zeros((20000, 2), np.float32)
    train[0], train[1], train[2:, 1] = [2.0**-127, 0.0], [0.0, 2.0**100], 2.0**90
    side = lambda x: tracin.Gradients([x]).kernel_side()  # noqa: E731
    alone = _core.scores(side(row), side(train[:2]), [1.0], isa=isa)
    for others in (np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32)):
        beside = _core.scores(side(np.vstack([row, others])), side(train[:2]), [1.0], isa=isa)
        np.testing.assert_array_equal(beside[:1], alone)
    # 600 test rows, a zero row 200 rows after it: top_k passes of 416 (1 thread) or 192 rows (2).
    test = np.ones((600, 2), np.float32)
    test[200], test[400] = row[0], 0.0
    order = np.lexsort((np.arange(2), -alone[0]))  # by score, ties to the smaller index
    for k in (10, 5000):
        for threads in (1, 2):
            values, indices, _, _ = _core.top_k(side(test), side(train), [1.0], k, 0, num_threads=threads, isa=isa)
            np.testing.assert_array_equal(indices[200, :2], order)
            np.testing.assert_array_equal(values[200, :2], alone[0, order])


def test_scaling_the_weight_by_a_power_of_two_scales_the_scores_exactly(rng):
    """Weights are packed divided by a power of two and the tile multiplied back: exact, so scaling
    the weight by 2^j scales every score by 2^j, bit for bit, with or without cosine normalisation
    (the kernel packed float32(w x row): subnormal at 2^-130, not the same bits)."""
    test, train = rng.standard_normal((7, 40), dtype=np.float32), rng.standard_normal((50, 40), dtype=np.float32)
    side = lambda x: tracin.Gradients([x]).kernel_side()  # noqa: E731
    for normalize in (0, 1):
        base = _core.scores(side(test), side(train), [0.3], normalize=normalize)
        for j in (-130, -60, -3, 5, 70, 100):  # 2^-130: subnormal scores, rounded once
            scaled = _core.scores(side(test), side(train), [0.3 * 2.0**j], normalize=normalize)
            np.testing.assert_array_equal(scaled, base * np.float32(2.0**j))


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_cosine_scores_with_tiny_weights_keep_the_bound_at_every_train_scale(rng, isa):
    """review55 F1: cosine scores do not depend on a row's scale, but with |w| below about 1e-21 the
    products w x test value x train value of train rows of norm 2^-64 to about 1e-10 (not rescaled)
    fell below float32's normal range: every score 0 at norm 2.8e-17 (w = 1e-28), 434x the bound at
    2.8e-14. The kernel now brings such test rows' largest packed value to 2^-32: within 1e-5 sum|w|
    of the float64 cosines, and (multiplying rows by 2^j is exact) the same bits at every scale where
    no row is rescaled; with weight 1 the scores are the same bits as before the lift."""
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {isa}")
    m, n, d = 3, 8, 1000
    test, base = rng.standard_normal((m, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32)
    side = lambda x: tracin.Gradients([x]).kernel_side()  # noqa: E731
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    cosines = unit(test) @ unit(base).T
    for w in (1e-20, 1e-28, -1e-35, 2.0**-100):
        first = None
        for j in (-70, -60, -50, -30, 0, 40):
            got = _core.scores(side(test), side(base * np.float32(2.0**j)), [w], normalize=1, isa=isa)
            err = np.abs(got - w * cosines).max()
            assert err <= 1e-5 * abs(w), (w, j, err / (1e-5 * abs(w)))
            if j >= -60:  # rows of norm 2^-64 to 2^64 are not rescaled: exact powers of two throughout
                first = got if first is None else first
                np.testing.assert_array_equal(got, first)
            top = _core.top_k(side(test), side(base * np.float32(2.0**j)), [w], 3, 0, normalize=1, isa=isa)
            np.testing.assert_array_equal(top[0], np.take_along_axis(got, top[1], 1))


def test_auto_resolves_to_the_detected_instruction_set():
    assert _core.resolve_isa("auto") == _core.detect_isa() == tracin.detect_isa()
    assert not missing_cpu_features(_core.detect_isa())


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="isa must be one of 'auto', 'generic', 'avx2', 'avx512', got 'sse'"):
        _core.resolve_isa("sse")


# About 1e12 multiply-adds: over ten seconds on two cores.
LONG_TOP_K = """
import os, signal, sys, time
import numpy as np
import tracin
# Python keeps SIGINT ignored when it starts ignored (a child of a background job): as at a terminal
signal.signal(signal.SIGINT, signal.default_int_handler)
rng = np.random.default_rng(0)
test = rng.standard_normal((40_000, 256), dtype=np.float32)
train = rng.standard_normal((100_000, 256), dtype=np.float32)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
print("started", flush=True)
start = time.perf_counter()
try:
    tracin.top_k(test, train, k=10, side="both", num_threads=2, progress=False)
except KeyboardInterrupt:
    print("interrupted", time.perf_counter() - start, threads() - before, flush=True)
    raise
print("finished", time.perf_counter() - start, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_ctrl_c_interrupts_a_long_top_k():
    child = subprocess.Popen(
        [sys.executable, "-c", LONG_TOP_K], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read()
        time.sleep(1.0)
        child.send_signal(signal.SIGINT)
        sent = time.perf_counter()
        out, err = child.communicate(timeout=30)
        ended = time.perf_counter() - sent
    finally:
        child.kill()
    assert "interrupted" in out, f"top_k was not interrupted: {out!r} {err[-2000:]!r}"
    _, seconds, extra_threads = out.split()
    assert "KeyboardInterrupt" in err and child.returncode != 0
    assert ended < 3.0, f"the process ended {ended:.1f} s after Ctrl-C"
    assert float(seconds) < 5.0
    assert int(extra_threads) == 0, "kernel threads outlived the interrupted call"


def test_signal_handler_raising_during_a_call_interrupts_it(rng):
    # About 2e11 multiply-adds (seconds); the handler's exception must end the call early, not wait
    # for it to return, and leave the next call exact. (The bound, 1 s, is loose: under the load of
    # parallel test runs on 2 cores the call ended up to 0.62 s after it started, review319.)
    test = rng.standard_normal((8000, 256), dtype=np.float32)
    train = rng.standard_normal((100_000, 256), dtype=np.float32)

    def handler(signum, frame):
        raise TimeoutError("alarm")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(TimeoutError, match="alarm"):
            tracin.top_k(test, train, k=3, num_threads=2, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert elapsed < 1.0, f"the call ended {elapsed:.2f} s after it started"
    small = train[:500]
    got = tracin.top_k(test[:4], small, k=3, progress=False)
    exact = test[:4].astype(np.float64) @ small.T.astype(np.float64)
    np.testing.assert_array_equal(got.indices, np.argsort(-exact, axis=1, kind="stable")[:, :3])


def test_signal_handler_interrupts_the_final_selection_of_a_top_k_with_k_equal_n(rng):
    # One column, so the scores are few multiply-adds, but k = n ranks every train row for every
    # test row: the final selection dominates the call. A handler raising at half an uncancelled
    # call's time (inside the selection) must end the call within a fraction of it, not when the
    # whole selection is done (which kept it running ~0.5 x the call, >= 1 s here, after the signal).
    # Robust to the runner's load changing: test rows are added until the fastest of 3 calls takes
    # >= 2 s, and an attempt whose call finishes before the signal (the runner got faster) is retried
    # with a time from that call, at an earlier share of it.
    n = 60_000
    train = rng.standard_normal((n, 1), dtype=np.float32)
    train_side = tracin.Gradients([train], [1.0]).kernel_side()

    def timed(test_side):
        start = time.perf_counter()
        _core.top_k(test_side, train_side, [1.0], n, 2, num_threads=2)
        return time.perf_counter() - start

    m = 32
    while True:
        test_side = tracin.Gradients([rng.standard_normal((m, 1), dtype=np.float32)], [1.0]).kernel_side()
        whole = min(timed(test_side) for _ in range(3))
        if whole >= 2.0 or m >= 512:  # 512 x 60,000 (both sides): ~0.7 GB of output
            break
        m = min(512, int(m * max(2.0, 2.5 / max(whole, 1e-3))))

    def handler(signum, frame):
        raise TimeoutError("alarm")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        for share in (0.5, 0.35, 0.25, 0.15):
            at = share * whole
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, at)
            try:
                _core.top_k(test_side, train_side, [1.0], n, 2, num_threads=2)
            except TimeoutError:
                late = time.perf_counter() - start - at
                break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            whole = min(whole, time.perf_counter() - start)  # finished before the signal: retry
        else:
            pytest.skip(f"every call ({m} x {n}, {whole:.2f} s) finished before its signal: the runner sped up")
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert late < max(0.3, 0.1 * whole), (
        f"the call ended {late:.2f} s after the signal at {at:.2f} s (whole call {whole:.2f} s, {m} x {n})"
    )


def test_aggregate_of_factored_and_full_gradients_agree_when_pair_scores_overflow_float32():
    # Pair scores of 1e40 (beyond float32) whose sums over the test rows are 0 and 1e20 + ...: the
    # full path forms no pair score, and the factored path (right factors of ones: the same
    # gradients) falls back to float64 pair sums instead of refusing them; both == float64 NumPy.
    test = np.array([[1e20], [-1e20], [3.0]], np.float32)
    train = np.array([[1e20], [1.0]], np.float32)
    ones = np.ones((3, 1), np.float32), np.ones((2, 1), np.float32)
    full = _core.aggregate((False, [test], [0]), (False, [train], [0]), [0.5])
    factored = _core.aggregate((True, [test, ones[0]], [0, 0]), (True, [train, ones[1]], [0, 0]), [0.5])
    exact = 0.5 * (test.astype(np.float64) @ train.T.astype(np.float64)).sum(axis=0)
    np.testing.assert_allclose(full, exact, rtol=1e-12, atol=1e-12 * 1e40)
    np.testing.assert_allclose(factored, exact, rtol=1e-12, atol=1e-12 * 1e40)


def _full_aggregate_in_kernel_order(test, train, weights):
    """float64 NumPy in the order the kernel documents for full-gradient aggregate: per checkpoint
    the test rows added in order then times the weight (column sums); each train row's products with
    them rounded, product k added to partial sum k % 16, the 16 sums combined pairwise (j += j + 8,
    then + 4, + 2, + 1); checkpoints added in order."""
    total = np.zeros(train[0].shape[0])
    for t, x, w in zip(test, train, weights, strict=True):
        column = np.zeros(t.shape[1])
        for row in t.astype(np.float64):
            column += row
        column *= w
        products = x.astype(np.float64) * column
        sums = np.zeros((x.shape[0], 16))
        for k in range(0, x.shape[1], 16):
            piece = products[:, k : k + 16]
            sums[:, : piece.shape[1]] += piece
        for width in (8, 4, 2, 1):
            sums[:, :width] += sums[:, width : 2 * width]
        total += sums[:, 0]
    return total


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_full_aggregate_sums_in_the_documented_order_on_every_instruction_set(rng, isa):
    # Full-gradient aggregate: one weighted column sum per checkpoint, then per train row a float64
    # dot product in 16 partial sums (vectorised; the same bits for every instruction set and thread
    # count): equal to NumPy doing the same, and to float64 NumPy's matrix product within float64
    # rounding. Widths around the 16-value step, rows read in place (float32) and converted (float16).
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {', '.join(missing_cpu_features(isa))}, needed by {isa}")
    widths, weights = (1000, 37, 16, 5), [0.5, -3.0, 1e-3, 7.0]
    test = [rng.standard_normal((6, d), dtype=np.float32) for d in widths]
    train = [rng.standard_normal((300, d), dtype=np.float32) for d in widths]
    train[1] = train[1].astype(np.float16)
    ordered = _full_aggregate_in_kernel_order(test, train, weights)
    exact = sum(
        w * (t.astype(np.float64) @ x.T.astype(np.float64)).sum(0) for t, x, w in zip(test, train, weights, strict=True)
    )
    magnitude = sum(
        abs(w) * (np.abs(t.astype(np.float64)) @ np.abs(x.T.astype(np.float64))).sum(0)
        for t, x, w in zip(test, train, weights, strict=True)
    )
    assert np.all(np.abs(ordered - exact) <= 1e-13 * magnitude)
    for threads in (1, 2):
        got = _core.aggregate(
            tracin.Gradients(test).kernel_side(),
            tracin.Gradients(train).kernel_side(),
            weights,
            isa=isa,
            num_threads=threads,
        )
        np.testing.assert_array_equal(got, ordered)


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_column_sums_then_aggregate_sums_give_the_documented_bits_for_any_chunks(rng, isa):
    # The two steps of full-gradient aggregate (column_sums carried over test chunks in row order,
    # then aggregate_sums per train piece) give the kernel's documented order (the float64 NumPy
    # above) bit for bit, whatever the chunks, pieces, thread count and instruction set.
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {', '.join(missing_cpu_features(isa))}, needed by {isa}")
    widths, weights = (200, 37, 5), [0.5, -3.0, 7.0]
    test = [rng.standard_normal((41, d), dtype=np.float32) for d in widths]
    train = [rng.standard_normal((90, d), dtype=np.float32) for d in widths]
    test[1] = test[1].astype(np.float16)
    ordered = _full_aggregate_in_kernel_order([t.astype(np.float32) for t in test], train, weights)
    codes = [0, 1, 0]
    for chunk, piece, threads in ((41, 90, 1), (1, 7, 3), (16, 45, 2)):
        sums = [np.zeros(d) for d in widths]
        for a in range(0, 41, chunk):
            _core.column_sums((False, [t[a : a + chunk] for t in test], codes), sums, isa=isa, num_threads=threads)
        got = np.concatenate(
            [
                _core.aggregate_sums(sums, (False, [x[i : i + piece] for x in train], [0] * 3), weights, isa=isa)
                for i in range(0, 90, piece)
            ]
        )
        np.testing.assert_array_equal(got, ordered)


def test_column_sums_and_aggregate_sums_refuse_bad_sums_and_name_non_finite_rows(rng):
    test = (False, [rng.standard_normal((4, 6), dtype=np.float32)], [0])
    train = (False, [rng.standard_normal((3, 6), dtype=np.float32)], [0])
    for sums, what in (
        ([], "one array per checkpoint"),
        ([np.zeros(5)], "1-D float64 array of 6 values"),
        ([np.zeros(6, np.float32)], "1-D float64 array of 6 values"),
        ([np.zeros(12)[::2]], "contiguous"),
        ([np.zeros((1, 6))], "1-D float64"),
    ):
        with pytest.raises(ValueError, match=what):
            _core.column_sums(test, sums)
        with pytest.raises(ValueError, match=what):
            _core.aggregate_sums(sums, train, [1.0])
    read_only = np.zeros(6)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only|writable"):
        _core.column_sums(test, [read_only])
    with pytest.raises(ValueError, match="factored"):
        _core.column_sums((True, [test[1][0], test[1][0]], [0, 0]), [np.zeros(6), np.zeros(6)])
    test[1][0][2, 4] = np.inf
    with pytest.raises(ValueError, match=r"test checkpoint 0 contains NaN or Inf values, first in rows \[2\]"):
        _core.column_sums(test, [np.zeros(6)])
    train[1][0][1, 0] = np.nan
    with pytest.raises(ValueError, match=r"train checkpoint 0 contains NaN or Inf values, first in rows \[1\]"):
        _core.aggregate_sums([np.zeros(6)], train, [1.0])


def _factored_aggregate_exact(test, train, weights, normalize):
    """float64 NumPy: sum over test rows of the (cosine) factored scores, pair by pair."""
    run = normalize or len(weights)
    out = np.zeros(train[0][0].shape[0])
    for g in range(len(weights) // run):
        cs = range(g * run, (g + 1) * run)
        t64 = [[b.astype(np.float64) for b in test[c]] for c in cs]
        x64 = [[b.astype(np.float64) for b in train[c]] for c in cs]
        pairs = sum(weights[c] * (t[0] @ x[0].T) * (t[1] @ x[1].T) for c, t, x in zip(cs, t64, x64, strict=True))
        if normalize:
            tn = np.sqrt(sum((t[0] ** 2).sum(1) * (t[1] ** 2).sum(1) for t in t64))
            xn = np.sqrt(sum((x[0] ** 2).sum(1) * (x[1] ** 2).sum(1) for x in x64))
            with np.errstate(divide="ignore"):
                ti, xi = np.where(tn > 0, 1 / tn, 0), np.where(xn > 0, 1 / xn, 0)
            pairs = pairs * ti[:, None] * xi[None, :]
        out += pairs.sum(axis=0)
    return out


@pytest.mark.parametrize("normalize", [0, 1, 2])
@pytest.mark.parametrize("shape", [(9, 31, 3, 2), (2, 30, 40, 37)], ids=["outer-product-sums", "pair-by-pair"])
def test_factored_aggregate_float64_fallback_matches_float64_numpy(rng, normalize, shape):
    # Pair scores beyond float32 for every train row (a product of left factors of 1e40: test row 1
    # and every train row have 1e20 in the first checkpoint's first left column; cosine scores:
    # weights of ~1e45) send every train row of factored aggregate to its float64 fallback: per
    # checkpoint the p x q matrix w_c sum_t s_t L_t R_t^T ((m + n) p q) or, when p q is above
    # m (p + q), pair by pair (m n (p + q)); both must equal float64 NumPy to float64 rounding, over
    # two checkpoints, weights and cosine runs, with a zero train row.
    m, n, p, q = shape
    # Cosine scores are at most the weights: weights beyond float32 overflow them instead.
    weights = [0.7, -1.3] if normalize == 0 else [0.7e45, -1.3e45]
    test = [[rng.standard_normal((m, k), dtype=np.float32) for k in (p, q)] for _ in weights]
    train = [[rng.standard_normal((n, k), dtype=np.float32) for k in (p, q)] for _ in weights]
    test[0][0][1, 0] = train[0][0][:, 0] = 1e20
    for c in range(2):
        train[c][1][5] = 0.0

    def side(s):
        blocks = [b for pair in s for b in pair]
        return True, blocks, [0] * len(blocks)

    got = _core.aggregate(side(test), side(train), weights, normalize=normalize, num_threads=2)
    exact = _factored_aggregate_exact(test, train, weights, normalize)
    # float64 rounding of every path is a small multiple of eps times the sum of the terms' magnitudes
    magnitude = _factored_aggregate_exact(
        [[np.abs(b) for b in pair] for pair in test],
        [[np.abs(b) for b in pair] for pair in train],
        [abs(w) for w in weights],
        normalize,
    )
    assert np.all(np.abs(got - exact) <= 1e-13 * magnitude), np.abs(got - exact).max() / magnitude.max()
    assert got[5] == 0.0 or normalize == 0


def test_factored_aggregate_float64_fallback_is_fast_and_cancellable(rng):
    # A test row whose pair scores with every train row overflow sends every train row to the float64
    # fallback, which must cost about the float32 pass (outer-product sums: (m + n) p q), not
    # m n (p + q) scalar multiply-adds (30x the float32 pass before), and a signal handler raising
    # inside it ends it early.
    m, n, p, q = 400, 100_000, 64, 64
    test = [rng.standard_normal((m, k), dtype=np.float32) for k in (p, q)]
    train = [rng.standard_normal((n, k), dtype=np.float32) for k in (p, q)]
    sides = (True, test, [0, 0]), (True, train, [0, 0])
    start = time.perf_counter()
    _core.aggregate(*sides, [1.0], num_threads=2)
    fast = time.perf_counter() - start
    test[0][0] *= 1e20
    train[0] *= 1e20
    start = time.perf_counter()
    got = _core.aggregate(*sides, [1.0], num_threads=2)
    fallback = time.perf_counter() - start
    assert fallback < 5 * fast + 0.5, f"fallback {fallback:.2f} s, float32 pass {fast:.2f} s"
    rows = [0, 1, 77, n - 1]
    exact = (
        (test[0].astype(np.float64) @ train[0][rows].T.astype(np.float64))
        * (test[1].astype(np.float64) @ train[1][rows].T.astype(np.float64))
    ).sum(axis=0)
    np.testing.assert_allclose(got[rows], exact, rtol=1e-10)

    # Few test rows: the float32 pass takes ~0.05 s, the fallback's 32 x 4096 + 400,000 x 4096
    # float64 multiply-adds ~1 s; the signal lands in the fallback.
    m, n = 32, 400_000
    test = [rng.standard_normal((m, k), dtype=np.float32) for k in (p, q)]
    train = [rng.standard_normal((n, k), dtype=np.float32) for k in (p, q)]
    sides = (True, test, [0, 0]), (True, train, [0, 0])
    start = time.perf_counter()
    _core.aggregate(*sides, [1.0], num_threads=2)
    at = 2 * (time.perf_counter() - start) + 0.1
    test[0][0] *= 1e20
    train[0] *= 1e20

    def handler(signum, frame):
        raise TimeoutError("alarm")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, at)
        try:
            _core.aggregate(*sides, [1.0], num_threads=2)
            raised = False
        except TimeoutError:
            raised = True
        late = time.perf_counter() - start - at
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert raised and late < 0.3, f"raised {raised}, {late:.2f} s after the signal at {at:.2f} s"


# 16 test rows of 2,000,000 columns (8 MB each): the 64 MiB budget allows 8 rows per pass.
WIDE_ROWS = """
import resource, numpy as np, tracin
rng = np.random.default_rng(0)
test = rng.random((16, 2_000_000), dtype=np.float32)
train = rng.random((8, 2_000_000), dtype=np.float32)
test -= 0.5  # in place: a temporary would raise the peak before the call
train -= 0.5
tracin.top_k(test[:1, :64], train[:, :64], k=2)  # load everything lazily imported
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = tracin.top_k(test, train, k=2, num_threads=2, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
exact = sum(test[:, a:a + 100_000].astype(np.float64) @ train[:, a:a + 100_000].T.astype(np.float64)
            for a in range(0, 2_000_000, 100_000))
assert np.array_equal(result.indices[:, 0], np.argmax(exact, axis=1))
print((after - before) / 1024)
"""


def test_packed_copy_of_wide_rows_stays_within_64_mib():
    out = subprocess.run([sys.executable, "-c", WIDE_ROWS], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    # 16 rows in one pass would pack 122 MiB; 8 rows pack 61 MiB, plus tiles, heaps and (under
    # AddressSanitizer) shadow memory: 69 MiB.
    assert growth_mib < 80, f"top_k grew the peak RSS by {growth_mib:.0f} MiB"


# top_k with k = n / 2 (partition buffers) on 11 tiles of train rows, num_threads from argv: peak RSS
# growth in MiB and a digest of the results.
MANY_THREADS = """
import hashlib, resource, sys, numpy as np, tracin
rng = np.random.default_rng(0)
test = rng.standard_normal((128, 8), dtype=np.float32)
train = rng.standard_normal((1000, 8), dtype=np.float32)
tracin.top_k(test[:1], train[:2], k=1, side="both", progress=False)  # load everything lazily imported
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = tracin.top_k(test, train, k=500, side="both", num_threads=int(sys.argv[1]), progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
digest = hashlib.sha256()
for a in (r.proponents.values, r.proponents.indices, r.opponents.values, r.opponents.indices):
    digest.update(a.tobytes())
print((after - before) / 1024, digest.hexdigest())
"""


def test_top_k_memory_does_not_grow_with_unused_threads():
    runs = {}
    for threads in (1, 64):
        out = subprocess.run(
            [sys.executable, "-c", MANY_THREADS, str(threads)], capture_output=True, text=True, check=True
        )
        growth, digest = out.stdout.split()
        runs[threads] = float(growth), digest
    assert runs[1][1] == runs[64][1]
    # One selector of 128 rows x 1000 candidates (16 B) per requested thread and side grew the peak
    # by 250 MiB at 64 threads; 11 threads run, each holding about the 96 train rows it scores.
    extra = runs[64][0] - runs[1][0]
    assert extra < 40, f"num_threads=64 grew the peak RSS by {extra:.0f} MiB more than num_threads=1"


# top_k with k = 5000 of 20,000 train rows on both sides (partition buffers), every thread given
# tiles, num_threads from argv: peak RSS growth in MiB, and whether the results are a stable sort of
# the kernel's own float32 scores (ties: smaller index first), as digests.
RUNNING_THREADS = """
import hashlib, resource, sys, numpy as np, tracin
from tracin import _core
rng = np.random.default_rng(0)
test = rng.standard_normal((512, 8), dtype=np.float32)
train = rng.standard_normal((20_000, 8), dtype=np.float32)
train[1::9] = train[0]  # ties
side = lambda a: (False, [a], [0])
_core.top_k(side(test[:1]), side(train[:2]), [1.0], 1, 2)  # load everything lazily imported
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = _core.top_k(side(test), side(train), [1.0], 5000, 2, num_threads=int(sys.argv[1]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = _core.scores(side(test), side(train), [1.0])
pi, oi = np.argsort(-s, axis=1, kind="stable")[:, :5000], np.argsort(s, axis=1, kind="stable")[:, :5000]
ok = all(np.array_equal(a, b) for a, b in zip(r, (np.take_along_axis(s, pi, 1), pi, np.take_along_axis(s, oi, 1), oi)))
print((after - before) / 1024, ok, hashlib.sha256(b"".join(a.tobytes() for a in r)).hexdigest())
"""


def test_top_k_selector_memory_does_not_grow_with_running_threads():
    runs = {}
    for threads in (1, 16):
        out = subprocess.run(
            [sys.executable, "-c", RUNNING_THREADS, str(threads)], capture_output=True, text=True, check=True
        )
        growth, ok, digest = out.stdout.split()
        assert ok == "True", f"num_threads={threads}: top_k differs from a stable sort of the scores"
        runs[threads] = float(growth), digest
    assert runs[1][1] == runs[16][1]
    # The outputs are 61 MiB. Passes of 512 rows, 2 sides, 16 threads each holding ~1560 candidates
    # of 16 B per row (1.25 x its share of the train rows) grew the peak by 450 MiB (1 thread: 215
    # MiB). Passes are cut to keep threads x sides x rows x 10,000 (the buffer's capacity) x 16 B
    # within 64 MiB: 80 MiB at 16 threads, 120 MiB at 1.
    assert runs[16][0] < 100, f"num_threads=16 grew the peak RSS by {runs[16][0]:.0f} MiB"
    assert runs[16][0] < runs[1][0] + 20, f"16 threads: {runs[16][0]:.0f} MiB, 1 thread: {runs[1][0]:.0f} MiB"


def test_top_k_checks_k_before_making_its_outputs():
    test = tracin.Gradients([np.ones((3, 4), np.float32)]).kernel_side()
    train = tracin.Gradients([np.ones((20, 4), np.float32)]).kernel_side()
    # k = 2**62 overflowed the (m, k) outputs' strides (UBSan); 1e10 asked for 112 GiB.
    for k in (-1, 21, 10**10, 2**62):
        with pytest.raises(ValueError, match="^k must be between 0 and the number of train rows$"):
            _core.top_k(test, train, [1.0], k, 0)
    with pytest.raises(ValueError, match="^side code must be 0, 1 or 2$"):
        _core.top_k(test, train, [1.0], 2**62, 3)
    assert [a.shape for a in _core.top_k(test, train, [1.0], 20, 1)] == [(0, 20), (0, 20), (3, 20), (3, 20)]


def test_blocks_must_have_the_format_of_their_dtype_code():
    x = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    half = x.astype(np.float16)
    bf16_bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    for block, code in ((x, 0), (half, 1), (half.view(np.uint16), 1), (bf16_bits, 2)):
        side = (False, [block], [code])
        np.testing.assert_array_equal(_core.scores(side, side, [1.0]), exact)
    bad = (
        (x.view(np.int32), 0, "float32 ('f')", "i"),  # integers were read as float bits
        (x.astype(">f4"), 0, "float32 ('f')", ">f"),
        (x.astype(np.float64), 0, "float32 ('f')", "d"),
        (half, 2, "uint16 bits of bfloat16 ('H')", "e"),  # float16 was read as bfloat16
        (half.view(np.int16), 1, "float16 ('e', or its uint16 bits 'H')", "h"),
        (x, 1, "float16 ('e', or its uint16 bits 'H')", "f"),
    )
    good = (False, [x], [0])
    for block, code, expected, got in bad:
        message = f"test: block 0 (dtype code {code}) must be a 2-D buffer of {expected} elements"
        with pytest.raises(ValueError, match=re.escape(message) + f".*format '{re.escape(got)}'$"):
            _core.scores((False, [block], [code]), good, [1.0])
        with pytest.raises(ValueError, match="^train: block 0"):
            _core.top_k(good, (False, [block], [code]), [1.0], 1, 0)


def test_top_k_overflow_names_the_same_pair_for_any_thread_count(rng):
    # Passes cut by the selector budget (k > 64: fewer test rows a pass as the threads grow) named the
    # overflowing pair of the first cut pass, so num_threads changed it (fr146). Overflowing pairs (test
    # 10, train 5) and (test 150, train 0), one uncut pass of 300 rows: the smallest train row's.
    test = rng.standard_normal((300, 4), dtype=np.float32)
    train = rng.standard_normal((20_000, 4), dtype=np.float32)
    test[10, :2], train[5, :2], test[150, :2], train[0, :2] = [0, 1e20], [0, 1e20], [1e20, 0], [1e20, 0]
    sides = (False, [test], [0]), (False, [train], [0])
    for threads in (1, 2, 7):
        for k, side in ((3, 2), (5000, 2), (20_000, 0)):
            with pytest.raises(ValueError, match="first for test row 150 and train row 0;"):
                _core.top_k(*sides, [1.0], k, side, num_threads=threads)


def test_factored_aggregate_sums_groups_of_32_test_rows_for_any_test_block(rng):
    # Test rows over 50 orders of magnitude: a sum in another order differs in the last bits (review146
    # F2: each pass's rows were summed first, so test_block changed the result).
    m, n = 700, 50
    left = (rng.standard_normal((m, 3)) * np.exp(rng.uniform(-25, 25, (m, 1)))).astype(np.float32)
    test = (True, [left, rng.standard_normal((m, 5), dtype=np.float32)], [0, 0])
    train = (
        True,
        [rng.standard_normal((n, 3), dtype=np.float32), rng.standard_normal((n, 5), dtype=np.float32)],
        [0, 0],
    )
    scores = _core.scores(test, train, [0.5]).astype(np.float64)  # the float32 scores the sums take
    expected = np.zeros(n)
    for g in range(0, m, 32):
        group = np.zeros(n)
        for t in range(g, min(g + 32, m)):
            group += scores[t]
        expected += group
    for block in (0, 1, 7, 32, 33, 100, 512, 700):
        for threads in (1, 3):
            got = _core.aggregate(test, train, [0.5], test_block=block, num_threads=threads)
            np.testing.assert_array_equal(got, expected, err_msg=f"test_block={block}, num_threads={threads}")


def test_self_influence_checks_its_weights():
    side = tracin.Gradients([np.ones((3, 4), np.float32)]).kernel_side()
    for w in (np.nan, np.inf):
        with pytest.raises(ValueError, match="^weights must be finite$"):
            _core.self_influence(side, [w])
    with pytest.raises(ValueError, match=re.escape("expected one weight per checkpoint (1), got 2")):
        _core.self_influence(side, [1.0, 2.0])


def stub_functions() -> dict[str, list[str]]:
    """Parameter names of every function in src/tracin/_core.pyi."""
    stub = ast.parse((Path(tracin.__file__).parent / "_core.pyi").read_text())
    return {
        f.name: [a.arg for a in f.args.args + f.args.kwonlyargs] for f in stub.body if isinstance(f, ast.FunctionDef)
    }


def module_functions() -> dict[str, list[str]]:
    """Parameter names of every function of the compiled module, from pybind11's signatures."""
    functions = {}
    for name, fn in inspect.getmembers(_core, callable):
        if name.startswith("_"):
            continue
        signature = fn.__doc__.strip().splitlines()[0]
        params = signature[len(name) + 1 : signature.rindex(") ->")]
        functions[name] = re.findall(r"(?:^|, )(\w+):", params)
    return functions


def test_stub_matches_the_module():
    assert stub_functions() == module_functions()


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
def test_cosine_scores_of_a_later_run_scale_the_last_lane_of_a_full_tile(rng, isa):
    """normalize=1 over two checkpoints: the second run is summed apart and added to the tile times
    the train rows' inverse norms; 32 test rows (a multiple of every micro-tile's lanes) make the
    tile's last lane a test row."""
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {isa}")
    test = [rng.standard_normal((32, 12), dtype=np.float32) for _ in range(2)]
    train = [rng.standard_normal((7, 12), dtype=np.float32) for _ in range(2)]
    w = [0.5, 2.0]
    sides = tracin.Gradients(test).kernel_side(), tracin.Gradients(train).kernel_side()
    got = _core.scores(*sides, w, isa=isa, normalize=1)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)

    exact = sum(c * unit(t) @ unit(x).T for c, t, x in zip(w, test, train, strict=True))
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * sum(w))


@pytest.mark.parametrize("isa", list(ISA_FEATURES))
@pytest.mark.parametrize("log2_weight", [230, 250])
def test_a_row_lowered_past_float32s_powers_of_two_is_raised_back(rng, isa, log2_weight):
    """|w x test value| of 2^230 or more: the packed row is lowered by e_r >= 130, whose 2^e_r is no
    float32, so the scores are raised back by ldexp; train values of 2^(110 - log2_weight) keep the
    scores near 2^110, within float32."""
    if missing_cpu_features(isa):
        pytest.skip(f"this CPU lacks {isa}")
    test = rng.uniform(1.0, 2.0, (3, 20)).astype(np.float32)
    train = (rng.standard_normal((5, 20)) * 2.0 ** (110 - log2_weight)).astype(np.float32)
    w = [2.0**log2_weight]
    got = _core.scores(tracin.Gradients([test]).kernel_side(), tracin.Gradients([train]).kernel_side(), w, isa=isa)
    assert_close_to_exact(got, [test], [train], w)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_a_non_finite_value_is_named_by_its_row_for_each_dtype(rng, dtype, value):
    """float16 Inf (0x7c00) and NaN are told from finite values by their bits, as float32's: the
    error names the row, also for a call with no scores to compute."""
    test = rng.standard_normal((5, 6)).astype(dtype)
    train = rng.standard_normal((4, 6)).astype(dtype)
    test[3, 5] = value
    sides = tracin.Gradients([test]).kernel_side(), tracin.Gradients([train]).kernel_side()
    with pytest.raises(ValueError, match=r"test checkpoint 0 contains NaN or Inf values, first in rows \[3\]"):
        _core.scores(*sides, [1.0])
    train[2, 0] = value
    with pytest.raises(ValueError, match=r"train checkpoint 0 contains NaN or Inf values, first in rows \[2\]"):
        _core.scores(tracin.Gradients([test[:0]]).kernel_side(), tracin.Gradients([train]).kernel_side(), [1.0])


def test_project_refuses_an_out_of_the_wrong_width_layout_or_dtype(rng):
    """_core.project checks `out` itself: (rows, dim) float32, contiguous rows, writable."""
    x = rng.standard_normal((3, 10)).astype(np.float32)
    side = (False, [x], [0])
    want = np.zeros((3, 6), np.float32)
    _core.project(0, 5, 0, 6, 8, side, 0, want)
    reference = x.astype(np.float64) @ tracin.Projection(6, 5, "rademacher").apply(np.eye(10, dtype=np.float32))
    np.testing.assert_allclose(want, reference, rtol=1e-5, atol=1e-5)
    bad = {
        "wider": np.zeros((3, 7), np.float32),
        "narrower": np.zeros((3, 5), np.float32),
        "strided columns": np.zeros((3, 12), np.float32)[:, ::2],
        "float64": np.zeros((3, 6)),
        "read-only": np.zeros((3, 6), np.float32),
    }
    bad["read-only"].flags.writeable = False
    for name, out in bad.items():
        with pytest.raises((ValueError, BufferError), match=r"out must be a writable float32 \(rows, dim\) array|read"):
            _core.project(0, 5, 0, 6, 8, side, 0, out)
        assert not np.any(np.nan_to_num(np.asarray(out, np.float64))), name


def test_project_refuses_a_block_with_strided_columns_or_another_format(rng):
    x = rng.standard_normal((3, 20)).astype(np.float32)
    out = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="must have contiguous rows"):
        _core.project(0, 1, 0, 4, 8, (False, [x[:, ::2]], [0]), 0, out)
    with pytest.raises(ValueError, match=r"float32 \('f'\)"):
        _core.project(0, 1, 0, 4, 8, (False, [x.view(np.uint16)[:, :20]], [0]), 0, out)


@pytest.mark.parametrize("k", [0, 2])
def test_top_k_names_a_non_finite_train_row_whatever_k(rng, k):
    """k = 0 selects nothing, yet NaN or Inf inputs are refused as for any k."""
    test = rng.standard_normal((2, 5)).astype(np.float32)
    train = rng.standard_normal((3, 5)).astype(np.float32)
    train[1, 2] = np.nan
    with pytest.raises(ValueError, match="(?i)train"):
        _core.top_k((False, [test], [0]), (False, [train], [0]), [1.0], k, 0)
