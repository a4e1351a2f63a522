"""A writer refused because another holds the store names the holder (pid, host, start time) from the
record it left (writer.info, or a range writer's lock file); records only inform, never block, and
stale or garbled ones are left out (r258 F3). A resume in a read-only folder is refused by create(),
before any rows are computed, naming the folder (r258 F4)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from datetime import datetime, timezone

import numpy as np
import pytest

import tracin

from .ranges_task import SPEC, rows

INFO = "writer.info"  # the record of a writer of the whole store
HOLDER = re.compile(r"pid (\d+) on host (.+?) since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def _holders(error: Exception) -> list[tuple[int, str, datetime]]:
    return [
        (int(pid), host, datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc))
        for pid, host, since in HOLDER.findall(str(error))
    ]


def _assert_names_this_process(error: Exception, before: datetime, count: int = 1) -> None:
    found = _holders(error)
    assert [(pid, host) for pid, host, _ in found] == [(os.getpid(), socket.gethostname())] * count, str(error)
    after = datetime.now(timezone.utc)
    assert all(before.replace(microsecond=0) <= since <= after for _, _, since in found)


def test_a_refused_writer_of_the_whole_store_names_the_holder(tmp_path):
    path = tmp_path / "s"
    before = datetime.now(timezone.utc)
    w = tracin.GradientStore.create(path, **SPEC)
    record = json.loads((path / INFO).read_bytes())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(RuntimeError, match="being written by another writer .*; close that writer first") as e:
        tracin.GradientStore.create(path, **SPEC)
    _assert_names_this_process(e.value, before)
    with pytest.raises(RuntimeError, match="being written by a writer of the whole store") as e:
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    _assert_names_this_process(e.value, before)
    w.close()
    assert not (path / INFO).exists()  # the record goes with the lock
    tracin.GradientStore.create(path, **SPEC).close()


def test_a_refusal_by_range_writers_names_the_live_ones_only(tmp_path):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    tracin.GradientStore.create(path, **SPEC, rows=(300, 600)).close()  # its lock file stays, held by none
    stale = {"pid": 4242, "host": "node-gone", "since": "2020-01-01T00:00:00Z"}
    (path / "rows-300-600.lock").write_text(json.dumps(stale))
    before = datetime.now(timezone.utc)
    first = tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    with pytest.raises(RuntimeError, match=r"rows \[0, 300\) .* being written by another range writer") as e:
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    _assert_names_this_process(e.value, before)
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    _assert_names_this_process(e.value, before)
    assert "node-gone" not in str(e.value)  # the lock decides, not the record
    second = tracin.GradientStore.create(path, **SPEC, rows=(300, 600))  # the stale record blocks nothing
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    _assert_names_this_process(e.value, before, count=2)
    assert "(rows [0, 300)), pid" in str(e.value) and str(e.value).endswith(
        "(rows [300, 600))); close that writer first"
    )
    first.close()
    second.close()


@pytest.mark.parametrize(
    "record",
    [
        b"{not json",
        b"\xff\xfe garbage",
        b"[1, 2]",
        json.dumps({"pid": "1", "host": "h", "since": "t"}).encode(),
        json.dumps({"pid": 1, "host": "h", "since": "t"}).encode() + b" " * 5000,  # over the 4 KiB read
        b"",
        # pid 0 or below is no process (os.kill(0, 0) checks this process group, so it would look alive)
        json.dumps({"pid": 0, "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z"}).encode(),
        json.dumps({"pid": -1, "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z"}).encode(),
    ],
)
def test_a_garbled_record_is_left_out_of_the_refusal(tmp_path, record):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    (path / INFO).write_bytes(record)
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    assert "held by" not in str(e.value)
    w.close()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_in_place_of_the_record_is_not_opened(tmp_path):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    (path / INFO).unlink()
    os.mkfifo(path / INFO)  # opening it for reading would wait for a writer
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    assert "held by" not in str(e.value)
    w.close()


def test_a_record_of_a_dead_process_on_this_host_is_left_out(tmp_path):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    dead = 2**22 + 12345  # above Linux's largest pid (pid_max <= 2**22)
    record = {"pid": dead, "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z"}
    (path / INFO).write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    assert "held by" not in str(e.value)
    record["host"] = "\x1b[31mnode7\n"  # another host's: named, without its control characters
    (path / INFO).write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    assert f"held by pid {dead} on host [31mnode7 since 2026-01-01T00:00:00Z" in str(e.value)
    w.close()


@pytest.mark.parametrize("kind", ["record", "garbled", "link", "directory"])
def test_a_left_record_never_blocks_a_writer(tmp_path, kind):
    """What a kill -9 leaves, or a copy of a store being written: the next writer goes on, and replaces
    the record by its own (a link is removed, never followed; a directory is left alone)."""
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    w.write(0, 0, rows(0)[:100])
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)  # holds the writer's record
    w.close()
    info = copy / INFO
    target = tmp_path / "outside"
    target.write_bytes(b"keep")
    if kind == "garbled":
        info.write_bytes(b"\x00" * 10000)
    elif kind == "link":
        info.unlink()
        info.symlink_to(target)
    elif kind == "directory":
        info.unlink()
        info.mkdir()
    assert os.path.lexists(info)
    for rows_ in [(0, 300), None]:
        w = tracin.GradientStore.create(copy, **SPEC, rows=rows_)
        assert w.rows_done(0) == 100
        w.close()
    assert target.read_bytes() == b"keep"
    assert info.is_dir() if kind == "directory" else not os.path.lexists(info)
    w = tracin.GradientStore.create(copy, **SPEC)
    for c in range(2):
        w.write(c, w.rows_done(c), rows(c)[w.rows_done(c) :])
    store = w.finalize()
    np.testing.assert_array_equal(store.ids[:3], ["ex-0", "ex-1", "ex-2"])


_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(_ROOT, reason="root writes into a read-only folder (chmod does not bind)")
@pytest.mark.parametrize("rows_", [None, (0, 300)])
def test_a_resume_in_a_read_only_folder_is_refused_before_any_write(tmp_path, rows_):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    w = tracin.GradientStore.create(path, **SPEC, rows=rows_)
    for c in range(2):
        w.write(c, 0, rows(c)[:40])
    w.close()
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    os.chmod(path, 0o555)
    try:
        with pytest.raises(
            PermissionError, match=rf"gradient store {re.escape(str(path))}: its folder is not writable"
        ):
            tracin.GradientStore.create(path, **SPEC, rows=rows_)
        assert {p.name: p.read_bytes() for p in path.iterdir()} == files
        assert tracin.GradientStore.open(path, allow_partial=True).n_rows == (
            40 if rows_ is None else 0
        )  # ranges: merged later
    finally:
        os.chmod(path, 0o755)
    w = tracin.GradientStore.create(path, **SPEC, rows=rows_)  # writable again: resumes
    assert w.rows_done(0) == 40
    w.close()


def test_a_refused_range_writer_leaves_the_live_writers_temporary_alone(tmp_path):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    w = tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    tmp = path / "rows-0-300.json.tmp"
    tmp.write_bytes(b"the live writer's progress, between its write and its rename")  # as inside write()
    with pytest.raises(RuntimeError, match=r"rows \[0, 300\) of gradient store .* are being written by another"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    assert tmp.read_bytes() == b"the live writer's progress, between its write and its rename"
    w.write(0, 0, rows(0)[:40])  # its write replaces the temporary
    w.close()


def test_a_left_record_of_the_whole_store_is_removed_by_a_range_writer_so_refusals_name_the_live_ones(tmp_path):
    """A killed writer of the whole store left writer.info (a live-looking record of another host): the range
    writer that takes the directory lock next removes it, so a refused writer names that range writer, not the
    dead one (r291 M21: kept, it named the dead writer as the holder)."""
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    (path / INFO).write_text(json.dumps({"pid": 4242, "host": "node-gone", "since": "2020-01-01T00:00:00Z"}))
    before = datetime.now(timezone.utc)
    w = tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    assert not (path / INFO).exists()
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    assert "node-gone" not in str(e.value)
    _assert_names_this_process(e.value, before)
    w.close()


def test_a_long_host_name_in_a_record_is_cut_to_100_characters(tmp_path):
    """A record is anyone's to write: its host is named cut to 100 characters (r291 M48: all 4 KiB of it)."""
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    (path / INFO).write_text(json.dumps({"pid": 4242, "host": "h" * 3000, "since": "2026-01-01T00:00:00Z"}))
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    assert f"held by pid 4242 on host {'h' * 100} since 2026-01-01T00:00:00Z" in str(e.value)
    w.close()


def test_a_refusal_by_many_range_writers_names_five_and_counts_the_rest(tmp_path):
    """Range writers may be thousands: the refusal names the first 5 holders, then how many more."""
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    before = datetime.now(timezone.utc)
    writers = [tracin.GradientStore.create(path, **SPEC, rows=(a, a + 50)) for a in range(0, 350, 50)]
    with pytest.raises(RuntimeError, match="being written by another writer") as e:
        tracin.GradientStore.create(path, **SPEC)
    _assert_names_this_process(e.value, before, count=5)
    assert str(e.value).endswith(" and 2 more); close that writer first")
    for w in writers:
        w.close()
