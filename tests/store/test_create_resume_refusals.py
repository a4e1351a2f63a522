"""GradientStore.create reopening a store to resume it (r384, hand mutation testing of store/_create.py):
a store written with ids is not resumed without them, and a manifest.json that is a dangling symbolic
link is refused as a link (by create and by range writers), never taken for a missing store."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError

IDS = ["a", "b", "c", "d"]


def _unfinished(path, **spec):
    w = tracin.GradientStore.create(path, 4, [3], **spec)
    w.write(0, 0, np.ones((2, 3), np.float32))
    w.close()


def test_a_store_with_ids_is_not_resumed_without_them(tmp_path):
    path = tmp_path / "s"
    _unfinished(path, ids=IDS)
    with pytest.raises(ValueError, match=r"different spec \(ids given there vs absent here\); pass overwrite=True"):
        tracin.GradientStore.create(path, 4, [3])
    with pytest.raises(ValueError, match=r"different spec \(ids given there vs absent here\); create the store again"):
        tracin.GradientStore.create(path, 4, [3], rows=(2, 4))
    w = tracin.GradientStore.create(path, 4, [3], ids=IDS)  # with them, it resumes
    assert w.rows_done(0) == 2
    w.close()
    assert list(tracin.GradientStore.open(path, allow_partial=True).ids) == IDS[:2]  # the rows written


@pytest.mark.parametrize("rows", [None, (2, 4)])
def test_a_manifest_that_is_a_dangling_link_is_refused_as_a_link(tmp_path, rows):
    path = tmp_path / "s"
    _unfinished(path)
    os.unlink(path / "manifest.json")
    os.symlink(tmp_path / "nowhere.json", path / "manifest.json")
    with pytest.raises(StoreFormatError, match=r"manifest\.json is a symbolic link; a gradient store holds regular"):
        tracin.GradientStore.create(path, 4, [3], rows=rows)
    assert os.path.islink(path / "manifest.json") and not (tmp_path / "nowhere.json").exists()
    assert sorted(os.listdir(path)) == ["checkpoint_000.npy", "manifest.json"]
