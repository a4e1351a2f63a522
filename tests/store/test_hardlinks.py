"""Hard links inside a store: writers refuse a data file shared with another path (a `cp -al` or
`rsync --link-dest` snapshot, a linked-in file), so no other store's rows change; readers still read
a hard-linked snapshot of a finished store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError

pytestmark = pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links on this OS")

SHARED = r"has 2 hard links: its data is shared with another path .*cp -al.*copy the store with `cp -a`"


def _unfinished(path: Path, n: int = 10, d: int = 4) -> None:
    """A store of n rows, rows [0, n/2) written (values 1, 2, ...), the rest not."""
    w = tracin.GradientStore.create(path, n_rows=n, dims=[d])
    w.write(0, 0, np.arange(1, n // 2 * d + 1, dtype=np.float32).reshape(n // 2, d))
    w.close()


def _link_copy(src: Path, dst: Path) -> None:
    """What `cp -al src dst` makes: a new folder whose files are hard links to src's."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_resuming_a_store_whose_data_file_is_linked_to_an_outside_file_is_refused(tmp_path):
    outside = tmp_path / "precious.npy"
    np.save(outside, np.full((10, 4), 7, np.float32))
    before = outside.read_bytes()
    _unfinished(tmp_path / "s")
    data = tmp_path / "s" / "checkpoint_000.npy"
    data.unlink()
    os.link(outside, data)
    with pytest.raises(StoreFormatError, match=f"{data}.* {SHARED}"):
        tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4])
    assert outside.read_bytes() == before
    with pytest.raises(StoreFormatError, match=SHARED):  # a range writer opens the same way
        tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4], rows=(5, 10))
    assert outside.read_bytes() == before


def test_a_cp_al_snapshot_and_its_original_are_both_refused_for_writing_and_neither_changes(tmp_path):
    a, snap = tmp_path / "A", tmp_path / "snapshot"
    _unfinished(a)
    _link_copy(a, snap)
    before = _bytes(a)
    for folder in (snap, a):
        with pytest.raises(StoreFormatError, match=SHARED):
            tracin.GradientStore.create(folder, n_rows=10, dims=[4])
    assert _bytes(a) == before == _bytes(snap)
    # the advice works: a real copy resumes, and the original is untouched
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in before.items():
        (copy / name).write_bytes(data)
    w = tracin.GradientStore.create(copy, n_rows=10, dims=[4])
    w.write(0, 5, np.full((5, 4), 3, np.float32))
    done = w.finalize()
    assert _bytes(a) == before
    expected = np.vstack([np.arange(1, 21, dtype=np.float64).reshape(5, 4), np.full((5, 4), 3.0)])
    np.testing.assert_allclose(tracin.self_influence(done), (expected**2).sum(1), rtol=1e-6)


def test_a_link_made_while_the_writer_is_open_stops_the_next_write(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4])
    w.write(0, 0, np.ones((5, 4), np.float32))
    os.link(tmp_path / "s" / "checkpoint_000.npy", tmp_path / "other.npy")
    before = (tmp_path / "other.npy").read_bytes()
    with pytest.raises(StoreFormatError, match=SHARED):
        w.write(0, 5, np.full((5, 4), 9, np.float32))
    w.close()
    assert (tmp_path / "other.npy").read_bytes() == before


def test_readers_read_a_hard_linked_snapshot_of_a_finished_store(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((10, 4)).astype(np.float32)
    w = tracin.GradientStore.create(tmp_path / "A", n_rows=10, dims=[4])
    w.write(0, 0, rows)
    w.finalize()
    _link_copy(tmp_path / "A", tmp_path / "snap")
    expected = (rows.astype(np.float64) ** 2).sum(1)
    for folder in ("A", "snap"):
        np.testing.assert_allclose(tracin.self_influence(tracin.GradientStore.open(tmp_path / folder)), expected, 1e-6)


def test_overwrite_over_a_snapshot_replaces_its_files_without_touching_the_shared_data(tmp_path):
    a, snap = tmp_path / "A", tmp_path / "snapshot"
    _unfinished(a)
    _link_copy(a, snap)
    before = _bytes(a)
    w = tracin.GradientStore.create(snap, n_rows=10, dims=[4], overwrite=True)  # unlinks, never truncates
    w.write(0, 0, np.full((10, 4), 5, np.float32))
    w.finalize()
    assert _bytes(a) == before
    assert all(f.stat().st_nlink == 1 for f in snap.iterdir())
