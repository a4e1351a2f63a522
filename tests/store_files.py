"""Test helper: two gradient-store folders hold the same bytes."""

from __future__ import annotations

import json
from pathlib import Path


def assert_same_store_files(got: str | Path, expected: str | Path) -> tuple[dict, dict]:
    """The same file names, every file but the manifest equal byte for byte, and the manifests equal but
    for their random store ids, which differ (two stores). Returns both manifests, ids included."""
    got, expected = Path(got), Path(expected)
    names = sorted(p.name for p in expected.iterdir())
    assert names and sorted(p.name for p in got.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (got / name).read_bytes() == (expected / name).read_bytes(), name
    manifests = tuple(json.loads((p / "manifest.json").read_text()) for p in (got, expected))
    ours, theirs = ({k: v for k, v in m.items() if k != "id"} for m in manifests)
    assert manifests[0]["id"] != manifests[1]["id"] and ours == theirs
    return manifests
