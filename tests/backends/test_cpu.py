"""The CPU backend (tracin.backends.cpu): the thread count it hands the C++ kernel."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import tracin
from tracin import _validate
from tracin.backends import cpu


def test_threads_above_the_usable_cores_are_capped(monkeypatch):
    """num_threads=4096 on 2 cores started 4096 kernel threads, each with its own top-k candidate
    buffers: 19 s and 4.2 GiB against 1.3 s and 219 MiB (review12 t22)."""
    seen = []
    for name in ("scores", "top_k", "self_influence", "column_sums", "aggregate_sums"):
        real = getattr(cpu._core, name)
        monkeypatch.setattr(
            cpu._core, name, lambda *a, _real=real, **kw: seen.append(kw["num_threads"]) or _real(*a, **kw)
        )
    monkeypatch.setattr(_validate, "usable_cores", lambda: 3)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    for threads, expected in ((None, 0), (2, 2), (3, 3), (4, 3), (4096, 3)):
        seen.clear()
        options = {"num_threads": threads, "progress": False}
        np.testing.assert_array_equal(tracin.scores(x, x, **options), x @ x.T)
        assert tracin.top_k(x, x, k=2, **options).indices.tolist() == [[3, 2]] * 4
        np.testing.assert_array_equal(tracin.self_influence(x, **options), (x * x).sum(1))
        np.testing.assert_array_equal(tracin.aggregate(x, x, **options), (x @ x.T).sum(0))
        assert seen == [expected] * 5, (threads, seen)


def test_scores_of_one_column_run_signal_handlers_while_they_run():
    """review107 F2: scores of 9000 x 11000 one-column rows were counted as 1e8 multiply-adds, under the
    bar for the interruptible path, so the kernel ran inline and a Ctrl-C was answered only when the call
    ended (the per-score work counts now). Timing a Ctrl-C cannot tell the two apart on a fast idle
    machine (9000 rows take 0.18 s: answered at the end is ~0.15 s late) and is near its bound on a loaded
    one; counting instead: a SIGALRM every 10 ms runs its handler inside the call, every 50 ms, only on the
    interruptible path (inline, the pending signal runs once, after the call)."""
    train, test = np.ones((11_000, 1), np.float32), np.ones((9000, 1), np.float32)
    ran: list[float] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: ran.append(time.perf_counter()))
    try:
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        tracin.scores(test, train, num_threads=2, progress=False)
        returned = time.perf_counter()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    took = returned - start
    inside = [t for t in ran if start + 0.2 * took < t < returned - 0.02]  # not the inputs' checks, not after it
    assert len(inside) >= 1 if took < 0.15 else len(inside) >= 2, (took, [t - start for t in ran])


def test_ctrl_c_interrupts_scores_of_one_column():
    """A real Ctrl-C 0.05 s into 9000 x 11000 one-column scores raises KeyboardInterrupt before the call
    ends, soon (the bound is loose: a loaded 2-core runner answered up to 0.27 s late)."""
    n, m = 11_000, 9000
    train, test = np.ones((n, 1), np.float32), np.ones((m, 1), np.float32)
    tracin.scores(test[:1000], train, progress=False)  # starts the kernel's threads
    sent = []

    def ctrl_c():
        time.sleep(0.05)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=ctrl_c)
    returned = late = None
    try:
        try:
            sender.start()
            start = time.perf_counter()
            tracin.scores(test, train, num_threads=2, progress=False)
            returned = time.perf_counter() - start
            sender.join()
        except KeyboardInterrupt:
            late = time.perf_counter() - sent[0]
        sender.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    if returned is not None and returned < 0.1:
        pytest.skip(f"{m} x {n} scores took {returned:.2f} s, less than the Ctrl-C's 0.05 s and its answer")
    assert returned is None, f"{m} x {n} scores returned after {returned:.2f} s, Ctrl-C at 0.05 s not answered"
    assert late < 1.0, f"KeyboardInterrupt {late:.2f} s after Ctrl-C ({m} x {n} scores of one column)"
