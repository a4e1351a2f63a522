"""Checkpoint lists: (source, learning_rate) pairs, or (source, learning_rate, optimizer_state)
triples, validated the same way by every adapter."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .._caller import user_stacklevel


class Checkpoint(NamedTuple):
    """One parsed checkpoint: its source (in memory or a path), learning rate, and the optimizer
    state saved with it as the adapter wraps it (None when not given)."""

    source: Any
    lr: float
    optimizer: Any = None


def learning_rate(lr: Any, where: str) -> float:
    """`lr` as a float: a finite real number (Python or NumPy scalar, or a 0-d array or tensor of
    one), not a bool or a string, and not negative (TracIn sums lr x gradient products over the
    checkpoints: a negative weight would flip that checkpoint's influence). A zero one is taken with a
    UserWarning naming it, as the checkpoint then adds nothing to any score."""
    lr = _scalar(lr)
    if not _is_rate(lr):
        schedule = (
            ": a learning-rate schedule (optax's, or a torch LR scheduler's lambda)? pass its value at the "
            "checkpoint's step, float(schedule(step))"
            if callable(lr)
            else ""
        )
        raise TypeError(f"{where} (learning rate) must be a real number, got {type(lr).__name__} {lr!r:.80}{schedule}")
    if not math.isfinite(lr):
        raise ValueError(f"{where} (learning rate) must be finite, got {lr!r}")
    if lr < 0:
        raise ValueError(
            f"{where} (learning rate) must not be negative, got {lr!r}: it weights the checkpoint's "
            "gradient products in every score (give the step size the optimizer used, a positive number)"
        )
    if lr == 0:
        warnings.warn(
            f"{where} (learning rate) is 0: this checkpoint's gradients are exported but add nothing to any "
            "score; drop it from checkpoints, or give the learning rate it was trained with",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return float(lr)


def parse_checkpoints(
    checkpoints: Any,
    source: str,
    accepts: Callable[[Any], bool] = lambda _: True,
    optimizer: Callable[[Any, int], Any] = lambda state, _: state,
) -> list[Checkpoint]:
    """Checkpoints from a sequence of (source, learning_rate) pairs or (source, learning_rate,
    optimizer_state) triples.

    source: how a checkpoint is called in messages ("state_dict or path", "params"); accepts:
    which checkpoint objects are allowed (others are a TypeError); optimizer(state, index): the
    adapter's wrapper of a given optimizer state (it raises on states it cannot take).
    """
    if isinstance(checkpoints, (str, bytes, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
        raise TypeError(
            f"checkpoints must be a sequence of ({source}, learning_rate) pairs, got {type(checkpoints).__name__}"
        )
    if not checkpoints:
        raise ValueError(f"checkpoints is empty; give at least one ({source}, learning_rate) pair")
    if (
        len(checkpoints) in (2, 3)
        and _is_rate(checkpoints[1])
        and not (isinstance(checkpoints[0], (tuple, list)) and len(checkpoints[0]) in (2, 3))
    ):
        raise TypeError(
            f"checkpoints must be a sequence of ({source}, learning_rate) pairs; this looks like one pair itself "
            "(its item 1 is a number): pass a list of them, [(checkpoint, learning_rate), ...]"
        )
    parsed = []
    for i, entry in enumerate(checkpoints):
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise TypeError(
                f"checkpoints[{i}] must be a ({source}, learning_rate) pair or a ({source}, "
                f"learning_rate, optimizer_state) triple, got {_describe(entry)}"
            )
        if not accepts(entry[0]):
            raise TypeError(f"checkpoints[{i}][0] must be a {source}, got {type(entry[0]).__name__}")
        rate = learning_rate(entry[1], f"checkpoints[{i}][1]")  # before the state: a swapped pair names the rate
        state = None if len(entry) == 2 or entry[2] is None else optimizer(entry[2], i)
        parsed.append(Checkpoint(entry[0], rate, state))
    return parsed


def warn_unused_states(checkpoints: Sequence[Checkpoint], preconditioner: str | None) -> None:
    """A UserWarning when checkpoints carry optimizer states that preconditioner=None leaves unused
    (plain SGD gradients are exported, as if no state were given), naming the first such entry."""
    if preconditioner is not None:
        return
    given = [i for i, entry in enumerate(checkpoints) if entry.optimizer is not None]
    if given:
        warnings.warn(
            f"checkpoints[{given[0]}][2] is an optimizer state, but preconditioner=None ignores it: the rows are "
            'plain SGD gradients. Pass preconditioner="adam" for Adam-preconditioned gradients; plain rows are '
            'right for test rows scored against preconditioner="adam_update" train rows: drop the state from '
            f"the checkpoint entries to say so ({len(given)} of {len(checkpoints)} carry one)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _describe(entry: Any) -> str:
    if isinstance(entry, (tuple, list)):
        return f"a {type(entry).__name__} of length {len(entry)}"
    return type(entry).__name__


def _scalar(x: Any) -> Any:
    """The value of a 0-d torch / NumPy / JAX array (torch.tensor(0.1), a scheduler's value); `x` otherwise."""
    return x.item() if getattr(x, "shape", None) == () and callable(getattr(x, "item", None)) else x


def _is_rate(x: Any) -> bool:
    """Whether `x` is a number learning_rate() takes (a 0-d array or tensor of one too), whatever its value."""
    x = _scalar(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def missing_optimizer_state(c: int, kind: str) -> str:
    """The refusal of checkpoints[c], given without the optimizer state a preconditioner `kind` needs."""
    return (
        f"checkpoints[{c}] has no optimizer state, which preconditioner={kind!r} needs: give "
        "(checkpoint, learning_rate, optimizer_state) for every checkpoint"
    )
