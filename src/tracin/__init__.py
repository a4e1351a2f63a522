"""tracin: exact, fast TracIn training-data influence for PyTorch, JAX and NumPy.

influence(test, train) = sum over checkpoints c of w_c * <g_c(test), g_c(train)>.
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
