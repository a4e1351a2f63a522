"""Runs the C++ example and checks its output against tracin.top_k on the same gradients, bit for bit.

Usage: python check_against_python.py PATH/TO/top_k_example

The gradients are rebuilt here with the example's generator (see top_k_example.cpp); the example runs
with 1 and 2 threads and k = 5 and 500 (every train row). Exits non-zero with a message on any difference.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import tracin

TEST_ROWS, TRAIN_ROWS = 6, 500
WIDTHS = (48, 80)
LEARNING_RATES = (0.1, 0.05)
MASK64 = (1 << 64) - 1


def make_gradients(rows: int, seed: int) -> list[np.ndarray]:
    """The example's LCG gradients: one float32 (rows, width) matrix per checkpoint."""
    state = seed
    matrices = []
    for width in WIDTHS:
        values = np.empty(rows * width, dtype=np.float32)
        for i in range(values.size):
            state = (state * 6364136223846793005 + 1442695040888963407) & MASK64
            values[i] = (state >> 40) / 8388608.0 - 1.0  # exact: a multiple of 2^-23 in [-1, 1)
        matrices.append(values.reshape(rows, width))
    return matrices


def parse(output: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """'row: index:value ...' lines -> values (TEST_ROWS, k) float32, indices (TEST_ROWS, k) int64."""
    lines = output.splitlines()
    if len(lines) != TEST_ROWS:
        sys.exit(f"expected {TEST_ROWS} lines from the example, got {len(lines)}:\n{output}")
    values = np.empty((TEST_ROWS, k), dtype=np.float32)
    indices = np.empty((TEST_ROWS, k), dtype=np.int64)
    for t, line in enumerate(lines):
        row, _, pairs = line.partition(":")
        pairs = pairs.split()
        if int(row) != t or len(pairs) != k:
            sys.exit(f"line {t} should be '{t}:' and {k} index:value pairs, got: {line!r}")
        for j, pair in enumerate(pairs):
            index, value = pair.split(":")
            indices[t, j], values[t, j] = int(index), np.float32(value)
    return values, indices


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: check_against_python.py PATH/TO/top_k_example")
    test = tracin.Gradients(make_gradients(TEST_ROWS, 1), weights=LEARNING_RATES)
    train = tracin.Gradients(make_gradients(TRAIN_ROWS, 2), weights=LEARNING_RATES)
    pairs = [
        (w, a.astype(np.float64), b.astype(np.float64))
        for w, a, b in zip(LEARNING_RATES, test.matrices, train.matrices, strict=True)
    ]
    exact = sum(w * a @ b.T for w, a, b in pairs)
    # The numerical contract's scale-aware bound per entry: 1e-5 * sum_c |w_c| |g_c(t)| |g_c(i)|.
    bound = 1e-5 * sum(abs(w) * np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)) for w, a, b in pairs)
    for k in (5, TRAIN_ROWS):
        for threads in (1, 2):
            run = subprocess.run([argv[0], str(k), str(threads)], capture_output=True, text=True, check=True)
            values, indices = parse(run.stdout, k)
            expected = tracin.top_k(test, train, k=k, num_threads=threads)
            if not (
                np.array_equal(values.view(np.int32), expected.values.view(np.int32))
                and np.array_equal(indices, expected.indices)
            ):
                sys.exit(
                    f"k={k}, {threads} thread(s): the C++ example and tracin.top_k differ\n"
                    f"C++:\n{run.stdout}\nPython:\n{expected.values}\n{expected.indices}"
                )
            # And both agree with float64 NumPy (no ties among these scores, so the order is unique).
            np.testing.assert_array_equal(indices, np.argsort(-exact, axis=1, kind="stable")[:, :k])
            error = np.abs(values - np.take_along_axis(exact, indices, axis=1))
            assert np.all(error <= np.take_along_axis(bound, indices, axis=1)), "values off float64 NumPy"
    print(f"C++ example == tracin.top_k (k = 5 and {TRAIN_ROWS}, 1 and 2 threads), both == float64 NumPy")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
