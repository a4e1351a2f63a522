"""retyped: an error raised again with more words keeps its type where that type takes one message."""

from __future__ import annotations

import pytest

from tracin._retyped import retyped


class _TwoArguments(ValueError):
    def __init__(self, got: int, expected: int) -> None:
        super().__init__(f"got {got}, expected {expected}")


@pytest.mark.parametrize(
    "error, kind",
    [
        (RuntimeError("a"), RuntimeError),
        (TypeError("a"), TypeError),
        (KeyError("a"), ValueError),  # str(KeyError("m")) is "'m'": the words would change
        (_TwoArguments(1, 2), ValueError),  # its constructor takes other arguments
        (OSError("gone"), OSError),
    ],
)
def test_the_type_is_kept_where_it_takes_the_message_alone(error, kind):
    message = f"{error} (more words)"
    got = retyped(error, message)
    assert type(got) is kind and str(got) == message
