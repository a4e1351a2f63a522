"""The metadata both adapters record with exported gradients (one schema; scoring relies on it).

    framework      "torch" | "jax"
    mode           "full" | "last_layer"
    params         [{"name": str, "shape": [int, ...]}, ...]  the parameters, in row order
    layers         the user's layer patterns, or None
    dtype          the stored dtype name
    projection     Projection.to_dict(), or None
    last_layer     only with mode="last_layer": {"layer", "weight", "bias", "left", "right"}
    fingerprints   {"data": digest of inputs and targets, "checkpoints": [digest per checkpoint]}

Version strings are left out on purpose: a store's metadata is its spec, compared on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LEFT = "dL/d(output)"
RIGHT = "layer input, with 1 appended when the layer has a bias"


def last_layer_entry(layer: str, weight: str, bias: str | None) -> dict:
    """metadata["last_layer"]: the layer's name, its weight and bias parameter names (bias None
    when it has none), and what the left and right factors are."""
    return {"layer": layer, "weight": weight, "bias": bias, "left": LEFT, "right": RIGHT}


def export_metadata(framework: str, mode: str, params: Sequence[tuple[str, Sequence[int]]],
                    layers: list[str] | None, dtype: str, projection: Any, *,
                    last_layer: dict | None = None, checkpoints: list[str], data: str | None) -> dict:
    """The metadata dict (see the module docstring). params: (name, shape) in row order;
    checkpoints: a digest per checkpoint; data: the data digest (None until known)."""
    meta: dict[str, Any] = {
        "framework": framework,
        "mode": mode,
        "params": [{"name": name, "shape": [int(s) for s in shape]} for name, shape in params],
        "layers": layers,
        "dtype": dtype,
        "projection": None if projection is None else projection.to_dict(),
    }
    if last_layer is not None:
        meta["last_layer"] = last_layer
    meta["fingerprints"] = {"data": data, "checkpoints": list(checkpoints)}
    return meta
