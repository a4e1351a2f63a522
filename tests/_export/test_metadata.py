"""The metadata schema: every row transform recorded under its key, fingerprints and checkpoint sources as given."""

from __future__ import annotations

import tracin
from tracin._export.metadata import export_metadata, last_layer_entry
from tracin._export.transforms import row_transforms


class _Scaling:
    key = "normalisation"

    def to_dict(self):
        return {"kind": "unit rows"}


def test_transforms_and_fingerprints_are_recorded():
    projection = tracin.Projection(8, seed=2)
    meta = export_metadata(
        "torch",
        "factored",
        [("fc.weight", (3, 4)), ("fc.bias", (3,))],
        ["fc"],
        "bfloat16",
        [_Scaling(), *row_transforms(projection, None)],
        fingerprints={"data": "d", "checkpoints": ["c0", "c1"], "loss": "l"},
        checkpoint_sources=("file", "state"),
    )
    assert meta == {
        "framework": "torch",
        "mode": "factored",
        "params": [{"name": "fc.weight", "shape": [3, 4]}, {"name": "fc.bias", "shape": [3]}],
        "layers": ["fc"],
        "dtype": "bfloat16",
        "projection": projection.to_dict(),
        "preconditioner": None,
        "normalisation": {"kind": "unit rows"},
        "fingerprints": {"data": "d", "checkpoints": ["c0", "c1"], "loss": "l"},
        "checkpoint_sources": ["file", "state"],
    }


def test_no_projection_is_recorded_as_none_and_last_layer_only_when_given():
    last = last_layer_entry("head", "head.weight", None)
    empty = {"fingerprints": {"data": None, "checkpoints": []}, "checkpoint_sources": []}
    meta = export_metadata("jax", "last_layer", [], None, "float32", [], last_layer=last, **empty)
    assert meta["projection"] is None and meta["preconditioner"] is None
    assert meta["last_layer"]["bias"] is None and meta["last_layer"]["layer"] == "head"
    assert "last_layer" not in export_metadata("jax", "full", [], None, "float32", [], **empty)
