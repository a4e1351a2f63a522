"""A holder record (writer.info, a range writer's lock file) is anyone's to write: one nested deeper than
the JSON parser's recursion limit, within the 4 KiB read, is left out of the refusal like any garbled record
(it raised "maximum recursion depth exceeded while decoding a JSON array" in place of the refusal), and so is
one whose pid no process can have (beyond a 32-bit pid_t: os.kill raised OverflowError on it)."""

from __future__ import annotations

import json
import socket

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


@pytest.mark.parametrize("pid", [2**31, 2**63, 10**30])
@pytest.mark.parametrize("host", ["this", "node7"])
def test_a_record_of_a_pid_no_process_can_have_is_left_out_of_the_refusal(tmp_path, pid, host):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    try:
        host = socket.gethostname() if host == "this" else host
        (path / _locks.INFO_FILE).write_text(json.dumps({"pid": pid, "host": host, "since": "2026-01-01T00:00:00Z"}))
        with pytest.raises(RuntimeError, match="being written by another writer") as e:
            tracin.GradientStore.create(path, **SPEC)
        assert "held by" not in str(e.value)
    finally:
        w.close()
