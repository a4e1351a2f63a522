"""A writer whose close fails (closing its data files, releasing its directory lock) still lets go of the store:
its lock, and a range writer's claim on its rows, so the same process can open the store again."""

from __future__ import annotations

import pytest

import tracin
from tracin.store import _range_writer, _writer

from .ranges_task import SPEC


def _failing(monkeypatch, owner, name):
    def fail(self, *args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(owner, name, fail)


def test_the_directory_lock_is_released_when_closing_the_files_fails(tmp_path, monkeypatch):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    with monkeypatch.context() as m:
        _failing(m, _writer.DataFiles, "close")
        with pytest.raises(OSError, match="Input/output error"):
            w.close()
    tracin.GradientStore.create(path, **SPEC).close()  # not "being written by another writer"


def test_a_range_claim_is_released_when_closing_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    w = tracin.GradientStore.create(path, **SPEC, rows=(0, 100))
    with monkeypatch.context() as m:
        _failing(m, _range_writer.GradientStoreWriter, "close")
        with pytest.raises(OSError, match="Input/output error"):
            w.close()
    w._lock.release()  # what the failed base close left held; the claim is the range writer's own
    tracin.GradientStore.create(path, **SPEC, rows=(0, 100)).close()  # not "being written by another range writer"
