"""An error raised again with more words, keeping its type where that type takes one message."""

from __future__ import annotations


def retyped(error: BaseException, message: str) -> Exception:
    """An error of `error`'s type saying `message`; a ValueError where that type cannot be built from one
    message (its constructor takes other arguments, or keeps other words)."""
    try:
        same = type(error)(message)
    except Exception:  # noqa: BLE001 - a type taking other arguments (JAX's tracer errors, a user's)
        return ValueError(message)
    return same if isinstance(same, Exception) and str(same) == message else ValueError(message)
