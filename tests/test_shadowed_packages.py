"""tests/shadowed_packages.py: a test folder named like a package never stands in for that package."""

from __future__ import annotations

import sys

import pytest

from shadowed_packages import hide_test_folders_named_like_packages


def test_a_test_folder_named_like_a_missing_package_is_skipped_not_imported(tmp_path, monkeypatch):
    (tmp_path / "absentpkg_r237").mkdir()  # like tests/torch where torch is not installed: no __init__.py
    (tmp_path / "present_r237").mkdir()
    (tmp_path / "present_r237" / "__init__.py").write_text("")  # a real package is left alone
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        hide_test_folders_named_like_packages(("absentpkg_r237", "present_r237"), tmp_path)
        with pytest.raises(pytest.skip.Exception):
            pytest.importorskip("absentpkg_r237")
        assert pytest.importorskip("present_r237").__file__.endswith("__init__.py")
    finally:
        for name in ("absentpkg_r237", "present_r237"):
            sys.modules.pop(name, None)


def test_installed_packages_are_not_hidden():
    torch = pytest.importorskip("torch")
    assert hasattr(torch, "from_numpy")
