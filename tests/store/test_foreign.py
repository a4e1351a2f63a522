"""A store directory holding a file a store never writes is refused, even with overwrite=True,
with a message that names the file and says what to do."""

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError


def test_a_store_with_a_stray_file_names_it_and_says_to_remove_it(tmp_path):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, 4, [3])
    w.write(0, 0, np.ones((4, 3), np.float32))
    w.finalize()
    (path / ".DS_Store").write_bytes(b"finder")
    with pytest.raises(ValueError) as refused:
        tracin.GradientStore.create(path, 4, [2], overwrite=True)
    message = str(refused.value)
    assert "holds a gradient store, and also .DS_Store, which a store never writes" in message
    assert "remove those to replace the store" in message and "not a gradient store" not in message
    assert (path / ".DS_Store").read_bytes() == b"finder"  # nothing was removed
    assert tracin.GradientStore.open(path).dims == (3,)
    (path / ".DS_Store").unlink()
    assert tracin.GradientStore.create(path, 4, [2], overwrite=True).dims == (2,)


def test_a_folder_of_other_files_is_still_not_a_gradient_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not empty and not a gradient store \(holds notes.txt\)"):
            tracin.GradientStore.create(tmp_path, 4, [3], overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["checkpoint_007.npy", "create-in-progress", "manifest.json.tmp", "rows-0-2.json"])
def test_a_directory_named_like_a_store_file_is_refused_before_the_old_store_is_touched(tmp_path, name):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, 4, [3])
    w.write(0, 0, np.arange(12, dtype=np.float32).reshape(4, 3))
    w.finalize()
    (path / name).mkdir()
    with pytest.raises(StoreFormatError, match=rf"{name} is a directory .*; remove it"):
        tracin.GradientStore.create(path, 4, [2], overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == sorted(["checkpoint_000.npy", "manifest.json", name])
    old = tracin.GradientStore.open(path)  # the refusal came before the marker and the removals
    assert old.dims == (3,)
    np.testing.assert_array_equal(tracin.self_influence(old), (np.arange(12.0).reshape(4, 3) ** 2).sum(axis=1))
    (path / name).rmdir()
    assert tracin.GradientStore.create(path, 4, [2], overwrite=True).dims == (2,)


@pytest.mark.parametrize("rows", [None, (0, 2)])
def test_a_directory_in_place_of_a_writers_temporary_is_refused_when_the_store_is_opened_to_write(tmp_path, rows):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 4, [3]).close()
    tmp = path / ("manifest.json.tmp" if rows is None else "rows-0-2.json.tmp")
    tmp.mkdir()
    with pytest.raises(StoreFormatError, match=rf"{tmp.name} is a directory .*; remove it"):
        tracin.GradientStore.create(path, 4, [3], rows=rows)  # before: the first write() failed, its rows written
    np.testing.assert_array_equal(np.load(path / "checkpoint_000.npy"), np.zeros((4, 3), np.float32))
    tmp.rmdir()
    w = tracin.GradientStore.create(path, 4, [3], rows=rows)
    w.write(0, 0, np.ones((2, 3), np.float32))
    assert w.rows_done(0) == 2
    w.close()
