"""The CPU backend (tracin.backends.cpu): the thread count it hands the C++ kernel."""

from __future__ import annotations

import numpy as np

import tracin
from tracin import _validate
from tracin.backends import cpu


def test_threads_above_the_usable_cores_are_capped(monkeypatch):
    """num_threads=4096 on 2 cores started 4096 kernel threads, each with its own top-k candidate
    buffers: 19 s and 4.2 GiB against 1.3 s and 219 MiB (review12 t22)."""
    seen = []
    for name in ("scores", "top_k", "self_influence", "aggregate"):
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
        assert seen == [expected] * 4, (threads, seen)
