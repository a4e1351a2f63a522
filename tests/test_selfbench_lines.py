"""`tracin bench`'s lines: the first says k was capped only where k exceeds the train rows; the timings
say how many test rows were checked against float64, at most CHECKED_ROWS (r369 mutants S7, S10)."""

from __future__ import annotations

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
