"""The range-writer task of tests/store/test_ranges.py, importable by spawned processes, and runnable as
`python -m store.ranges_task PATH START STOP` (tests/ on the path), which prints each block it writes."""

from __future__ import annotations

import sys

import numpy as np

import tracin

N_ROWS, BLOCK, DIMS, WEIGHTS = 600, 40, [48, 16], [0.5, 0.25]
SPEC = dict(
    n_rows=N_ROWS,
    dims=DIMS,
    weights=WEIGHTS,
    dtype="bfloat16",
    metadata={"run": "ranges"},
    ids=[f"ex-{i}" for i in range(N_ROWS)],
)


def rows(c: int) -> np.ndarray:
    """Every row of checkpoint c (the same in every process)."""
    return np.random.default_rng(c).standard_normal((N_ROWS, DIMS[c])).astype(np.float32)


def write_missing(w: tracin.GradientStoreWriter, start: int, stop: int, report: bool = False) -> None:
    """Writes what is missing of rows [start, stop) in blocks of BLOCK, checkpoint after checkpoint,
    printing "wrote C ROW" after each block if `report`."""
    for c in range(len(DIMS)):
        data = rows(c)
        for a in range(w.rows_done(c), stop, BLOCK):
            w.write(c, a, data[a : min(a + BLOCK, stop)])
            if report:
                print("wrote", c, a, flush=True)


def range_task(path: str, start: int, stop: int, barrier) -> None:
    """A spawned process: opens its range writer, waits until every task has one open, writes."""
    with tracin.GradientStore.create(path, **SPEC, rows=(start, stop)) as w:
        barrier.wait(timeout=120)
        write_missing(w, start, stop)


if __name__ == "__main__":
    first, last = int(sys.argv[2]), int(sys.argv[3])
    with tracin.GradientStore.create(sys.argv[1], **SPEC, rows=(first, last)) as writer:
        write_missing(writer, first, last, report=True)
