"""GradientStoreRangeWriter behaviour pinned by hand mutation testing (r380): what repr() says of a
range writer, and the row bounds of its writes (hand-worked ranges and float32 NumPy arrays)."""

import numpy as np
import pytest

import tracin

from .helpers import read_rows


def test_repr_names_the_range_and_the_rows_done(tmp_path):
    tracin.GradientStore.create(tmp_path / "s", 10, [2]).close()
    with tracin.GradientStore.create(tmp_path / "s", 10, [2], rows=(4, 8)) as r:
        r.write(0, 4, np.ones((2, 2), np.float32))
        assert repr(r) == (
            f"GradientStoreRangeWriter({str(tmp_path / 's')!r}, rows=[4, 8], dims=[2], dtype='float32', rows_done=[6])"
        )


def test_a_range_writer_writes_only_its_rows_and_empty_blocks_at_its_ends(tmp_path):
    tracin.GradientStore.create(tmp_path / "s", 10, [2]).close()
    block = np.arange(8, dtype=np.float32).reshape(4, 2)
    with tracin.GradientStore.create(tmp_path / "s", 10, [2], rows=(4, 8)) as r:
        r.write(0, 8, np.ones((0, 2), np.float32))  # empty, at the range's stop: nothing
        for start, rows in [(3, 1), (7, 2), (8, 1)]:
            with pytest.raises(ValueError, match=rf"rows \[{start}, {start + rows}\) are outside this writer's rows"):
                r.write(0, start, np.ones((rows, 2), np.float32))
        assert r.missing(0) == [[4, 8]]
        r.write(0, 4, block)
    w = tracin.GradientStore.create(tmp_path / "s", 10, [2])
    assert w.missing(0) == [[0, 4], [8, 10]]
    w.write(0, 0, np.zeros((4, 2), np.float32))
    w.write(0, 8, np.zeros((2, 2), np.float32))
    expected = np.zeros((10, 2), np.float32)
    expected[4:8] = block
    np.testing.assert_array_equal(read_rows(w.finalize())[0], expected)
