"""Per-checkpoint TracIn terms of one trained run through tracin's public API, computed once and
shared by every recipe: self-influence (C, n) and test-by-train scores (C, m, n), unweighted
(each recipe chooses its checkpoints and multiplies by their learning rates), plain or whitened
(tracin.Whitening fitted per checkpoint on that checkpoint's train gradients)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import tracin
import tracin.torch

from .training import Trajectory


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


# Whitening inverts a d x d matrix per checkpoint and damping (O(d^3)): gradients wider than this are
# projected to it first. 1024 keeps the suite's ~1000 inversions to minutes (2048: about 8x longer).
WHITENING_MAX_DIM = 1024
WHITENING_PROJECTION = 1024


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows left at zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class RunInfluence:
    """The run's checkpoints against training data (x_train, y_train: the labels it was trained on)
    and optional test data. Recipe keys: mode "full" | "last_layer" | "factored", dim (projection
    dimension or 0), normalised (cosine: unit rows per checkpoint, full mode only)."""

    def __init__(
        self,
        run: Trajectory,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
    ):
        self.run = run
        self.train = (torch.from_numpy(x_train), torch.from_numpy(y_train))
        self.test = None if x_test is None else (torch.from_numpy(x_test), torch.from_numpy(y_test))
        self._self: dict[tuple, np.ndarray] = {}
        self._pairs: dict[tuple, np.ndarray] = {}
        self._whitened: dict[tuple, dict[float, np.ndarray]] = {}

    @property
    def rates(self) -> np.ndarray:
        """float64 (C,) learning rate of each checkpoint."""
        return np.array([c.learning_rate for c in self.run.checkpoints])

    @property
    def epochs(self) -> np.ndarray:
        """int (C,) epochs completed at each checkpoint."""
        return np.array([c.epoch for c in self.run.checkpoints])

    def _export(self, checkpoint: int, data: tuple, mode: str, dim: int):
        projection = tracin.Projection(dim, seed=checkpoint) if dim else None
        return tracin.torch.export_gradients(
            self.run.model,
            [(self.run.checkpoints[checkpoint].state, 1.0)],
            data,
            _loss,
            mode=mode,
            projection=projection,
            progress=False,
        )

    def self_terms(self, mode: str = "full", dim: int = 0) -> np.ndarray:
        """float64 (C, n): |g_c(z_i)|^2 per checkpoint c and training example i (computed once)."""
        if (mode, dim) not in self._self:
            self._self[mode, dim] = np.stack(
                [
                    tracin.self_influence(self._export(c, self.train, mode, dim)).astype(np.float64)
                    for c in range(len(self.run.checkpoints))
                ]
            )
        return self._self[mode, dim]

    def pair_terms(self, mode: str = "full", dim: int = 0, normalised: bool = False) -> np.ndarray:
        """float64 (C, m, n): <g_c(test_j), g_c(train_i)> per checkpoint (cosines if `normalised`;
        computed once)."""
        if self.test is None:
            raise ValueError("pair_terms needs test data")
        if (mode, dim, normalised) not in self._pairs:
            self._pairs[mode, dim, normalised] = self._pair_terms(mode, dim, normalised)
        return self._pairs[mode, dim, normalised]

    def _pair_terms(self, mode: str, dim: int, normalised: bool) -> np.ndarray:
        out = []
        for c in range(len(self.run.checkpoints)):
            test, train = self._export(c, self.test, mode, dim), self._export(c, self.train, mode, dim)
            if normalised:
                test = tracin.Gradients([unit_rows(test.matrices[0])])
                train = tracin.Gradients([unit_rows(train.matrices[0])])
            out.append(tracin.scores(test, train).astype(np.float64))
        return np.stack(out)

    @property
    def whitening_space(self) -> dict:
        """The gradients whitening is fitted on: all parameters, projected when there are too many."""
        params = sum(p.numel() for p in self.run.model.parameters())
        return {"parameters": params, "projected_to": WHITENING_PROJECTION if params > WHITENING_MAX_DIM else None}

    def whitened_self_terms(self, dampings: tuple[float, ...]) -> dict[float, np.ndarray]:
        """Per damping, float64 (C, n): g_c(z_i)^T (R_c + lambda I)^-1 g_c(z_i) (computed once)."""
        return self._whitened_terms("self", dampings)

    def whitened_pair_terms(self, dampings: tuple[float, ...]) -> dict[float, np.ndarray]:
        """Per damping, float64 (C, m, n): g_c(test_j)^T (R_c + lambda I)^-1 g_c(train_i) (computed once)."""
        if self.test is None:
            raise ValueError("whitened_pair_terms needs test data")
        return self._whitened_terms("pairs", dampings)

    def _whitened_terms(self, kind: str, dampings: tuple[float, ...]) -> dict[float, np.ndarray]:
        """Each checkpoint's gradients exported once and R fitted once on the train side, then
        re-damped per damping (Whitening.with_damping)."""
        if (kind, dampings) not in self._whitened:
            dim = self.whitening_space["projected_to"] or 0
            out: dict[float, list] = {d: [] for d in dampings}
            for c in range(len(self.run.checkpoints)):
                train = self._export(c, self.train, "full", dim)
                test = self._export(c, self.test, "full", dim) if kind == "pairs" else None
                fitted = tracin.Whitening.fit(train, damping=dampings[0], progress=False)
                for d in dampings:
                    w = fitted if d == dampings[0] else fitted.with_damping(d, progress=False)
                    if test is None:
                        terms = w.self_influence(train, progress=False)
                    else:
                        terms = tracin.scores(w.apply(test), train)
                    out[d].append(terms.astype(np.float64))
            self._whitened[kind, dampings] = {d: np.stack(v) for d, v in out.items()}
        return self._whitened[kind, dampings]
