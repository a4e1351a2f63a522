"""The found-at-x%-inspected table of report.md and the console: a Markdown table whose separator row
has one cell per column (r369 mutant V1)."""

from __future__ import annotations

import numpy as np

from tracin.demo import DemoResult
from tracin.demo.report import summary_rows


def test_the_summary_is_a_markdown_table_with_one_separator_per_column():
    found = {"a": {0.1: 0.25, 0.2: 0.5}, "b": {0.1: 0.125, 0.2: 1.0}}
    result = DemoResult("numpy", 10, 2, found, 1.0, 1.0, 0.0, {}, [], np.zeros(1), [1], 1, 1, 0.5)
    assert summary_rows(result) == [
        "| method | found at 10% inspected | found at 20% inspected |",
        "|---|---|---|",
        "| a | 25.0% | 50.0% |",
        "| b | 12.5% | 100.0% |",
    ]
