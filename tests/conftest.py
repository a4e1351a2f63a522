"""Shared set-up: test folders never stand in for missing packages; seeded random gradient sets."""

from __future__ import annotations

import numpy as np
import pytest

from shadowed_packages import hide_test_folders_named_like_packages

hide_test_folders_named_like_packages(("torch", "jax", "distributed"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
