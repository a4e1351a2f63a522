"""The progress bar over shards, and the LocalCluster started when no client is given."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import numpy as np
import pytest
from distributed import get_task_stream

import tracin
import tracin.distributed as td
from tracin._export.driver import store_rows
from tracin.distributed import _export
from tracin.store._files import read_manifest


def test_bar_over_shards(client, tied, capsys):
    td.top_k(tied["test"], tied["store"], 3, client=client, shards=6, progress=True)
    err = capsys.readouterr().err
    assert "tracin.distributed top_k (proponents)" in err and re.search(r"100%.* 6/6 .*shard", err)
    td.top_k(tied["test"], tied["store"], 3, client=client, shards=6, progress=False)
    td.top_k(tied["test"], tied["store"], 3, client=client, shards=6)  # None: seconds of work only
    assert "tracin.distributed top_k" not in capsys.readouterr().err  # (Dask's own log lines may be there)


def test_default_client_is_used(client, tied, capsys):
    with client.as_current():
        found = td.self_influence(tied["store"], shards=3)
    np.testing.assert_array_equal(found, tracin.self_influence(tied["store"]))
    assert "LocalCluster" not in capsys.readouterr().err


def test_local_cluster_started_on_loopback(tied, capsys):
    found = td.self_influence(tied["store"], shards=3)
    np.testing.assert_array_equal(found, tracin.self_influence(tied["store"]))
    err = capsys.readouterr().err
    assert "tracin.distributed: LocalCluster of" in err and "dashboard http://127.0.0.1:" in err


def _export_setup(n_rows: int) -> tuple:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, lr) for lr in (0.1, 0.05)]
    data = (torch.randn(n_rows, 4), torch.randint(0, 3, (n_rows,)))
    return model, checkpoints, data, torch.nn.CrossEntropyLoss(reduction="none")


def test_export_runs_one_range_per_worker_thread(client, tmp_path):
    """Each range reads all the data (once per checkpoint): the default is one per worker thread."""
    model, checkpoints, data, loss = _export_setup(30)
    for rows, tasks in ((30, 2), (1, 1), (10, 1)):  # 2 worker threads; at most one range per batch (of 10 rows)
        with get_task_stream(client) as stream:
            one = (data[0][:rows], data[1][:rows])
            td.export_gradients(
                "torch", model, checkpoints, one, loss, store=tmp_path / f"{rows}", client=client, batch_size=10
            )
        assert sum("export_part" in t["key"] for t in stream.data) == tasks


class _Recorded:
    """progress_bar's stand-in: records the bar's total, description and updates."""

    bars: list[_Recorded] = []

    def __init__(self, total, enabled, desc, **kw):
        self.total, self.enabled, self.desc, self.updates, self.closed = total, enabled, desc, [], False
        _Recorded.bars.append(self)

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True


def test_export_bar_counts_the_rows_written_times_checkpoints(client, tmp_path, monkeypatch, capsys):
    model, checkpoints, data, loss = _export_setup(30)
    monkeypatch.setattr(_export, "progress_bar", _Recorded)
    _Recorded.bars = []
    td.export_gradients(
        "torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client, shards=3, progress=True
    )
    (bar,) = _Recorded.bars
    assert (bar.total, bar.enabled, bar.desc) == (60, True, "tracin.distributed export (torch)")
    assert sum(bar.updates) == 60 and min(bar.updates) >= 0 and bar.closed  # 30 rows x 2 checkpoints
    assert "tracin.torch export: reading the data" in capsys.readouterr().err  # the client's pass, shown


def test_rows_written_counts_the_manifest_and_every_range_file(tmp_path):
    """RowsWritten, which the bar polls: rows of the manifest, then those range writers add, per checkpoint."""
    path = tmp_path / "s"
    writer = tracin.GradientStore.create(path, 30, [3, 2], None)
    writer.write(0, 0, np.ones((5, 3), np.float32))
    writer.close()
    rows = _export.RowsWritten(path, read_manifest(path))
    assert (rows.total, rows.count()) == (60, 5)
    ranges = [tracin.GradientStore.create(path, 30, [3, 2], None, rows=r) for r in ((0, 10), (10, 30))]
    ranges[1].write(0, 10, np.ones((10, 3), np.float32))
    assert rows.count() == 15
    ranges[0].write(1, 0, np.ones((10, 2), np.float32))
    ranges[0].write(0, 0, np.ones((10, 3), np.float32))  # rows [0, 5) again: counted once
    assert rows.count() == 30
    ranges[1].write(1, 10, np.ones((20, 2), np.float32))
    assert rows.count() == 50
    for writer in ranges:
        writer.close()


def test_rows_written_skips_a_range_file_with_an_infinite_or_huge_bound(tmp_path):
    path = tmp_path / "s"
    writer = tracin.GradientStore.create(path, 20, [2], None)
    writer.write(0, 0, np.ones((3, 2), np.float32))
    writer.close()
    (path / "rows-0-20.json").write_text('{"written": [[[0, Infinity]]]}')  # int(inf): OverflowError
    (path / "rows-5-9.json").write_text('{"written": [[[5, NaN]]]}')  # int(nan): ValueError
    assert _export.RowsWritten(path, read_manifest(path)).count() == 3


def test_rows_written_skips_a_deeply_nested_range_file(tmp_path):
    """A planted rows-*.json of 65,000 nested lists (130 kB, under MAX_MANIFEST_BYTES): json.loads's
    RecursionError; the store's strict reader refuses it without recursing, so it is skipped."""
    path = tmp_path / "s"
    writer = tracin.GradientStore.create(path, 20, [2], None)
    writer.write(0, 0, np.ones((3, 2), np.float32))
    writer.close()
    (path / "rows-5-9.json").write_bytes(b'{"written": ' + b"[" * 65000 + b"]" * 65000 + b"}")
    (path / "rows-9-12.json").write_text('{"written": [[[9, 12]]]}')
    assert _export.RowsWritten(path, read_manifest(path)).count() == 6


def test_rows_bar_without_progress_takes_no_count(tmp_path, monkeypatch):
    """progress=False: no bar, so no file of the store is read, neither while inside nor at the end."""
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 20, [2], None).close()

    def refused(self):
        raise AssertionError("counted with progress=False")

    monkeypatch.setattr(_export.RowsWritten, "count", refused)
    with _export.rows_bar(str(path), read_manifest(path), False, "export"):
        pass


def test_rows_written_counts_one_row_per_checkpoint_of_a_factored_export(tmp_path):
    """A factored export stores a column per layer and checkpoint (here 2 x 2): a row counts once per checkpoint."""
    torch = pytest.importorskip("torch")
    import tracin.torch

    _, checkpoints, data, loss = _export_setup(20)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, lr) for _, lr in checkpoints]
    with store_rows(0, 0):
        tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "s", mode="factored")
    with store_rows(0, 8):
        tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "s", mode="factored")
    manifest = read_manifest(tmp_path / "s")
    rows = _export.RowsWritten(tmp_path / "s", manifest)
    assert len(manifest.dims) == 4 and (rows.total, rows.count()) == (40, 16)


def test_rows_written_ignores_inverted_and_outlying_ranges_of_a_corrupt_file(tmp_path):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 10, [3, 2], None).close()
    rows = _export.RowsWritten(path, read_manifest(path))
    (path / "rows-1-2.json").write_text(json.dumps({"written": [[[8, 3], [-5, 2]], [[0, 100], [12, 15]]]}))
    assert (rows.total, rows.count()) == (20, 12)  # rows [0, 2) of the first checkpoint, all 10 of the second


def _counted_within(rows: _export.RowsWritten, seconds: float) -> list:
    """[rows.count()] if it returned within `seconds`, else [] (it is left running, daemonic)."""
    found: list = []
    reader = threading.Thread(target=lambda: found.append(rows.count()), daemon=True)
    reader.start()
    reader.join(seconds)
    return found


def test_rows_written_reads_no_fifo_and_follows_no_link(tmp_path):
    """format.md: a store never follows a link inside it; a FIFO would block the poller (and the bar's end)."""
    path = tmp_path / "s"
    writer = tracin.GradientStore.create(path, 20, [2], None)
    writer.write(0, 0, np.ones((3, 2), np.float32))
    writer.close()
    (tmp_path / "outside.json").write_text(json.dumps({"written": [[[0, 20]]]}))
    (path / "rows-0-20.json").symlink_to(tmp_path / "outside.json")
    fifo = path / "rows-5-9.json"
    os.mkfifo(fifo)
    try:
        assert _counted_within(_export.RowsWritten(path, read_manifest(path)), 5.0) == [3]
    finally:  # a reader blocked on the FIFO (the old poller) gets its end of file
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting
            pass


def test_rows_bar_ends_without_waiting_for_a_poll_that_hangs(tmp_path, monkeypatch):
    """A poll stuck reading (a hung file system) is left behind after POLLER_JOIN_S; its count is dropped."""
    monkeypatch.setattr(_export, "POLL_S", 0.001)
    monkeypatch.setattr(_export, "POLLER_JOIN_S", 0.1, raising=False)
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 10, [3], None).close()
    release, polls = threading.Event(), []

    def stuck(self) -> int:
        polls.append(threading.current_thread().name)
        if len(polls) > 1:  # the poller's first poll hangs
            release.wait(30)
        return 10

    monkeypatch.setattr(_export.RowsWritten, "count", stuck)
    monkeypatch.setattr(_export, "progress_bar", _Recorded)
    _Recorded.bars = []
    ended = threading.Event()

    def run() -> None:
        with _export.rows_bar(str(path), read_manifest(path), True, "export"):
            while len(polls) < 2:
                time.sleep(0.001)
        ended.set()

    threading.Thread(target=run, daemon=True).start()
    try:
        assert ended.wait(5.0)
    finally:
        release.set()
    assert _Recorded.bars[-1].updates == [10] and _Recorded.bars[-1].closed  # the stuck poll's count is dropped


class _Handshake:
    """progress_bar's stand-in whose update from the poller waits (up to 2 s) for an update from
    another thread: the main thread's last update, if it ran while the poller was inside show()."""

    bars: list[_Handshake] = []

    def __init__(self, total, enabled, desc, **kw):
        self.count, self.inside, self.other, self.poller = 0, threading.Event(), threading.Event(), None
        _Handshake.bars.append(self)

    def update(self, n: int = 1) -> None:
        if threading.current_thread().name == "tracin export progress" and n:
            self.inside.set()
            self.other.wait(2.0)
        elif n:
            self.other.set()
        self.count += n

    def close(self) -> None:
        pass


def test_rows_bar_counts_each_row_once_when_the_poller_is_updating_at_the_end(tmp_path, monkeypatch):
    """The last count is taken once the poller has stopped: rows it is counting are not counted twice."""
    monkeypatch.setattr(_export, "progress_bar", _Handshake)
    monkeypatch.setattr(_export, "POLL_S", 0.001)
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 10, [3, 2], None).close()
    with _export.rows_bar(str(path), read_manifest(path), None, "export"):
        (path / "rows-0-10.json").write_text(json.dumps({"written": [[[0, 10]], [[0, 10]]]}))
        assert _Handshake.bars[-1].inside.wait(5.0)  # the poller is inside update(20)
    assert _Handshake.bars[-1].count == 20


def test_export_finalizing_pass_is_announced_and_shows_its_reading_bar(client, tmp_path, monkeypatch, capsys):
    """The client's last call reads all the data again: a line says so, and its reading bar may appear
    (progress None: after a few seconds), but not its export bar, which would count passes not computed."""
    from tracin._export import driver

    model, checkpoints, data, loss = _export_setup(30)
    monkeypatch.setattr(driver, "progress_bar", _Recorded)
    _Recorded.bars = []
    td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client, progress=True)
    made = [(bar.desc, bar.enabled) for bar in _Recorded.bars]
    reading = "tracin.torch export: reading the data"
    assert made == [(reading, True), (reading, None), ("tracin.torch export", None)]
    assert "every row written; the client reads the data once more" in capsys.readouterr().err
    _Recorded.bars = []
    td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "t", client=client, progress=False)
    assert {bar.enabled for bar in _Recorded.bars} == {False}
    assert "reads the data once more" not in capsys.readouterr().err


def test_rows_written_counts_per_column_when_the_recorded_checkpoints_do_not_divide_the_columns(tmp_path):
    """A store whose metadata lists 3 checkpoint digests over 2 columns (a user's own metadata, say): each column
    counts as a checkpoint, as without the record (r291 M38: 2 // 3 = 0 columns per checkpoint, a
    ZeroDivisionError in the progress bar's count)."""
    path = tmp_path / "s"
    writer = tracin.GradientStore.create(
        path, 10, [3, 2], None, metadata={"fingerprints": {"checkpoints": ["a", "b", "c"]}}
    )
    writer.write(0, 0, np.ones((4, 3), np.float32))
    writer.close()
    rows = _export.RowsWritten(path, read_manifest(path))
    assert (rows.total, rows.count()) == (20, 4)
