"""Test folders named like packages (tests/torch, tests/jax, tests/distributed) never stand in for them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def hide_test_folders_named_like_packages(names: tuple[str, ...], folder: Path = TESTS) -> None:
    """Marks each of `names` missing (sys.modules[name] = None: import raises ImportError, so
    pytest.importorskip skips) where the only thing `import name` would find is a folder of `folder`
    without an __init__.py: pyproject's pythonpath puts tests/ on sys.path, and tests/torch, tests/jax,
    tests/distributed are then namespace packages that shadow torch, jax and Dask's distributed where
    those are not installed (review237 F5: 25 tests failed on 'torch has no attribute from_numpy')."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is None:  # a namespace package: no module file of its own
            places = [Path(p).resolve() for p in spec.submodule_search_locations or ()]
            if places and all(p.parent == folder.resolve() for p in places):
                sys.modules[name] = None  # type: ignore[assignment]
