"""Covariance-whitened TracIn: fit (R + lambda I)^-1 on the train gradients, apply it to the test side."""

from ._whitening import DEFAULT_DAMPING, Whitening, WhiteningSpec

__all__ = ["DEFAULT_DAMPING", "Whitening", "WhiteningSpec"]
