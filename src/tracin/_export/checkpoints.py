"""Checkpoint lists: (source, learning_rate) pairs, validated the same way by every adapter."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def learning_rate(lr: Any, where: str) -> float:
    """`lr` as a float: a finite real number (Python or NumPy), not a bool or a string."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where} (learning rate) must be a real number, got {lr!r}")
    if not math.isfinite(lr):
        raise ValueError(f"{where} (learning rate) must be finite, got {lr!r}")
    return float(lr)


def parse_checkpoints(checkpoints: Any, source: str,
                      accepts: Callable[[Any], bool] = lambda _: True) -> list[tuple[Any, float]]:
    """[(source, learning rate as float)] from a sequence of (source, learning_rate) pairs.

    source: how a checkpoint is called in messages ("state_dict or path", "params"); accepts:
    which checkpoint objects are allowed (others are a TypeError).
    """
    if isinstance(checkpoints, (str, bytes, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
        raise TypeError(f"checkpoints must be a sequence of ({source}, learning_rate) pairs, "
                        f"got {type(checkpoints).__name__}")
    if not checkpoints:
        raise ValueError(f"checkpoints is empty; give at least one ({source}, learning_rate) pair")
    parsed = []
    for i, pair in enumerate(checkpoints):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"checkpoints[{i}] must be a ({source}, learning_rate) pair, got {type(pair).__name__}")
        if not accepts(pair[0]):
            raise TypeError(f"checkpoints[{i}][0] must be a {source}, got {type(pair[0]).__name__}")
        parsed.append((pair[0], learning_rate(pair[1], f"checkpoints[{i}][1]")))
    return parsed
