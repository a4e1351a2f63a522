"""Which framework trains the demo's model and computes its gradients, and what each must supply."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..store import GradientStore
from .data import NoisyDigits
from .training import TrainingConfig

FRAMEWORKS = ("numpy", "jax", "torch")  # lightest first; numpy needs nothing beyond the demo extra
_MODULES = {"numpy": "with_numpy", "jax": "with_jax", "torch": "with_torch"}
_CHECKPOINT_SUFFIXES = {"numpy": ".npz", "jax": ".npz", "torch": ".pt"}  # what each saves its checkpoints as
_EXTRAS = {"jax": "pip install 'tracin[jax]'", "torch": "pip install 'tracin[torch]'"}


class TrainedModel(Protocol):
    """The demo's MLP after training, with its checkpoints (paths and learning rates) and its
    accuracy on the held-out set after each epoch (float64 (epochs,))."""

    checkpoints: list[tuple[Path, float]]
    held_out_accuracy: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Final model's outputs: float32 (n, 10) for x float32 (n, 64)."""

    def logits_at(self, checkpoint: int, x: np.ndarray) -> np.ndarray:
        """Outputs (as logits) of the model saved at checkpoints[checkpoint] (0-based)."""

    def export(self, x: np.ndarray, y: np.ndarray, path: Path, progress: bool, traced: int) -> GradientStore:
        """Per-example loss gradients at the first `traced` checkpoints, written to a finished GradientStore at path."""


SaveCheckpoint = Callable[[int, Callable[[Path], object]], Path]
"""save(epoch, write): the checkpoint taken after `epoch` (0-based), written by write(path); returns
where it lies."""
Train = Callable[[NoisyDigits, TrainingConfig, SaveCheckpoint, Callable[[int], None]], TrainedModel]


def available() -> list[str]:
    """The frameworks installed here, lightest first."""
    return [f for f in FRAMEWORKS if f == "numpy" or importlib.util.find_spec(f) is not None]


def trainer(framework: str | None) -> tuple[str, Train]:
    """(name, train function) of `framework` (None: the lightest one installed, NumPy);
    ValueError naming the choices or the package to install."""
    name = "numpy" if framework is None else framework
    if name not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if name not in available():
        raise ValueError(f"framework {name!r} is not installed: {_EXTRAS[name]}")
    module = importlib.import_module(f"{__package__}.{_MODULES[name]}")
    return name, module.train


def checkpoint_path(directory: Path, epoch: int, framework: str) -> Path:
    """Where `framework`'s training saves the checkpoint taken after `epoch` (0-based)."""
    return directory / f"checkpoint_{epoch + 1:04d}{_CHECKPOINT_SUFFIXES[framework]}"
