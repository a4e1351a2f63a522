"""A store re-created (overwrite=True) or removed while it is being opened, or before info(): the
error is StoreChangedError ('re-created'/'removed', open it again), not a malformed store or a bare
FileNotFoundError; a file missing from a store that did not change is still malformed."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.store import StoreChangedError, StoreFormatError, _store


def _make(path, n_rows=6, dims=(3, 2)) -> None:
    w = tracin.GradientStore.create(path, n_rows=n_rows, dims=list(dims), overwrite=True)
    for c, d in enumerate(dims):
        w.write(c, 0, np.ones((n_rows, d), np.float32))
    w.finalize()


@pytest.mark.parametrize(
    "remade", [{"dims": (3,)}, {"n_rows": 9}], ids=["a file fewer (missing)", "other shapes (file sizes differ)"]
)
def test_a_store_re_created_while_it_is_opened_is_a_changed_store(tmp_path, monkeypatch, remade):
    path = tmp_path / "s"
    _make(path)
    inspect = _store._DataFile.inspect.__func__
    calls = []

    def re_created_first(cls, root, *args):
        if not calls:  # the manifest is read: now another process re-creates the store
            _make(path, **remade)
        calls.append(1)
        return inspect(cls, root, *args)

    monkeypatch.setattr(_store._DataFile, "inspect", classmethod(re_created_first))
    with pytest.raises(StoreChangedError, match=rf"gradient store {path} was re-created while it was being opened"):
        tracin.GradientStore.open(path)
    monkeypatch.undo()
    assert tracin.GradientStore.open(path).n_rows == remade.get("n_rows", 6)  # opening again works


def test_a_store_removed_while_it_is_opened_is_a_changed_store(tmp_path, monkeypatch):
    path = tmp_path / "s"
    _make(path)
    inspect = _store._DataFile.inspect.__func__

    def removed_first(cls, root, *args):
        for f in path.iterdir():
            f.unlink()
        return inspect(cls, root, *args)

    monkeypatch.setattr(_store._DataFile, "inspect", classmethod(removed_first))
    with pytest.raises(StoreChangedError, match="no manifest.json now"):
        tracin.GradientStore.open(path)


def test_a_missing_file_of_an_unchanged_store_is_still_malformed(tmp_path):
    path = tmp_path / "s"
    _make(path)
    (path / "checkpoint_001.npy").unlink()
    with pytest.raises(StoreFormatError, match="checkpoint_001.npy: data file is missing") as e:
        tracin.GradientStore.open(path)
    assert not isinstance(e.value, StoreChangedError)


def test_info_of_a_store_re_created_or_stripped_after_opening_is_a_changed_store(tmp_path):
    path = tmp_path / "s"
    _make(path)
    store = tracin.GradientStore.open(path)
    _make(path, dims=(3,))  # checkpoint_001.npy is gone
    with pytest.raises(StoreChangedError, match="re-created after it was opened"):
        store.info()
    store = tracin.GradientStore.open(path)
    (path / "checkpoint_000.npy").unlink()
    with pytest.raises(StoreChangedError, match="checkpoint_000.npy was removed after the gradient store was opened"):
        store.info()


def test_ids_of_a_store_whose_manifest_went_after_opening_are_a_changed_store(tmp_path):
    """A re-create removes the old manifest first: .ids then says the store changed, even while the old
    ids.npy (removed later) is still there unchanged."""
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, n_rows=4, dims=[3], ids=[10, 11, 12, 13])
    w.write(0, 0, np.ones((4, 3), np.float32))
    store = w.finalize()
    assert store[1:3].ids.tolist() == [11, 12]
    (path / "manifest.json").unlink()
    with pytest.raises(StoreChangedError, match=rf"gradient store {path} was removed after it was opened"):
        store.ids  # noqa: B018
