"""A store directory holding a file a store never writes is refused, even with overwrite=True,
with a message that names the file and says what to do."""

import numpy as np
import pytest

import tracin


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
