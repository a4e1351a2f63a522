"""Test helper: a Ctrl-C in the middle of an export."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


@contextmanager
def ctrl_c_on_call(owner: type, name: str, nth: int) -> Iterator[pytest.ExceptionInfo]:
    """Within the block, the nth call of the method owner.name raises KeyboardInterrupt, which the block
    must let out (it fails otherwise); the method is restored on leaving it. Yields the caught exception
    info (its traceback keeps the interrupted frames alive until the caller drops it)."""
    real, calls = getattr(owner, name), []

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    setattr(owner, name, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            yield caught
    finally:
        setattr(owner, name, real)
