"""A store whose ids.npy is missing: a StoreFormatError when opened, a StoreChangedError for a reader."""

import os

import numpy as np
import pytest

import tracin
from tracin.cli import main
from tracin.store import StoreChangedError, StoreFormatError


@pytest.fixture
def path(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [3], ids=[10, 11, 12, 13])
    w.write(0, 0, np.ones((4, 3), np.float32))
    w.finalize()
    return tmp_path / "s"


def test_opening_or_resuming_a_store_without_its_ids_file_is_a_format_error(path, capsys):
    os.unlink(path / "ids.npy")
    with pytest.raises(StoreFormatError, match=r"ids\.npy: ids file is missing"):
        tracin.GradientStore.open(path)
    with pytest.raises(StoreFormatError, match=r"ids\.npy: ids file is missing"):
        tracin.GradientStore.create(path, 4, [3], ids=[10, 11, 12, 13])
    assert main(["info", str(path)]) == 1
    assert "malformed gradient store" in capsys.readouterr().err


def test_an_ids_file_removed_under_a_reader_is_a_store_changed_error(path):
    reader = tracin.GradientStore.open(path)
    assert reader.ids.tolist() == [10, 11, 12, 13]
    os.unlink(path / "ids.npy")
    with pytest.raises(StoreChangedError, match=r"ids file is missing.*valid when the gradient store was opened"):
        reader.ids  # noqa: B018
