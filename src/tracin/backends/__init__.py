"""Scoring backends by name: the generic loop in tracin.scoring asks `get(name)` for one.

Registered here: "cpu" (the C++ kernel), "cuda" (the torch backend on a CUDA device; "cuda:N"
for device N) and "torch:cpu" (the same torch backend on CPU tensors: a testing and debugging
device). A factory runs on first use only, so registering costs no import of its framework.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

from .base import Backend, BothSides, ChunkCache, TopK

__all__ = ["Backend", "BothSides", "ChunkCache", "TopK", "get", "names", "register"]

_factories: dict[str, Callable[..., Backend]] = {}
_indexed: set[str] = set()
_loaded: dict[str, Backend] = {}


def register(name: str, factory: Callable[..., Backend], *, indexed: bool = False) -> None:
    """Make `factory()` (called once, on first use) the backend called `name`.

    indexed: the backend runs on one of several numbered devices; `get("NAME:i")` calls factory(i)
    and `get("NAME")` factory(None) (the current device).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for backend {name!r} must be callable, got {factory!r}")
    if name in _factories:
        raise ValueError(f"a scoring backend named {name!r} is already registered")
    _factories[name] = factory
    if indexed:
        _indexed.add(name)


def names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_factories)


def get(name: str) -> Backend:
    """The backend registered as `name`, or "NAME:i" for an indexed one (created on first use)."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string ({_choices()}), got {name!r}")
    if name not in _loaded:
        _loaded[name] = _factory(name)()
    return _loaded[name]


def _factory(name: str) -> Callable[[], Backend]:
    base, _, index = name.rpartition(":")
    if name in _factories:
        return (lambda: _factories[name](None)) if name in _indexed else _factories[name]
    if base in _factories and base in _indexed and index.isdigit():
        return lambda: _factories[base](int(index))
    raise ValueError(f"unknown scoring backend {name!r}; registered: {_choices()}")


def _choices() -> str:
    return ", ".join(repr(n) + (f" (or '{n}:N')" if n in _indexed else "") for n in _factories)


def _cpu() -> Backend:
    from .cpu import CpuBackend

    return CpuBackend()


def torch_module(device: str) -> ModuleType:
    """The module tracin.backends.torch_device (the torch backend), imported for `device` (the name
    the caller passed: "cuda", "cuda:N" or "torch:cpu"); ValueError naming it when torch is not
    installed, or when an earlier import of torch in this process was interrupted (importing torch
    again then aborts the process in torch's C++ type registration)."""
    if "torch" not in sys.modules and any(name.startswith("torch.") for name in sys.modules):
        raise ValueError(
            f"device={device!r} scores with torch, but an earlier import of torch in this process was "
            "interrupted (e.g. Ctrl-C during the first call on a torch device) and torch cannot be imported "
            "again; restart Python"
        )
    try:
        from . import torch_device as module
    except ImportError as e:
        installed = importlib.util.find_spec("torch") is not None
        why = "failed to import" if installed else "is not installed"
        raise ValueError(
            f"device={device!r} scores with torch, which {why} ({e}); pip install torch, or use device='cpu'"
        ) from None
    return module


def _torch(device: str, name: str | None = None) -> Backend:
    """The torch backend on `device`, loaded for the device name `name` (default: `device`)."""
    return torch_module(device if name is None else name).make(device)


register("cpu", _cpu)
register("cuda", lambda index: _torch("cuda" if index is None else f"cuda:{index}"), indexed=True)
register("torch:cpu", lambda: _torch("cpu", "torch:cpu"))
