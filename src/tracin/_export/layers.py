"""Choosing parameters by name: a pattern is a name, a prefix of names, or a glob."""

from __future__ import annotations

import fnmatch
from typing import Any


def as_patterns(layers: Any, example: str) -> list[str]:
    """`layers` as a non-empty list of patterns (one string is one pattern); TypeError otherwise.
    example: patterns shown in the message, e.g. "['fc2'] or ['encoder.layer.11.*']"."""
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(p, str) and p for p in layers):
        raise TypeError(f"layers must be a non-empty list of name patterns (strings) such as {example}, got {layers!r}")
    return list(layers)


def matches(name: str, pattern: str, sep: str) -> bool:
    """True when `pattern` is `name`, a `sep`-separated prefix of it ("fc2" matches "fc2.weight"
    with sep "."), or a glob matching it or such a prefix of it ("h.*.mlp" matches "h.0.mlp.bias";
    fnmatch: '*' also crosses `sep`)."""
    prefix = pattern.rstrip(sep) + sep
    return (
        name == pattern
        or name.startswith(prefix)
        or fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(name, prefix + "*")
    )
