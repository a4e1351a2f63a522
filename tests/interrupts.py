"""Test helper: a Ctrl-C in the middle of an export."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest


@contextmanager
def ctrl_c_when(owner: type, name: str, when: Callable[..., bool]) -> Iterator[pytest.ExceptionInfo]:
    """Within the block, a call of the method owner.name whose arguments (less self) satisfy `when`
    raises KeyboardInterrupt, which the block must let out (it fails otherwise); the method is restored
    on leaving it. Yields the caught exception info (its traceback keeps the interrupted frames alive
    until the caller drops it)."""
    real = getattr(owner, name)

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    setattr(owner, name, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            yield caught
    finally:
        setattr(owner, name, real)


def ctrl_c_on_call(owner: type, name: str, nth: int) -> AbstractContextManager[pytest.ExceptionInfo]:
    """ctrl_c_when for the nth call of owner.name."""
    calls = itertools.count(1)
    return ctrl_c_when(owner, name, lambda *args, **kwargs: next(calls) == nth)
