"""GradientStoreWriter edge behaviour pinned by hand mutation testing (r380): row bounds at the end of
the store, the refusal of bool starts, and what records, undoes and names rows. Expectations are
hand-worked row ranges, float32 NumPy arrays and the documented error words."""

import numpy as np
import pytest

import tracin

from .helpers import read_rows


def test_an_empty_block_at_the_end_of_the_store_is_a_no_op(tmp_path):
    # the last, empty batch of an export lands at start == n_rows: allowed, nothing written or recorded
    w = tracin.GradientStore.create(tmp_path / "s", 5, [3])
    w.write(0, 5, np.ones((0, 3), np.float32))
    assert w.missing(0) == [[0, 5]] and w.rows_done(0) == 0
    block = np.arange(15, dtype=np.float32).reshape(5, 3)
    w.write(0, 0, block)
    w.write(0, 5, np.ones((0, 3), np.float32))
    np.testing.assert_array_equal(read_rows(w.finalize())[0], block)


def test_an_empty_block_touches_no_file(tmp_path, monkeypatch):
    # a zero-row write neither syncs a data file nor rewrites the manifest (each rewrite costs fsyncs)
    import tracin.store._writer as writer_module

    w = tracin.GradientStore.create(tmp_path / "s", 4, [2])
    w.write(0, 0, np.ones((2, 2), np.float32))
    before = (tmp_path / "s" / "manifest.json").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("an empty write touched the store's files")

    monkeypatch.setattr(writer_module, "sync", refuse)
    monkeypatch.setattr(writer_module, "write_json_atomic", refuse)
    w.write(0, 2, np.ones((0, 2), np.float32))
    with w.recording_once():
        w.write(0, 3, np.ones((0, 2), np.float32))
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    assert w.missing(0) == [[2, 4]]
    w.close()


@pytest.mark.parametrize("start", [True, False])
def test_a_bool_start_is_refused_naming_the_argument(tmp_path, start):
    # True is an int to Python; as a row number it is a mistake (a flag passed in the wrong place)
    w = tracin.GradientStore.create(tmp_path / "s", 4, [2])
    with pytest.raises(ValueError, match=f"start must be a non-negative integer, got {start}"):
        w.write(0, start, np.ones((1, 2), np.float32))
    assert w.missing(0) == [[0, 4]]
    w.close()


def test_a_refused_record_of_many_blocks_names_the_first_three_and_says_there_are_more(tmp_path, monkeypatch):
    from tracin.store import _format

    w = tracin.GradientStore.create(tmp_path / "s", 12, [1])
    manifest = tmp_path / "s" / "manifest.json"
    monkeypatch.setattr(_format, "MAX_JSON_CONTAINERS", manifest.read_text().count("[") + 2)  # room for 2 ranges
    with pytest.raises(ValueError) as e:
        with w.recording_once():
            for r in (0, 2, 4, 6):  # 4 disjoint ranges in one record
                w.write(0, r, np.full((1, 1), r, np.float32))
    text = str(e.value)
    assert "(checkpoint 0: rows [0, 1); checkpoint 0: rows [2, 3); checkpoint 0: rows [4, 5); ...)" in text
    assert "[6, 7)" not in text
    assert w.missing(0) == [[0, 12]]
    w.close()


def test_a_bool_checkpoint_is_refused_naming_the_argument(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [2, 2])
    with pytest.raises(ValueError, match=r"checkpoint must be an integer in \[0, 2\), got True"):
        w.write(True, 0, np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"checkpoint must be an integer in \[0, 2\), got False"):
        w.rows_done(False)
    assert w.missing(1) == [[0, 4]]
    w.close()
