"""Converting written blocks (NumPy / torch / JAX, float32 / float16 / bfloat16) to a store dtype."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import as_matrix, is_torch_tensor


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 array with the values of bfloat16 numbers given as uint16 bits (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bits of the bfloat16 nearest to each float32 (ties to even; NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)  # keep it a quiet NaN
    return bits


def to_store_dtype(x: Any, dtype: str, name: str) -> np.ndarray:
    """C-contiguous (rows, d) array of `x` in the store dtype (bfloat16 as uint16 bits).

    x: 2-D NumPy / torch (any device) / JAX array in float32, float16 or bfloat16. No copy when
    `x` is already a contiguous array of that dtype. Finite values that would become infinite in
    the store dtype are a ValueError (rather than silently stored as inf).
    """
    if is_torch_tensor(x) and x.device.type != "cpu":
        x = x.detach().cpu()
    view, source = as_matrix(x, name)
    if source == dtype:
        return np.ascontiguousarray(view)
    as_f32 = bfloat16_bits_to_float32(view) if source == "bfloat16" else view.astype(np.float32)
    if dtype == "bfloat16":
        out = float32_to_bfloat16_bits(as_f32)
        finite = (out & 0x7F80) != 0x7F80
    else:
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(as_f32.astype(dtype))
        finite = np.isfinite(out)
    if dtype != "float32" and not np.all(finite | ~np.isfinite(as_f32)):
        limit = np.finfo(np.float16).max if dtype == "float16" else 3.3895314e38
        raise ValueError(
            f"{name} holds {source} values beyond the {dtype} range (|x| > {limit:g}); "
            "store them as float32 (or bfloat16 instead of float16)"
        )
    return out
