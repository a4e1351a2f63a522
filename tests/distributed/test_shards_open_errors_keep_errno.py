"""A store path that cannot be opened is refused naming the side (test / train) first, as an OSError that keeps
its errno and file name: a missing path is ENOENT with the path as its filename, and an OSError of the open
(permission denied) keeps its own errno, strerror and filename, not a message alone."""

from __future__ import annotations

import errno
import os

import pytest

import tracin
from tracin.distributed._shards import as_side


def test_a_missing_path_is_enoent_with_its_filename(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as raised:
        as_side(missing, "train")
    e = raised.value
    assert e.errno == errno.ENOENT and e.filename == os.fspath(missing), (e.errno, e.filename)
    assert e.strerror == f"train: no gradient store at {missing} (not a directory)"
    assert str(e).startswith(f"[Errno {errno.ENOENT}] train: no gradient store at {missing}"), str(e)


def test_an_os_error_of_the_open_keeps_errno_strerror_and_filename(tmp_path, monkeypatch):
    manifest = os.fspath(tmp_path / "s" / "manifest.json")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", manifest)

    monkeypatch.setattr(tracin.GradientStore, "open", staticmethod(denied))
    with pytest.raises(PermissionError) as raised:
        as_side(str(tmp_path / "s"), "test")
    e = raised.value
    assert (e.errno, e.strerror, e.filename) == (errno.EACCES, "test: Permission denied", manifest)


def test_a_value_error_is_named_as_before(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"^test: "):
        as_side(tmp_path / "s", "test")
