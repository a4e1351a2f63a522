"""Checkpoint lists: (params, learning_rate) pairs, params a pytree or a saved checkpoint's path."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any


def parse_checkpoints(checkpoints: Any) -> list[tuple[Any, float]]:
    """Validates `checkpoints` and returns [(params or path, lr)] with lr as float."""
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, (list, tuple)):
        raise TypeError("checkpoints must be a list of (params, learning_rate) pairs, "
                        f"got {type(checkpoints).__name__}")
    if not checkpoints:
        raise ValueError("checkpoints must hold at least one (params, learning_rate) pair")
    parsed = []
    for c, entry in enumerate(checkpoints):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise TypeError(f"checkpoints[{c}] must be a (params, learning_rate) pair, got {type(entry).__name__}")
        params, lr = entry
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise TypeError(f"checkpoints[{c}]: learning_rate must be a number, got {lr!r}") from None
        if not math.isfinite(lr):
            raise ValueError(f"checkpoints[{c}]: learning_rate must be finite, got {lr}")
        parsed.append((params, lr))
    return parsed


def describe(params: Any) -> str:
    """What a checkpoint entry was, for the metadata: its path, or 'in-memory pytree'."""
    return os.fspath(params) if isinstance(params, (str, os.PathLike)) else "in-memory pytree"


def restore(source: Any, where: str) -> Any:
    """The params pytree of a checkpoint entry: returned as is, or restored from a path.

    A directory is read with orbax (`StandardCheckpointer`); a file as Flax msgpack
    (`flax.serialization.msgpack_restore`). Both give the nested dicts of arrays that were saved.
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = os.path.abspath(os.fspath(source))
    if os.path.isdir(path):
        try:
            import orbax.checkpoint as ocp
        except ImportError:
            raise ImportError(f"{where}: {path} is a directory (an orbax checkpoint); reading it needs "
                              "orbax-checkpoint (pip install orbax-checkpoint)") from None
        return ocp.StandardCheckpointer().restore(path)
    if os.path.isfile(path):
        try:
            from flax import serialization
        except ImportError:
            raise ImportError(f"{where}: {path} is a file (a Flax msgpack checkpoint); reading it needs "
                              "flax (pip install flax)") from None
        with open(path, "rb") as f:
            return serialization.msgpack_restore(f.read())
    raise FileNotFoundError(f"{where}: no checkpoint at {path}")


def iter_params(entries: list[tuple[Any, float]]) -> Iterator[tuple[int, Any]]:
    """(index, params pytree) per checkpoint, each restored only when reached."""
    for c, (source, _) in enumerate(entries):
        yield c, restore(source, f"checkpoints[{c}]")
