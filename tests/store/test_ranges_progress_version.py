"""A range writer's progress file (rows-<start>-<stop>.json) states its version as an integer from 1 to
the current one (docs/format.md): version 0, a boolean, a string or a float is refused naming the file,
by the range writer and by the writer of the whole store that would merge it."""

from __future__ import annotations

import json

import pytest

import tracin
from tracin.store import StoreFormatError

SPEC = dict(n_rows=60, dims=[4, 3], weights=[1.0, 0.5], dtype="float32")


def _progress(path, version) -> str:
    """A progress file of rows [0, 30) (rows [0, 10) of checkpoint 0 written) stating `version`."""
    store_id = json.loads((path / "manifest.json").read_text())["id"]
    doc = {
        "format": "tracin-gradient-store-range",
        "version": version,
        "id": store_id,
        "rows": [0, 30],
        "written": [[[0, 10]], []],
    }
    return json.dumps(doc)


@pytest.mark.parametrize(
    "version, shown",
    [(0, "0"), (-1, "-1"), (True, "True"), ("1", "'1'"), (1.0, "1.0"), (None, "None")],  # as repr shows them
)
def test_a_progress_file_s_version_must_be_an_integer_from_1(tmp_path, version, shown):
    path = tmp_path / "s"
    tracin.GradientStore.create(path, **SPEC).close()
    (path / "rows-0-30.json").write_text(_progress(path, version))
    pattern = (
        r"rows-0-30\.json: version must be an integer from 1 to 1, got "
        + shown.replace(".", r"\.")
        + r"; remove it to write rows \[0, 30\) again"
    )
    with pytest.raises(StoreFormatError, match=pattern):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 30))
    with pytest.raises(StoreFormatError, match=pattern):  # nor merged
        tracin.GradientStore.create(path, **SPEC)
    assert json.loads((path / "manifest.json").read_text())["checkpoints"][0]["written"] == []
    (path / "rows-0-30.json").write_text(_progress(path, 1))  # version 1 is taken
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 30)) as w:
        assert (w.rows_done(0), w.rows_done(1)) == (10, 0)
