"""What every method is given: one trained run with its data (a detection case: noisy labels; an
attribution case: clean labels and held-out test examples)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .influence import RunInfluence
from .training import Trajectory


@dataclass
class DetectionCase:
    """y_train: the (partly flipped) labels trained on; flipped: bool (n,) ground truth; seed: the run's."""

    run: Trajectory
    x_train: np.ndarray
    y_train: np.ndarray
    flipped: np.ndarray
    influence: RunInfluence
    seed: int


@dataclass
class AttributionCase:
    """A run trained on clean (x_train, y_train); attributions are asked for the rows of x_test."""

    run: Trajectory
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    influence: RunInfluence
    seed: int

    @property
    def projection_dim(self) -> int:
        """The dimension of the gradients whitening is fitted in, given to every projected peer alike."""
        space = self.influence.whitening_space
        return space["projected_to"] or space["parameters"]
