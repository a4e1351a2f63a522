"""Scoring backends by name: the generic loop in tracin.scoring asks `get(name)` for one.

"cpu" (the C++ kernel) is registered here. Another backend (e.g. CUDA) registers a factory under
its name; the factory runs on first use only, so registering costs no import of its framework.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Backend, BothSides, TopK

__all__ = ["Backend", "BothSides", "TopK", "get", "names", "register"]

_factories: dict[str, Callable[[], Backend]] = {}
_loaded: dict[str, Backend] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Make `factory()` (called once, on first use) the backend called `name`."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for backend {name!r} must be callable, got {factory!r}")
    if name in _factories:
        raise ValueError(f"a scoring backend named {name!r} is already registered")
    _factories[name] = factory


def names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_factories)


def get(name: str) -> Backend:
    """The backend registered as `name` (created on first use)."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string ({_choices()}), got {name!r}")
    if name not in _factories:
        raise ValueError(f"unknown scoring backend {name!r}; registered: {_choices()}")
    if name not in _loaded:
        _loaded[name] = _factories[name]()
    return _loaded[name]


def _choices() -> str:
    return ", ".join(repr(n) for n in _factories)


def _cpu() -> Backend:
    from .cpu import CpuBackend

    return CpuBackend()


register("cpu", _cpu)
