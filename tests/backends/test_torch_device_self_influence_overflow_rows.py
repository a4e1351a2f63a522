"""Self-influence beyond float32 from finite rows on the torch backend (device="torch:cpu"): the error
names the first five overflowing train rows, in order, as the C++ kernel's does, where seven overflow,
across train tiles. Killer test of hand mutant D14 (r379: four rows named; the suite's case had two)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin import _tunables

pytest.importorskip("torch")


@pytest.mark.parametrize("factored", [False, True])
def test_self_influence_overflow_names_the_first_five_rows_as_the_cpu_kernel(monkeypatch, factored):
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 3 * 4 * 6)  # tiles of 3 rows
    rows = np.ones((11, 4), dtype=np.float32)
    rows[[1, 2, 4, 6, 7, 9, 10]] = 3e19  # w |g|^2 = 3.6e39 in float64: beyond float32
    right = np.ones((11, 2), dtype=np.float32)
    grads = tracin.FactoredGradients([rows], [right]) if factored else tracin.Gradients([rows])
    messages = []
    for device in ("cpu", "torch:cpu"):
        with pytest.raises(
            ValueError, match=r"^self-influence overflowed float32 for train rows \[1, 2, 4, 6, 7\] "
        ) as e:
            tracin.self_influence(grads, device=device)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
