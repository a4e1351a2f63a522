"""The CPU backend (tracin.backends.cpu): the thread count it hands the C++ kernel."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

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


def test_ctrl_c_interrupts_scores_of_one_column():
    """scores of 9000 x 11000 one-column rows counted as 1e8 multiply-adds, under the bar for the
    interruptible path, so the kernel ran inline and a Ctrl-C 0.2 s in was answered only when the call
    ended, 1.5 s in (review107 F2): the per-score work counts now. Sized to about 1.5 s on this runner."""
    n = 11_000
    train = np.ones((n, 1), np.float32)
    took = []
    for _ in range(2):  # the first call also starts the kernel's threads
        start = time.perf_counter()
        tracin.scores(np.ones((1000, 1), np.float32), train, progress=False)
        took.append(time.perf_counter() - start)
    per_row = max(min(took), 1e-6) / 1000
    m = int(np.clip(1.5 / per_row, 2000, 9000))  # <= 400 MB of scores
    delay = min(0.2, m * per_row / 5)  # well before the end where 9000 rows take less than 1 s (an idle machine)
    test = np.ones((m, 1), np.float32)
    sent = []

    def ctrl_c():
        time.sleep(delay)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=ctrl_c)
    returned = None
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
    assert returned is None, f"{m} x {n} scores returned after {returned:.2f} s, Ctrl-C at {delay:.2f} s not answered"
    assert late < 0.3, f"KeyboardInterrupt {late:.2f} s after Ctrl-C ({m} x {n} scores of one column)"
