"""Test helpers: two gradient-store folders hold the same bytes; a store holding NaN / Inf rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tracin.store._convert import to_store_dtype
from tracin.store._format import data_files


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


def write_with_nonfinite(writer: Any, checkpoint: int, start: int, block: Any) -> None:
    """writer.write(checkpoint, start, block), NaN / Inf included (a GradientStoreWriter refuses them):
    the block is written with zeros in their place, then its values are planted into the data file(s),
    as a store written before writers refused them, or damaged on disk, holds them. For tests of how
    readers and scoring treat such a store; block: an (n, d) NumPy array, or a (left, right) pair."""
    arrays = list(block) if writer.factored else [block]
    finite = [np.isfinite(np.asarray(a, np.float32)) for a in arrays]
    zeroed = [np.where(f, a, 0).astype(np.asarray(a).dtype) for a, f in zip(arrays, finite, strict=True)]
    writer.write(checkpoint, start, tuple(zeroed) if writer.factored else zeroed[0])
    for name, a, f in zip(data_files(checkpoint, writer.factored), arrays, finite, strict=True):
        if not f.all():
            on_disk = np.load(Path(writer.path) / name, mmap_mode="r+")
            on_disk[start : start + len(a)] = to_store_dtype(a, writer.dtype, "block")
            on_disk.flush()
            del on_disk
