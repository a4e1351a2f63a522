"""`tracin bench`'s lines: the first says k was capped only where k exceeds the train rows; the timings
say how many test rows were checked against float64, at most CHECKED_ROWS (r369 mutants S7, S10)."""

from __future__ import annotations

from types import SimpleNamespace

from tracin import selfbench


def test_k_equal_to_the_train_rows_is_not_said_to_be_capped():
    line = selfbench.problem(selfbench.BenchConfig(m=4, n=10, d=8, k=10, threads=1))
    assert line.startswith("top-10 proponents of 4 test rows among 10 train rows, d=8, float32; "), line
    assert "capped" not in line


def test_k_beyond_the_train_rows_is_said_to_be_capped_at_them():
    line = selfbench.problem(selfbench.BenchConfig(m=4, n=10, d=8, k=11, threads=1))
    assert line.startswith("top-10 (k=11 capped at the train rows) proponents of 4 test rows among 10 train rows")


def test_the_timings_count_the_rows_checked_and_the_speedup():
    config = selfbench.BenchConfig(m=3, n=10, d=8, k=2, threads=1)
    lines = selfbench.timings(selfbench.BenchResult(config, 0.5, 2.0, True, 1)).splitlines()
    assert lines[2] == "  tracin is 4.00x the speed of NumPy; top-k matches float64 on 3 checked rows"
    wide = selfbench.BenchConfig(m=100, n=10, d=8, k=2, threads=1)
    lines = selfbench.timings(selfbench.BenchResult(wide, 2.0, 1.0, False, 1)).splitlines()
    assert (
        lines[2]
        == "  tracin is 0.50x the speed of NumPy; top-k DOES NOT MATCH float64 (please report) on 8 checked rows"
    )


def test_each_contender_is_timed_by_the_median_of_its_calls_after_a_warm_up(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # timed calls of 1, 3 and 2 s: median 2 (min 1, mean 2)
    monkeypatch.setattr(selfbench.time, "perf_counter", lambda: next(clock))
    calls = []
    assert selfbench._median_seconds(lambda: calls.append(1), 3) == 2.0
    assert len(calls) == 4  # the warm-up and the 3 timed
    clock = iter([0.0, 1.0, 5.0, 9.0])  # 1 and 4 s: the median of two is their mean
    assert selfbench._median_seconds(lambda: None, 2) == 2.5


def test_the_result_keeps_each_contenders_time_apart(monkeypatch):
    """BenchResult.tracin_s is tracin's time and numpy_s NumPy's (speedup = NumPy / tracin, > 1: tracin faster)."""
    import tracin

    timed = []
    top_k = SimpleNamespace(values=None, indices=None)
    monkeypatch.setattr(tracin, "top_k", lambda *a, **kw: timed.append("tracin") or top_k)
    monkeypatch.setattr(selfbench, "numpy_top_k", lambda *a: timed.append("numpy"))
    monkeypatch.setattr(selfbench, "matches_float64", lambda *a: True)
    times = {"tracin": 0.5, "numpy": 2.0}
    monkeypatch.setattr(selfbench, "_median_seconds", lambda fn, repeats: (fn(), times[timed[-1]])[1])
    result = selfbench.run(selfbench.BenchConfig(m=2, n=5, d=3, k=2, repeats=1, threads=1))
    assert (result.tracin_s, result.numpy_s, result.speedup) == (0.5, 2.0, 4.0)
