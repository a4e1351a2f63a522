"""A demo record (.tracin-demo.json) whose "files" is not an object is refused as 'not the record', a
ValueError naming the file, like any other malformed record, and the folder's lock is let go (r369 mutant O5)."""

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
