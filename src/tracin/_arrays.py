"""Turning user arrays (NumPy, np.memmap, torch tensors, JAX / CuPy arrays) into kernel-ready views."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# Kernel dtype codes (csrc/include/tracin/tracin.hpp: DType).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
# DLPack device types in host memory: kDLCPU (1) and kDLCUDAHost (3, pinned). Anything else is on a device.
_DLPACK_HOST = (1, 3)
# 16-bit integers are most likely bfloat16 bit patterns, as tracin hands them out (GradientSet.matrices, a
# bfloat16 store's .npy files): converting them with .astype would read the bits as integers.
_BITS_ADVICE = (
    "16-bit integers here are most likely bfloat16 bit patterns (how a bfloat16 GradientSet's .matrices "
    "and a bfloat16 GradientStore's .npy files hold them): pass arr.view(ml_dtypes.bfloat16) (no copy; "
    "import ml_dtypes), not a conversion to float, which would read the bits as integers"
)

_TORCH_ADVICE = "(convert with .float())"  # float64 gradients, as NumPy's .astype advice; on a GPU it stays there


def _from_torch(x: Any, name: str, device_arrays: bool) -> tuple[Any, str]:
    import torch

    if x.layout != torch.strided:
        raise TypeError(f"{name} is a torch tensor of layout {x.layout}; pass a dense one (.to_dense())")
    if x.device.type != "cpu":
        if not device_arrays:
            raise ValueError(f"{name} is a torch tensor on {x.device}; move it to the CPU first (.cpu())")
        return _device_tensor(x, name)
    x = x.detach().resolve_neg().resolve_conj()  # a lazily negated view is copied, as .numpy() needs
    if x.dtype == torch.bfloat16:
        # NumPy has no bfloat16: hand over the raw bits, shared with the tensor.
        return x.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    if x.dtype in (torch.int16, getattr(torch, "uint16", torch.int16)):  # torch.uint16 is new in torch 2.3
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected float32, float16 or bfloat16. 16-bit integers here are most "
            "likely bfloat16 bit patterns: pass x.view(torch.bfloat16), not x.float(), which reads them as integers"
        )
    if x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"{name} has dtype {x.dtype}; expected float32, float16 or bfloat16 {_TORCH_ADVICE}")
    return x.numpy(), str(x.numpy().dtype)


def _device_tensor(x: Any, name: str) -> tuple[Any, str]:
    """(tensor, dtype name) of a 2-D floating torch tensor on an accelerator, kept there (bfloat16
    stays a torch.bfloat16 tensor); copied on its device only if its rows are not contiguous runs."""
    import torch

    x = x.detach().resolve_neg().resolve_conj()
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} has dtype {x.dtype}; expected float32, float16 or bfloat16 {_TORCH_ADVICE}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dims), got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if (cols > 1 and x.stride(1) != 1) or (rows > 1 and x.stride(0) < cols):
        x = x.contiguous()
    return x, str(x.dtype).removeprefix("torch.")


def _from_dlpack_device(x: Any, name: str) -> tuple[Any, str]:
    """A device-resident DLPack array (JAX on a GPU, CuPy) as a torch tensor sharing its memory."""
    try:
        import torch
    except ImportError:
        raise TypeError(
            f"{name} is an array on a GPU; scoring it there needs torch installed "
            "(pip install torch), or copy it to the host first"
        ) from None
    try:
        tensor = torch.from_dlpack(x)
    except (RuntimeError, TypeError, ValueError, BufferError, AssertionError) as e:  # a CPU-only torch asserts
        raise TypeError(f"{name}: torch cannot take this device array through DLPack ({e})") from None
    return _device_tensor(tensor, name)


def as_matrix(x: Any, name: str, *, device_arrays: bool = False) -> tuple[Any, str]:
    """(view, dtype name) for a 2-D floating array; bfloat16 comes back as its uint16 bits.

    No data is copied when each row is one contiguous run, rows do not overlap and the byte order
    is native; otherwise (column-strided, reversed, broadcast or sliding-window views, big-endian
    arrays on a little-endian machine) one native C-contiguous copy is made, since the kernel
    reads each row as one run of native numbers at a row stride of at least the row length.

    device_arrays: torch tensors on a GPU (and JAX / CuPy GPU arrays, through DLPack as torch
    tensors) come back as torch tensors on their device (bfloat16 as torch.bfloat16), for the
    device backends; otherwise a CUDA tensor is a ValueError.
    """
    if is_torch_tensor(x):
        return _check_2d(*_from_torch(x, name, device_arrays), name)
    if device_arrays and _on_device(x):
        return _from_dlpack_device(x, name)
    arr = np.asarray(x)
    dtype = arr.dtype.name
    if arr.dtype.kind in "SU" or (arr.dtype.kind == "O" and arr.ndim == 0):  # text; None, a dict, a set
        raise TypeError(
            f"{name} must be an array of numbers; got {type(x).__name__} (NumPy reads it as dtype {dtype}); "
            "expected a 2-D float32, float16 or bfloat16 array (NumPy, torch, JAX)"
        )
    if dtype == "bfloat16":  # ml_dtypes (also what JAX bfloat16 arrays convert to)
        arr = arr.view(np.dtype(np.uint16).newbyteorder(arr.dtype.byteorder))  # the bits, same byte order
    elif dtype in ("uint16", "int16"):
        raise TypeError(f"{name} has dtype {dtype}; expected float32, float16 or bfloat16. {_BITS_ADVICE}")
    elif dtype not in ("float32", "float16"):
        # a list or other non-array has no .astype
        convert = ".astype(np.float32)" if hasattr(x, "astype") else "np.asarray(x, dtype=np.float32)"
        raise TypeError(f"{name} has dtype {dtype}; expected float32, float16 or bfloat16 (convert with {convert})")
    return _check_2d(arr, dtype, name)


def is_torch_tensor(x: Any) -> bool:
    """Whether x is a torch.Tensor, subclasses from any package included (torch is not imported here:
    a tensor exists only once something imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, getattr(torch, "Tensor", ()))


def _on_device(x: Any) -> bool:
    """Whether x is a DLPack array that lives outside host memory (a GPU array of JAX or CuPy)."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
        return False
    try:
        kind = int(x.__dlpack_device__()[0])
    except (TypeError, ValueError, RuntimeError):
        return False
    return kind not in _DLPACK_HOST


def _check_2d(arr: Any, dtype: str, name: str) -> tuple[Any, str]:
    if not isinstance(arr, np.ndarray):  # a device tensor, checked by _device_tensor
        return arr, dtype
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dims), got shape {arr.shape}")
    if not arr.dtype.isnative or not _rows_are_runs(arr):
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    return arr, dtype


def _rows_are_runs(arr: np.ndarray) -> bool:
    """Whether every row of a 2-D array is one contiguous run, rows in order and not overlapping."""
    rows, cols = arr.shape
    row_stride, col_stride = arr.strides
    if cols > 1 and col_stride != arr.itemsize:
        return False
    return rows < 2 or (row_stride >= cols * arr.itemsize and row_stride % arr.itemsize == 0)


def scalar_leaf_kind(leaf: Any) -> str:
    """What a data leaf with no dimension 0 is, for the torch and JAX data errors: 'a NumPy float32 scalar',
    'a 0-d array (float32)' (a NumPy or JAX array), else by its type: 'a float', 'an int', 'a str'."""
    if isinstance(leaf, np.generic):
        return f"a NumPy {leaf.dtype} scalar"
    if hasattr(leaf, "dtype") and getattr(leaf, "ndim", None) == 0:
        return f"a 0-d array ({leaf.dtype})"
    kind = type(leaf).__name__
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"
