"""Which backend scores a call: device= and precision= checked against where the rows live.

device None: the GPU the rows are on when some are on one (torch CUDA tensors, JAX or CuPy GPU
arrays), else "cpu". "cpu" is the C++ kernel; "cuda" / "cuda:N" the torch backend on that GPU
(host rows stream to it); "torch:cpu" the torch backend on the CPU, for tests and debugging.
"""

from __future__ import annotations

import re
from typing import Any

from ..gradients import GradientSet, KernelSide
from . import get, torch_module
from .base import Backend

PRECISIONS = ("float32", "tf32")
# The device names torch takes: an index in ASCII digits, no leading zero ("cuda:01" it refuses).
_DEVICE = re.compile(r"cpu|torch:cpu|cuda(:(0|[1-9][0-9]*))?")


def check_precision(precision: Any) -> None:
    """TypeError / ValueError unless `precision` is one of PRECISIONS."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise (ValueError if isinstance(precision, str) else TypeError)(
            f"precision must be 'float32' or 'tf32' (TF32 GEMMs, CUDA devices only), got {precision!r}"
        )


def choose(device: Any, precision: Any, sets: dict[str, GradientSet]) -> Backend:
    """The backend for `device` and `precision` given the named sets (e.g. {"test": ..., "train": ...})."""
    check_precision(precision)
    if device is not None and (not isinstance(device, str) or not _DEVICE.fullmatch(device)):
        raise (ValueError if isinstance(device, str) else TypeError)(
            "device must be 'cpu' (the C++ kernel), 'cuda' or 'cuda:N' (a GPU, through torch) or 'torch:cpu' "
            f"(the torch backend on the CPU, for tests), or None (where the rows are), got {device!r}"
        )
    resident = {name: _resident_device(name, s) for name, s in sets.items()}
    on_gpu = {name: d for name, d in resident.items() if d is not None}
    if device is None:
        if len(set(on_gpu.values())) > 1:
            raise ValueError(f"the sets are on different devices ({_listed(on_gpu)}); put them on one")
        device = next(iter(on_gpu.values()), "cpu")
    elif device == "cuda":
        device = str(torch_module(device).resolve(device))  # "cuda:N" of the current GPU
    for name, where in on_gpu.items():
        if where != device:
            raise ValueError(
                f"device={device!r} but {name} is on {where}; pass device={where!r} (or leave "
                "device= out), or move the rows"
            )
    if precision == "tf32" and not device.startswith("cuda"):
        raise ValueError(f"precision='tf32' needs a CUDA device (device='cuda'), not {device!r}")
    backend = get(device)
    return backend.with_tf32() if precision == "tf32" else backend


def _resident_device(name: str, s: GradientSet) -> str | None:
    """The device (e.g. "cuda:0") of the set's rows that are not in host memory, None if all are;
    ValueError for rows on a device other than the CPU or CUDA (meta, mps, xpu)."""
    blocks = KernelSide._make(s.kernel_side(0, 0)).blocks
    devices = {str(b.device) for b in blocks if str(getattr(b, "device", "cpu")) != "cpu"}
    for where in sorted(devices):
        if where.partition(":")[0] != "cuda":
            raise ValueError(
                f"{name} is on {where}, but scoring runs on the CPU or on a CUDA device only; "
                "move the rows with .cpu() (or to a CUDA device)"
            )
    if len(devices) > 1:
        raise ValueError(f"{name} has rows on several devices ({', '.join(sorted(devices))}); put them on one")
    return devices.pop() if devices else None


def _listed(where: dict[str, str]) -> str:
    return ", ".join(f"{name} on {d}" for name, d in where.items())
