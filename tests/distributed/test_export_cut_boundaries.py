"""cut() at its documented boundaries (r385 hand mutants E6, E7): as many gaps as shards gives one
range per gap, and written rows between two gaps exactly n_rows // JOIN_BELOW long are still joined.
Expectations are worked by hand from cut()'s and by_rows()' docstrings, not from their output."""

from __future__ import annotations

from tracin.distributed._export import JOIN_BELOW, cut


def test_as_many_gaps_as_shards_gives_one_range_per_gap():
    """Two gaps, two shards: each gap is one task (10 rows and 1 row), never more ranges than shards,
    even though the first gap holds more than half of the 11 missing rows."""
    assert cut([(0, 10), (20, 21)], 2, 30000) == [(0, 10), (20, 21)]
    assert cut([(0, 1), (5, 6), (9, 40)], 3, 30000) == [(0, 1), (5, 6), (9, 40)]


def test_gaps_separated_by_exactly_the_join_bound_share_a_task():
    """n_rows // JOIN_BELOW = 30 written rows between two one-row gaps is "no more than" the bound: with
    one shard both gaps are one task, rows [0, 32) (the 30 rows between are written again)."""
    n_rows = 30 * JOIN_BELOW
    assert cut([(0, 1), (31, 32)], 1, n_rows) == [(0, 32)]
    assert cut([(0, 1), (32, 33)], 1, n_rows) == [(0, 1), (32, 33)]  # 31 rows between: two tasks
