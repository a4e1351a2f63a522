"""tracin: exact, fast TracIn training-data influence for PyTorch, JAX and NumPy.

influence(test, train) = sum over checkpoints c of w_c * <g_c(test), g_c(train)>, where g_c are per-example
loss gradients at checkpoint c (rows of float32 arrays, tracin.Gradients, or a GradientStore written by
tracin.torch / tracin.jax export_gradients) and w_c is the learning rate around checkpoint c:

>>> import numpy as np, tracin
>>> train = tracin.Gradients([np.eye(3, dtype=np.float32), np.ones((3, 3), np.float32)], weights=[0.5, 0.25])
>>> test = tracin.Gradients([np.array([[0, 2, 0]], np.float32), np.zeros((1, 3), np.float32)])
>>> tracin.top_k(test, train, k=2).indices.tolist(), tracin.self_influence(train).tolist()
([[1, 0]], [1.25, 1.25, 1.25])

tracin.report (per-checkpoint diagnostics) is imported on first use; the store's errors
(StoreFormatError, StoreChangedError) are in tracin.store.
"""

import importlib

from ._core import detect_isa
from .gradients import FactoredGradients, Gradients, GradientSet
from .projection import Projection
from .scoring import BothSides, TopK, aggregate, merge_top_k, scores, self_influence, top_k
from .store import GradientStore
from .whitening import Whitening

__version__ = "0.1.0"

__all__ = [
    "BothSides",
    "FactoredGradients",
    "GradientSet",
    "GradientStore",
    "Gradients",
    "Projection",
    "TopK",
    "Whitening",
    "aggregate",
    "detect_isa",
    "merge_top_k",
    "scores",
    "self_influence",
    "top_k",
]

_LAZY = ("report",)  # submodules reachable as tracin.<name> without importing them here


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
