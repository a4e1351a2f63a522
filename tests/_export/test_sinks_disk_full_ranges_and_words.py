"""Sinks: a full disk or quota met recording a batch or finalizing a store says that a rerun resumes (other
OSErrors pass unchanged); a range writer (store_rows) warns in its own words and lets its range go at
finish; a factored block that is not a pair is a TypeError; a memory sink lets its rows go on close."""

from __future__ import annotations

import errno
import gc
import os
import re
import warnings
import weakref

import numpy as np
import pytest

import tracin
import tracin.store._writer as writer
from tracin._export.sinks import MemorySink, StoreSink

RESUMES = "rerun the same export call, which resumes where it stopped"


def _failing_record(monkeypatch, code: int) -> list[str]:
    """manifest.json's replace fails with OSError `code` (a full disk, ...) until the list returned is
    emptied."""
    armed = ["on"]
    real = writer.write_json_atomic

    def replace(path, doc):
        if armed:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, doc)

    monkeypatch.setattr(writer, "write_json_atomic", replace)
    return armed


def test_a_full_disk_recording_a_batch_says_a_rerun_resumes(tmp_path, monkeypatch):
    """The rows' data is written; the record of the batch (one replace of manifest.json, on leaving
    batch()) fails: the OSError keeps its errno and file and says, once, that a rerun resumes."""
    sink = StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {})
    _failing_record(monkeypatch, errno.ENOSPC)
    with pytest.raises(OSError) as err:
        with sink.batch():
            sink.write(0, 0, np.ones((4, 1), np.float32))
    sink.close()
    assert type(err.value) is OSError and err.value.errno == errno.ENOSPC
    assert err.value.filename == str(tmp_path / "g" / "manifest.json")
    assert str(err.value).count(RESUMES) == 1 and os.strerror(errno.ENOSPC) in str(err.value)


def test_a_full_disk_finalizing_says_a_rerun_resumes_and_the_rows_are_kept(tmp_path, monkeypatch):
    sink = StoreSink(tmp_path / "g", 2, [1], "float32", False, [1.0], {})
    with sink.batch():
        sink.write(0, 0, np.array([[1.0], [3.0]], np.float32))
    armed = _failing_record(monkeypatch, errno.ENOSPC)
    with pytest.raises(OSError, match=re.escape(RESUMES)) as err:
        sink.finish()
    assert err.value.errno == errno.ENOSPC
    sink.close()
    armed.clear()  # space freed: the same spec resumes with every row recorded, and finishes
    again = StoreSink(tmp_path / "g", 2, [1], "float32", False, [1.0], {})
    assert again.rows_done(0) == 2
    np.testing.assert_array_equal(tracin.self_influence(again.finish()), [1.0, 9.0])


@pytest.mark.skipif(not hasattr(errno, "EDQUOT"), reason="no EDQUOT on this platform")
def test_an_exceeded_quota_writing_rows_says_a_rerun_resumes(tmp_path, monkeypatch):
    sink = StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {})

    def over_quota(*args):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "g" / "checkpoint_000.npy"))

    monkeypatch.setattr(sink._writer, "write", over_quota)
    with pytest.raises(OSError) as err:
        sink.write(0, 0, np.ones((4, 1), np.float32))
    sink.close()
    assert err.value.errno == errno.EDQUOT and str(err.value).count(RESUMES) == 1


def test_other_os_errors_pass_unchanged(tmp_path, monkeypatch):
    """An I/O error is not a full disk: it is raised as the writer raised it, without the advice."""
    sink = StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {})
    failure = OSError(errno.EIO, os.strerror(errno.EIO), "x.npy")

    def broken(*args):
        raise failure

    monkeypatch.setattr(sink._writer, "write", broken)
    with pytest.raises(OSError) as err:
        with sink.batch():
            sink.write(0, 0, np.ones((4, 1), np.float32))
    sink.close()
    assert err.value is failure and RESUMES not in str(err.value)


def test_a_range_writer_warns_of_float16_rows_once_per_range_in_its_own_words(tmp_path):
    StoreSink(tmp_path / "g", 4, [3], "float16", False, [1.0], {}).close()  # the store, as store_rows(0, 0) makes it
    ranged = StoreSink(tmp_path / "g", 4, [3], "float16", False, [1.0], {}, rows=(2, 4))
    tiny = np.full((2, 3), 1e-6, np.float32)
    with pytest.warns(RuntimeWarning) as caught:
        ranged.write(0, 2, tiny)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert text.startswith("dtype='float16': 2 of the 2 rows of the gradients (rows 2 to 3 of checkpoint 0) "), text
    assert text.endswith(
        f"(the store begun in {os.fspath(tmp_path / 'g')} keeps dtype='float16'); this export warns once per range "
        "of rows and does not check that range's later rows"
    ), text
    ranged.close()


def test_a_range_writer_lets_its_range_go_at_finish(tmp_path):
    """finish() of a range writer returns None, leaves the store unfinalized and releases the range: a
    writer of the whole store then finishes it (no writer of a range may still hold it)."""
    StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {}).close()
    ranged = StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {}, rows=(0, 2))
    with ranged.batch():
        ranged.write(0, 0, np.array([[1.0], [2.0]], np.float32))
    assert ranged.finish() is None
    assert not tracin.GradientStore.open(tmp_path / "g", allow_partial=True).complete
    whole = StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {})
    with whole.batch():
        whole.write(0, 2, np.array([[3.0], [4.0]], np.float32))
    np.testing.assert_array_equal(tracin.self_influence(whole.finish()), [1.0, 4.0, 9.0, 16.0])


@pytest.mark.parametrize("block", [(1,), (1, 2, 3)], ids=["one", "three"])
def test_a_factored_block_must_be_a_pair(block):
    arrays = tuple(np.ones((2, 1), np.float32) for _ in block)
    sink = MemorySink(2, 1, "float32", True, [1.0])
    with pytest.raises(TypeError, match=r"^block must be a \(left, right\) pair, got tuple$"):
        sink.write(0, 0, arrays)


def test_a_memory_sink_of_unknown_length_given_no_rows_says_so():
    sink = MemorySink(None, 1, "float32", False, [1.0])
    with pytest.raises(ValueError, match=r"^data has no rows$"):
        sink.finish({})


def test_closing_a_memory_sink_lets_its_rows_go():
    """An export failing in memory closes its sink: its rows are freed at once, though the error's traceback
    keeps the sink alive."""
    sink = MemorySink(1000, 1, "float32", False, [1.0])
    rows = sink.destination(0, 0, 1000, 64).base
    assert rows is not None and rows.shape == (1000, 64)
    freed = weakref.ref(rows)
    del rows
    gc.collect()
    assert freed() is not None  # the sink holds them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.close()
    gc.collect()
    assert freed() is None
