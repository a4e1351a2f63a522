"""tracin.store._files at the edges its callers rarely reach: a link or directory swapped in between the
lstat and the open is refused as such (not an OS error), a refused open closes the descriptor it made, and
files are only ever created, never truncated over an existing one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tracin.store import StoreFormatError, _files


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd to count descriptors")


def _swapping(path: Path, make: Callable[[Path], object]) -> Callable[[Path, int], int]:
    """An opener that replaces the regular file at `path` by make(path) just before opening it (as another
    process could between open_file's lstat and its open)."""

    def opener(p, flags):
        os.unlink(p)
        make(p)
        return os.open(p, flags)

    return opener


@pytest.mark.parametrize("writable", [False, True])
def test_a_link_swapped_in_after_the_lstat_is_refused_as_a_link(tmp_path, writable):
    target = tmp_path / "elsewhere.npy"
    target.write_bytes(b"outside the store")
    path = tmp_path / "checkpoint_000.npy"
    path.write_bytes(b"data")
    opener = _swapping(path, lambda p: os.symlink(target, p))
    with pytest.raises(StoreFormatError, match=r"checkpoint_000\.npy is a symbolic link; .* never follows links"):
        _files.open_file(path, writable=writable, opener=opener)
    assert target.read_bytes() == b"outside the store"


def test_a_directory_swapped_in_after_the_lstat_is_refused_as_a_directory(tmp_path):
    path = tmp_path / "checkpoint_000.npy"
    path.write_bytes(b"data")
    with pytest.raises(StoreFormatError, match=r"checkpoint_000\.npy is a directory \(a gradient store holds regular"):
        _files.open_file(path, writable=True, opener=_swapping(path, os.mkdir))


@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links on this OS")
def test_a_hard_linked_file_refused_for_writing_is_closed_by_the_closer(tmp_path):
    path = tmp_path / "checkpoint_000.npy"
    path.write_bytes(b"data")
    os.link(path, tmp_path / "snapshot.npy")
    opened, closed = [], []

    def opener(p, flags):
        opened.append(os.open(p, flags))
        return opened[-1]

    def closer(fd):
        closed.append(fd)
        os.close(fd)

    with pytest.raises(StoreFormatError, match="checkpoint_000.npy has 2 hard links"):
        _files.open_file(path, writable=True, opener=opener, closer=closer)
    assert len(opened) == 1 and closed == opened


@needs_proc
@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links on this OS")
def test_a_hard_linked_file_refused_for_writing_leaves_no_descriptor_open(tmp_path):
    path = tmp_path / "checkpoint_000.npy"
    path.write_bytes(b"data")
    os.link(path, tmp_path / "snapshot.npy")
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(StoreFormatError, match="hard links"):
            _files.open_file(path, writable=True)
    assert _open_fds() == before


def test_create_file_never_opens_an_existing_file(tmp_path):
    path = tmp_path / "manifest.json.tmp"
    path.write_bytes(b"someone else's bytes")
    with pytest.raises(FileExistsError):
        _files.create_file(path)
    with pytest.raises(FileExistsError):
        _files.write_new_file(path, b"new")
    assert path.read_bytes() == b"someone else's bytes"


def test_write_new_file_writes_exactly_the_data(tmp_path):
    path = tmp_path / "f"
    _files.write_new_file(path, b"0123456789")
    assert path.read_bytes() == b"0123456789"
