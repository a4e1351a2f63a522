"""A holder record (writer.info, a range writer's lock file) is anyone's to write: one nested deeper than
the JSON parser's recursion limit, within the 4 KiB read, is left out of the refusal like any garbled record
(it raised "maximum recursion depth exceeded while decoding a JSON array" in place of the refusal)."""

from __future__ import annotations

import pytest

import tracin
from tracin.store import _locks

from .ranges_task import SPEC

pytestmark = pytest.mark.skipif(_locks.fcntl is None, reason="no flocks here: no refusal to name a holder in")

NESTED = b"[" * 4000  # within the 4096 bytes read of a record, deeper than Python's recursion limit


def test_a_writer_info_nested_too_deep_is_left_out_of_the_refusal(tmp_path):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    try:
        (path / _locks.INFO_FILE).write_bytes(NESTED)
        with pytest.raises(RuntimeError, match="being written by another writer") as e:
            tracin.GradientStore.create(path, **SPEC)
        assert "held by" not in str(e.value)
        with pytest.raises(RuntimeError, match="being written by a writer of the whole store") as e:
            tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
        assert "held by" not in str(e.value)
    finally:
        w.close()


def test_a_range_lock_record_nested_too_deep_is_left_out_of_the_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(_locks, "RETRY_S", 0.05)
    held = _locks.RangeLock(tmp_path, 0, 10)
    try:
        (tmp_path / "rows-0-10.lock").write_bytes(NESTED)
        with pytest.raises(RuntimeError, match=r"rows \[0, 10\) of gradient store .* another range writer") as e:
            _locks.RangeLock(tmp_path, 0, 10)
        assert "held by" not in str(e.value)
    finally:
        held.release()
