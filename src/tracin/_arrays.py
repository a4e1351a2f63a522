"""Turning user arrays (NumPy, np.memmap, torch tensors, JAX arrays) into kernel-ready views."""

from __future__ import annotations

from typing import Any

import numpy as np

# Kernel dtype codes (csrc/include/tracin/tracin.hpp: DType).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _from_torch(x: Any, name: str) -> tuple[np.ndarray, str]:
    import torch

    if x.device.type != "cpu":
        raise ValueError(f"{name} is a torch tensor on {x.device}; move it to the CPU first (.cpu())")
    x = x.detach()
    if x.dtype == torch.bfloat16:
        # NumPy has no bfloat16: hand over the raw bits, shared with the tensor.
        return x.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    if x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"{name} has dtype {x.dtype}; expected float32, float16 or bfloat16")
    return x.numpy(), str(x.numpy().dtype)


def as_matrix(x: Any, name: str) -> tuple[np.ndarray, str]:
    """(view, dtype name) for a 2-D floating array; bfloat16 comes back as its uint16 bits.

    No data is copied when each row is one contiguous run and rows do not overlap; otherwise
    (column-strided, reversed, broadcast or sliding-window views) a C-contiguous copy is made,
    since the kernel reads each row as one run at a row stride of at least the row length.
    """
    if type(x).__module__.startswith("torch"):
        arr, dtype = _from_torch(x, name)
    else:
        arr = np.asarray(x)
        dtype = arr.dtype.name
        if dtype == "bfloat16":  # ml_dtypes (also what JAX bfloat16 arrays convert to)
            arr = arr.view(np.uint16)
        elif dtype not in ("float32", "float16"):
            raise TypeError(
                f"{name} has dtype {dtype}; expected float32, float16 or bfloat16 "
                f"(convert with .astype(np.float32))"
            )
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dims), got shape {arr.shape}")
    if not _rows_are_runs(arr):
        arr = np.ascontiguousarray(arr)
    return arr, dtype


def _rows_are_runs(arr: np.ndarray) -> bool:
    """Whether every row of a 2-D array is one contiguous run, rows in order and not overlapping."""
    rows, cols = arr.shape
    row_stride, col_stride = arr.strides
    if cols > 1 and col_stride != arr.itemsize:
        return False
    return rows < 2 or (row_stride >= cols * arr.itemsize and row_stride % arr.itemsize == 0)
