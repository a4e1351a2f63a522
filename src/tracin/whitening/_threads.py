"""BLAS thread count for the whitening's matrix products (threadpoolctl, needed only to set one)."""

from __future__ import annotations

import contextlib
from typing import Any

from .._validate import MAX_THREADS, positive_int


def blas_threads(num_threads: Any) -> contextlib.AbstractContextManager:
    """A context in which BLAS uses `num_threads` threads (None: BLAS's own default, all cores)."""
    if num_threads is None:
        return contextlib.nullcontext()
    count = positive_int(num_threads, "num_threads", maximum=MAX_THREADS)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ImportError(
            "num_threads= on whitening needs threadpoolctl to set BLAS's thread count "
            "(pip install threadpoolctl); num_threads=None uses every core"
        ) from None
    return threadpool_limits(limits=count, user_api="blas")
