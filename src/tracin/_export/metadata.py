"""The metadata both adapters record with exported gradients (one schema; scoring relies on it).

    framework      "torch" | "jax"
    mode           "full" | "last_layer" | "factored"
    params         [{"name": str, "shape": [int, ...]}, ...]  the parameters, in row order
    layers         the user's layer patterns, or None
    dtype          the stored dtype name
    projection     Projection.to_dict(), or None (likewise any other row transform, under its key)
    preconditioner {"kind": "adam" | "adam_update", hyperparameters...}, or None (plain gradients)
    last_layer     only with mode="last_layer": {"layer", "weight", "bias", "left", "right"}
    fingerprints   {"data": digest of inputs and targets, "checkpoints": [digest per checkpoint],
                    plus what the adapter adds: "model" (torch: {"structure": digest of module
                    types and settings, parameter names, shapes and dtypes; "settings": module
                    attributes; "buffers": non-persistent buffer digests; "code": forward code
                    digests}, model_digest; a store from versions before holds the structure
                    digest alone), "loss" (the loss function's identity), "layer_input" (jax),
                    "optimizer_states" (digest per checkpoint, only with a preconditioner)}
    checkpoint_sources
                   ["file" | "state", ...]: how each digest in fingerprints["checkpoints"] was made.
                   "file": of the bytes at the path given (the same weights saved again differ);
                   "state": of an in-memory checkpoint's arrays, by the framework. Scoring compares
                   two sides' digests made the same way. Outside "fingerprints" (which a resume
                   compares input by input); stores exported before it was recorded lack it.
    optimizer_state_sources
                   ["file" | "state", ...], only with fingerprints["optimizer_states"] (a
                   preconditioner): how each optimizer-state digest there was made. "file": of
                   the bytes at the path given (torch; a state saved again differs); "state": of
                   an in-memory state's arrays (torch: its tensors and settings; jax: the Adam
                   state's mu, nu and count). Scoring compares two "adam" sides' digests made the
                   same way. Stores exported before it was recorded lack it (not compared).

Version strings are left out on purpose: a store's metadata is its spec, compared on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .transforms import RowTransform

LEFT = "dL/d(output)"
RIGHT = "layer input, with 1 appended when the layer has a bias"


def last_layer_entry(layer: str, weight: str, bias: str | None) -> dict:
    """metadata["last_layer"]: the layer's name, its weight and bias parameter names (bias None
    when it has none), and what the left and right factors are."""
    return {"layer": layer, "weight": weight, "bias": bias, "left": LEFT, "right": RIGHT}


def export_metadata(
    framework: str,
    mode: str,
    params: Sequence[tuple[str, Sequence[int]]],
    layers: list[str] | None,
    dtype: str,
    transforms: Sequence[RowTransform],
    *,
    last_layer: dict | None = None,
    fingerprints: Mapping[str, Any],
    checkpoint_sources: Sequence[str],
    optimizer_state_sources: Sequence[str] | None = None,
) -> dict:
    """The metadata dict (see the module docstring). params: (name, shape) in row order;
    transforms: the row transforms applied, in order; fingerprints: "data", "checkpoints" and the
    adapter's own entries; checkpoint_sources: "file" or "state" per checkpoint;
    optimizer_state_sources: the same per optimizer state, None (not recorded) without them."""
    meta: dict[str, Any] = {
        "framework": framework,
        "mode": mode,
        "params": [{"name": name, "shape": [int(s) for s in shape]} for name, shape in params],
        "layers": layers,
        "dtype": dtype,
        "projection": None,
        "preconditioner": None,
    }
    for t in transforms:
        meta[t.key] = t.to_dict()
    if last_layer is not None:
        meta["last_layer"] = last_layer
    meta["fingerprints"] = dict(fingerprints)
    meta["checkpoint_sources"] = list(checkpoint_sources)
    if optimizer_state_sources is not None:
        meta["optimizer_state_sources"] = list(optimizer_state_sources)
    return meta
