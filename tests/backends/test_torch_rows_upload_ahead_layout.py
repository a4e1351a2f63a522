"""_torch_rows.TrainStream stages the first tile of the loop's next piece ahead only where that piece
fits the current staging slots: a next piece of another layout (other columns or another host dtype)
is not copied into slots made for this one (a copy of 3 columns into slots of 4 raised), and both
pieces' tiles are their own rows, checked against the blocks widened to float64 by NumPy. Killer
test of hand mutant R2 (r379: the layout check of _upload_ahead dropped)."""

from __future__ import annotations

import numpy as np
import pytest

from tracin.backends import _torch_rows
from tracin.gradients import KernelSide

torch = pytest.importorskip("torch")


def _tiles_as_float64(tiles) -> list[tuple[int, int, list[np.ndarray]]]:
    return [(i0, i1, [b.double().numpy() for b in got]) for i0, i1, got in tiles]


@pytest.mark.parametrize("reads_back", [False, True])
@pytest.mark.parametrize(
    ("columns", "dtype", "code"), [(3, np.float32, 0), (4, np.float16, 1)], ids=["columns", "dtype"]
)
def test_a_next_piece_of_another_layout_is_not_staged_ahead(rng, reads_back, columns, dtype, code):
    this = rng.standard_normal((7, 4)).astype(np.float32)
    other = rng.standard_normal((6, columns)).astype(dtype)
    a, b = KernelSide(False, [this], [0]), KernelSide(False, [other], [code])
    stream = _torch_rows.TrainStream(torch.device("cpu"))
    got_a = _tiles_as_float64(stream.tiles(a, 3, following=b, reads_back=reads_back))
    got_b = _tiles_as_float64(stream.tiles(b, 3))
    for got, rows in ((got_a, this), (got_b, other)):
        n = rows.shape[0]
        assert [(i0, i1) for i0, i1, _ in got] == [(i0, min(i0 + 3, n)) for i0 in range(0, n, 3)]
        for i0, i1, blocks in got:
            np.testing.assert_array_equal(blocks[0], rows[i0:i1].astype(np.float64))
