"""A demo record (.tracin-demo.json) whose "files" is not an object, or whose digest is not a SHA-256, is
refused as 'not the record' (a ValueError naming the file) and the folder's lock let go; a file at a
temporary name is never overwritten (r369 mutants O5, Q2, Q6)."""

from __future__ import annotations

import json

import pytest

from tracin.demo.outputs import LEDGER, DemoFiles


@pytest.mark.parametrize("files", [[], ["report.md"], "report.md", 3, None])
def test_a_record_whose_files_are_not_an_object_is_refused(tmp_path, files):
    (tmp_path / LEDGER).write_text(json.dumps({"files": files}))
    with pytest.raises(ValueError, match=rf"{LEDGER} is not the record tracin demo keeps of its files; choose"):
        DemoFiles(tmp_path)
    (tmp_path / LEDGER).write_text(json.dumps({"files": {}}))
    with DemoFiles(tmp_path) as owned:  # refused above without keeping the folder locked
        assert owned.entries == {}


@pytest.mark.parametrize("digest", ["abc", "0" * 63, "0" * 65, "G" * 64])
def test_a_record_whose_digest_is_not_a_sha256_is_refused_on_opening(tmp_path, digest):
    (tmp_path / LEDGER).write_text(json.dumps({"files": {"report.md": digest}}))
    with pytest.raises(ValueError, match=rf"it names 'report.md' \(with '{digest}'\), not a file the demo writes"):
        DemoFiles(tmp_path)


def test_a_file_that_appears_at_the_temporary_name_is_neither_overwritten_nor_removed(tmp_path):
    """put() creates its temporary file exclusively: one made there after clear() (by the user, or a
    run the lock did not keep out) stays as it was, and the write is refused (r369 mutant Q6)."""
    mine = tmp_path / ".report.tracin-demo-tmp.md"
    with DemoFiles(tmp_path) as owned:
        owned.clear([tmp_path / "report.md"])
        mine.write_text("mine")
        with pytest.raises(ValueError, match="was not written by tracin demo"):
            owned.put(tmp_path / "report.md", lambda path: path.write_text("the demo's"))
        assert owned.entries == {}
    assert mine.read_text() == "mine" and not (tmp_path / "report.md").exists()
