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
_PACKAGES = {"jax": "jax jaxlib", "torch": "torch"}  # what to uninstall before reinstalling a broken one
FULL_ROWS = ("jax",)  # whose demo stores hold full gradient rows (tracin.jax has no factored mode); others factors


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
    ValueError naming the choices, or the extra to install when the framework is missing or fails to import."""
    name = "numpy" if framework is None else framework
    if name not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if name not in available():
        raise ValueError(f"framework {name!r} is not installed: {_EXTRAS[name]}")
    try:
        module = importlib.import_module(f"{__package__}.{_MODULES[name]}")
    except ImportError as e:  # installed but broken: a missing shared library, a jax / jaxlib mismatch
        if name == "numpy":  # imported already: a demo package is missing (threadpoolctl), as its error says
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"framework {name!r} is installed but fails to import ({reason}); reinstall it: "
            f"pip uninstall -y {_PACKAGES[name]} && {_EXTRAS[name]}"
        ) from e
    return name, module.train


def row_bytes(framework: str, layers: list[tuple[int, int]]) -> int:
    """Bytes of one example's gradient at one checkpoint in `framework`'s demo stores (float32), for the
    dense layers (inputs, outputs) of the MLP: a full row of every weight and bias (FULL_ROWS), else each
    layer's factors dL/d(output) and [input, 1]."""
    if framework in FULL_ROWS:
        return 4 * parameters(layers)
    return 4 * sum(n_out + n_in + 1 for n_in, n_out in layers)


def parameters(layers: list[tuple[int, int]]) -> int:
    """How many weights and biases the dense layers (inputs, outputs) have."""
    return sum((n_in + 1) * n_out for n_in, n_out in layers)


def checkpoint_path(directory: Path, epoch: int, framework: str) -> Path:
    """Where `framework`'s training saves the checkpoint taken after `epoch` (0-based)."""
    return directory / f"checkpoint_{epoch + 1:04d}{_CHECKPOINT_SUFFIXES[framework]}"
