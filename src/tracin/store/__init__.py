"""Gradient stores on disk: larger than memory, resumable, shardable (format: docs/format.md)."""

from ._format import FORMAT_VERSION, StoreChangedError, StoreFormatError
from ._range_writer import GradientStoreRangeWriter
from ._store import GradientStore, describe
from ._writer import GradientStoreWriter

__all__ = [
    "FORMAT_VERSION",
    "GradientStore",
    "GradientStoreRangeWriter",
    "GradientStoreWriter",
    "StoreChangedError",
    "StoreFormatError",
    "describe",
]
