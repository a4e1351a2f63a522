"""zero_rows (which rows of a host block are all 0, for ZeroRows' warning) reads the first columns of each row
first, then a sample spread over the rest of the rows still 0 there, and only then the rest of the rows still
0: its answer is the full reduction's on crafted blocks (NumPy, CPU torch, factored pairs), and a block whose
rows are nonzero early is not read in full (reading it back cost a one-checkpoint export a fifth of its time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracin._export.sinks import zero_rows


def _reference(block) -> np.ndarray:
    """Independent: every value of every row, in float64."""

    def of(array):
        return ~(np.asarray(array, dtype=np.float64) != 0).any(axis=1)

    if isinstance(block, tuple):
        return of(block[0]) | of(block[1])
    return of(block)


def _crafted(rows: int, d: int, zero_fraction: float, seed: int) -> np.ndarray:
    """Rows all 0, or 0 but for one value: in the first column, the last, just past the first 256 columns, or
    a random one; the others dense; zero_fraction of the rows are of the first kinds."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((rows, d)).astype(np.float32)
    sparse = rng.random(rows) < zero_fraction
    for r in np.flatnonzero(sparse):
        block[r] = 0
        kind = r % 5
        column = {0: None, 1: 0, 2: d - 1, 3: min(256, d - 1), 4: int(rng.integers(d))}[kind]
        if column is not None:
            block[r, column] = rng.choice([-1e-30, 3.0])
    block[0] = 0  # always one row all 0 and one 0 but its last column
    block[-1] = 0
    block[-1, -1] = -0.5
    return block


@pytest.mark.parametrize("d", [1, 3, 256, 257, 300, 1000, 5003])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.1, 0.5, 1.0])
def test_numpy_blocks_give_the_full_reduction(d, zero_fraction):
    block = _crafted(40, d, zero_fraction, seed=d)
    np.testing.assert_array_equal(zero_rows(block), _reference(block))
    np.testing.assert_array_equal(zero_rows(block.astype(np.float16)), _reference(block.astype(np.float16)))


def test_negative_zero_is_zero_and_nan_is_not():
    block = np.zeros((3, 600), np.float32)
    block[0, 599] = -0.0
    block[1, 599] = np.nan
    block[2, 300] = np.inf
    np.testing.assert_array_equal(zero_rows(block), [True, False, False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero_fraction", [0.1, 0.6])
def test_cpu_torch_blocks_give_the_full_reduction(dtype, zero_fraction):
    block = _crafted(33, 2000, zero_fraction, seed=7)
    expected = _reference(torch.from_numpy(block).to(dtype).float().numpy())
    np.testing.assert_array_equal(zero_rows(torch.from_numpy(block).to(dtype)), expected)


@pytest.mark.parametrize("zero_fraction", [0.1, 0.7])
def test_factored_pairs_are_zero_when_either_factor_row_is(zero_fraction):
    left = _crafted(30, 700, zero_fraction, seed=1)
    right = _crafted(30, 300, zero_fraction, seed=2)
    expected = _reference((left, right))
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(zero_rows((left, right)), expected)
    torch_pair = (torch.from_numpy(left), torch.from_numpy(right))
    np.testing.assert_array_equal(zero_rows(torch_pair), expected)


class _Counted:
    """A (rows, d) block that counts the values read through it (indexing, or comparing it whole)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.read = array, array.shape, 0

    def __getitem__(self, index):
        part = self.array[index]
        self.read += part.size
        return part

    def __ne__(self, other):
        self.read += self.array.size
        return self.array != other


def test_rows_nonzero_early_are_not_read_in_full():
    block = _crafted(64, 20_000, 0.0, seed=3)  # row 0 all 0, row 63 0 but its last column, others dense
    block[1:20, :300] = 0  # 0 in their first columns, as a ReLU unit off makes a layer's slice
    counted = _Counted(block)
    np.testing.assert_array_equal(zero_rows(counted), _reference(block))
    # the first 256 columns of every row, a sample of the 21 rows 0 there, the rest of the 2 rows 0 in both
    assert counted.read < 64 * 256 + 21 * 300 + 2 * 20_000
