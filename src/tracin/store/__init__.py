"""Gradient stores on disk: larger than memory, resumable, shardable (format: docs/format.md)."""

from ._format import FORMAT_VERSION, StoreFormatError
from ._store import GradientStore, describe
from ._writer import GradientStoreWriter

__all__ = ["FORMAT_VERSION", "GradientStore", "GradientStoreWriter", "StoreFormatError", "describe"]
