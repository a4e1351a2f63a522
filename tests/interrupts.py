"""Test helpers: a Ctrl-C, or a failing data source, in the middle of an export."""

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


class Killed(Exception):
    """Raised by FailingBatches: the export stops there, as a killed process would."""


class FailingBatches(list):
    """A list of batches whose `on`-th pass (1: the first) raises Killed after `after` batches (an
    export interrupted part-way)."""

    def __init__(self, batches: list, on: int, after: int):
        super().__init__(batches)
        self.on, self.after, self.passes = on, after, 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for i, b in enumerate(super().__iter__()):
            if self.passes == self.on and i == self.after:
                raise Killed
            yield b
