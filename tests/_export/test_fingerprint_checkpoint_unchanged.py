"""check_unchanged and the stats it compares (mutation testing m399): a checkpoint replaced by another file
of the same size and modification time is refused by its inode; a checkpoint named by a relative path is
not refused for being relative, and its errors name the absolute path; a checkpoint replaced by a FIFO is
refused as changed while it was exported."""

from __future__ import annotations

import os
import re

import pytest

from tracin._export.fingerprint import check_unchanged, checkpoint_file_digest, checkpoint_file_stats


def test_a_checkpoint_replaced_by_a_file_of_the_same_size_and_time_is_refused_by_its_inode(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"weights-A")
    stats = checkpoint_file_stats(path, 2)
    before = os.stat(path)
    swapped = tmp_path / "ck.pt.new"
    swapped.write_bytes(b"weights-B")  # the same size, other bytes
    os.utime(swapped, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(swapped, path)
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns) and now.st_ino != before.st_ino
    with pytest.raises(ValueError, match=r"^checkpoints\[2\] \(.*ck\.pt\) changed while it was exported"):
        check_unchanged(path, 2, stats)


def test_a_checkpoint_given_by_a_relative_path_is_checked_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck.pt").write_bytes(b"weights")
    stats = checkpoint_file_stats("ck.pt", 0)
    assert [s.path for s in stats] == [os.path.join(os.getcwd(), "ck.pt")]
    check_unchanged("ck.pt", 0, stats)  # the same file: no refusal
    where = re.escape(os.path.join(os.getcwd(), "missing.pt"))
    with pytest.raises(FileNotFoundError, match=rf"^checkpoints\[3\]: no checkpoint at {where}$"):
        checkpoint_file_digest("missing.pt", 3)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_checkpoint_replaced_by_a_fifo_after_its_stats_is_refused_as_changed(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"weights")
    stats = checkpoint_file_stats(path, 1)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match=r"^checkpoints\[1\] \(.*ck\.pt\) changed while it was exported \(.*FIFO"):
        check_unchanged(path, 1, stats)
