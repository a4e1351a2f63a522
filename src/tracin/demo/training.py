"""What every framework of the demo shares about training: the settings, the learning-rate
schedule, when checkpoints are taken, the batch order and the SGD-with-momentum update."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CHECKPOINTS = 10  # one every 10% of training (the recipe of tracin.demo.recipe), at most one per epoch
MAX_EPOCHS = 10_000  # about 100 s of NumPy training (the default 150 takes ~2 s); the held-out peak comes far earlier


@dataclass(frozen=True)
class TrainingConfig:
    """How the demo's MLP is trained. checkpoints: how many are saved, evenly spaced, the last after the
    final epoch; None (the default) means min(DEFAULT_CHECKPOINTS, epochs), the rule `tracin demo` follows
    without --checkpoints; given, it must be between 1 and epochs. epochs: at most MAX_EPOCHS."""

    epochs: int = 150
    batch_size: int = 64
    hidden: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    decay_at: float = 0.6  # fraction of epochs after which the rate drops 10x
    checkpoints: int | None = None  # None: min(DEFAULT_CHECKPOINTS, epochs)
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("epochs", self.epochs, 1, MAX_EPOCHS)
        for name in ("batch_size", "hidden"):
            check_integer(name, getattr(self, name), 1)
        check_integer("seed", self.seed, 0)
        if self.checkpoints is None:
            object.__setattr__(self, "checkpoints", min(DEFAULT_CHECKPOINTS, self.epochs))  # frozen: set once here
        check_integer("checkpoints", self.checkpoints, 1)
        if self.checkpoints > self.epochs:
            raise ValueError(f"checkpoints must be between 1 and epochs ({self.epochs}), got {self.checkpoints}")
        check_real("learning_rate", self.learning_rate, lambda v: v > 0, "(0, inf)")
        check_real("momentum", self.momentum, lambda v: 0 <= v < 1, "[0, 1)")
        check_real("decay_at", self.decay_at, lambda v: 0 <= v <= 1, "[0, 1]")

    def learning_rate_at(self, epoch: int) -> float:
        """The rate in force during `epoch` (0-based)."""
        # rounded: float arithmetic puts some whole products just above (0.28 * 25 = 7.000000000000001),
        # which would hold the rate for one more epoch than decay_at of them
        return self.learning_rate * (1.0 if epoch < round(self.decay_at * self.epochs, 9) else 0.1)

    def checkpoint_epochs(self) -> set[int]:
        """0-based epochs after which a checkpoint is saved: `checkpoints` evenly spaced, the last one included."""
        return {i * self.epochs // self.checkpoints - 1 for i in range(1, self.checkpoints + 1)}


def check_integer(name: str, value: Any, least: int, most: int | None = None) -> None:
    """ValueError naming `name` unless value is a Python or NumPy integer (not a bool) in [least, most]."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < least
        or (most is not None and value > most)
    ):
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name} must be {kind}{'' if most is None else f' at most {most}'}, got {value!r}")


def check_real(name: str, value: Any, inside: Callable[[float], bool], interval: str) -> None:
    """ValueError naming `name` unless value is a finite real number (not a bool) with inside(value)."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not (real and math.isfinite(value) and inside(value)):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose largest logit (n, classes) is at the label y (n,)."""
    return float((np.asarray(logits).argmax(1) == np.asarray(y)).mean())


def batches(config: TrainingConfig, n: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(epoch, row-index batches of that epoch), reshuffled each epoch from config.seed."""
    rng = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        order = rng.permutation(n)
        yield epoch, [order[s : s + config.batch_size] for s in range(0, n, config.batch_size)]


def sgd_momentum(
    params: dict[str, Any], velocity: dict[str, Any], grads: dict[str, Any], lr: float, momentum: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One step of SGD with momentum as torch.optim.SGD takes it (v = momentum * v + g; p -= lr * v),
    on dicts of NumPy or JAX arrays; velocity starts at zeros. Returns (params, velocity)."""
    velocity = {k: momentum * velocity[k] + grads[k] for k in params}
    return {k: params[k] - lr * velocity[k] for k in params}, velocity
