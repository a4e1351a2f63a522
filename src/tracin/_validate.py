"""Argument checks shared by every public function, with messages naming the argument."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ._cpus import usable_cores

MAX_THREADS = 4096  # the most num_threads tracin's functions (and the CLI's --threads) take


def positive_int(value: Any, name: str, *, maximum: int | None = None) -> int:
    """`value` as an int >= 1 (Python or NumPy integer, not bool); TypeError / ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1 or (maximum is not None and value > maximum):
        limit = f" no larger than {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a positive integer{limit}, got {value!r}")
    return int(value)


def flag(value: Any, name: str) -> bool:
    """`value` as a bool (Python's True / False or NumPy's np.True_ / np.False_); TypeError naming `name` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def thread_count(num_threads: Any) -> int:
    """Kernel thread count: None -> 0 (all cores), else a positive integer."""
    return 0 if num_threads is None else positive_int(num_threads, "num_threads", maximum=MAX_THREADS)


def capped_threads(num_threads: int) -> int:
    """The thread count handed to the C++ kernel (scoring and projection): a thread_count capped at the
    usable cores (0 stays 0: all of them). The kernel computes on every thread it starts, with scratch
    of its own, so threads beyond the cores cost memory and time and gain nothing."""
    return min(num_threads, usable_cores())
