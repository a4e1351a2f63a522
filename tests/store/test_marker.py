"""The creation marker of a create killed after it wrote the manifest goes at the next resume."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tracin
from tracin.cli import main
from tracin.store import _files

_KILLED_BEFORE_THE_MARKER_GOES = textwrap.dedent(
    """
    import os, sys
    real = os.unlink
    def unlink(path, *args, **kwargs):
        if str(path).endswith("create-in-progress"):
            os._exit(9)  # as kill -9 between writing manifest.json and removing the marker
        return real(path, *args, **kwargs)
    os.unlink = unlink
    import tracin
    tracin.GradientStore.create(sys.argv[1], 4, [3])
    """
)


def test_a_resume_removes_the_marker_of_a_killed_create_and_the_store_stays_protected(tmp_path):
    path = tmp_path / "s"
    killed = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_THE_MARKER_GOES, str(path)], timeout=120)
    assert killed.returncode == 9
    assert sorted(os.listdir(path)) == ["checkpoint_000.npy", "create-in-progress", "manifest.json"]
    assert _files.interrupted_create(path) is None  # the manifest is there: a store to resume, not a create to redo
    assert main(["info", str(path)]) == 0
    w = tracin.GradientStore.create(path, 4, [3])
    assert "create-in-progress" not in os.listdir(path)
    w.write(0, 0, np.full((4, 3), 2.0, np.float32))
    np.testing.assert_array_equal(tracin.self_influence(w.finalize()), [12.0] * 4)
    assert sorted(os.listdir(path)) == ["checkpoint_000.npy", "manifest.json"]
    os.unlink(path / "manifest.json")  # a finished store that lost its manifest is not silently replaced
    with pytest.raises(ValueError, match="but no manifest.json, so it is not a store tracin wrote"):
        tracin.GradientStore.create(path, 4, [3])
    assert np.load(path / "checkpoint_000.npy")[0].tolist() == [2.0] * 3


_KILLED_REPLACING_THE_SECOND_DATA_FILE = textwrap.dedent(
    """
    import os, sys
    real = os.unlink
    def unlink(path, *args, **kwargs):
        if str(path).endswith("checkpoint_001.npy"):
            os._exit(9)  # as kill -9 while an overwrite removes the old store's files
        return real(path, *args, **kwargs)
    os.unlink = unlink
    import tracin
    tracin.GradientStore.create(sys.argv[1], 4, [5], overwrite=True)
    """
)


def test_an_overwrite_killed_while_removing_the_old_files_removed_the_manifest_first(tmp_path):
    path = tmp_path / "s"
    old = tracin.GradientStore.create(path, 4, [3, 2])
    old.write(0, 0, np.ones((4, 3), np.float32))
    old.write(1, 0, np.ones((4, 2), np.float32))
    old.finalize()
    killed = subprocess.run([sys.executable, "-c", _KILLED_REPLACING_THE_SECOND_DATA_FILE, str(path)], timeout=120)
    assert killed.returncode == 9
    # the manifest went before any data file: no store whose manifest names a file that is gone
    left = os.listdir(path)
    assert "manifest.json" not in left and {"checkpoint_001.npy", "create-in-progress"} <= set(left)
    assert _files.interrupted_create(path) is not None
    w = tracin.GradientStore.create(path, 4, [5])  # the interrupted create is redone without overwrite=True
    w.write(0, 0, np.full((4, 5), 2.0, np.float32))
    np.testing.assert_array_equal(tracin.self_influence(w.finalize()), [20.0] * 4)
