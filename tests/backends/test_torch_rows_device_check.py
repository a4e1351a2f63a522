"""The torch backend's own check that a side's tensors are on its device (_torch_rows.check_device),
for callers of the backend protocol that skip the public functions' placement (tracin.distributed's
tasks, the generic loop of another front end): a block on another device is a ValueError naming the
side, the block as the C++ kernel names it and both devices, before any work, for every call of the
protocol. Killer test of hand mutant R4 (r379: the check dropped; the public functions' placement
refuses such rows first, so the suite never reached it)."""

from __future__ import annotations

import numpy as np
import pytest

from tracin import backends
from tracin.gradients import KernelSide

torch = pytest.importorskip("torch")


def _calls(backend, test: KernelSide, train: KernelSide):
    w = [1.0] * (len(train.blocks) // (2 if train.factored else 1))
    return {
        "scores": lambda: backend.scores(test, train, w, num_threads=1),
        "top_k": lambda: backend.top_k(test, train, w, 2, "both", num_threads=1),
        "aggregate": lambda: backend.aggregate(test, train, w, num_threads=1),
    }


@pytest.mark.parametrize("where", ["test", "train"])
@pytest.mark.parametrize("factored", [False, True])
def test_a_block_on_another_device_is_refused_naming_it(where, factored):
    backend = backends.get("torch:cpu")
    host = [np.ones((3, 4), np.float32)] * (2 if factored else 1)
    elsewhere = (
        [np.ones((3, 4), np.float32), torch.ones(3, 4, device="meta")]
        if factored
        else [torch.ones(3, 4, device="meta")]
    )
    named = "right factor of checkpoint 0" if factored else "checkpoint 0"
    sides = {"test": KernelSide(factored, host, [0] * len(host)), "train": KernelSide(factored, host, [0] * len(host))}
    sides[where] = KernelSide(factored, elsewhere, [0] * len(elsewhere))
    message = rf"^{where} {named} is on meta but scoring runs on cpu; pass device='meta' or move the rows$"
    for call in _calls(backend, sides["test"], sides["train"]).values():
        with pytest.raises(ValueError, match=message):
            call()
    if where == "train":
        with pytest.raises(ValueError, match=message):
            backend.self_influence(sides["train"], [1.0], num_threads=1)
