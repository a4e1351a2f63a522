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


def test_optimizer_state_sources_are_recorded_only_when_given():
    empty = {"fingerprints": {"data": None, "checkpoints": ["c0", "c1"]}, "checkpoint_sources": ["state", "file"]}
    meta = export_metadata("torch", "full", [], None, "float32", [], optimizer_state_sources=("file", "state"), **empty)
    assert meta["optimizer_state_sources"] == ["file", "state"]
    assert list(meta)[-2:] == ["checkpoint_sources", "optimizer_state_sources"]
    assert "optimizer_state_sources" not in export_metadata("torch", "full", [], None, "float32", [], **empty)


def test_the_driver_records_how_each_optimizer_state_was_digested():
    from tracin._export.driver import optimizer_state_source

    class _Torch:  # tracin.torch's OptimizerState keeps a path it was given as .source
        def __init__(self, source):
            self.source = source

    class _Jax:  # tracin.jax's holds an optax state, no .source
        adam = None

    assert [optimizer_state_source(s) for s in (_Torch("o.pt"), _Torch({"state": {}}), _Jax())] == [
        "file",
        "state",
        "state",
    ]
