"""Train rows that are all 16-bit tensors on the backend's device already (float16 / bfloat16 CUDA
tensors on "cuda"; CPU tensors on "torch:cpu", passed here through the backend protocol as the
generic loop passes them): _torch_rows.TrainStream.tiles slices them in place, with no staging, and
widens each tile to float32 exactly on the device, so scores, top_k, self_influence and aggregate
equal float64 NumPy on the widened values within the contract's bound. Killer test of hand mutant R6
(r379: tiles of resident rows handed out unwidened; the GEMMs then mixed float32 and 16-bit tensors)."""

from __future__ import annotations

import numpy as np
import pytest

from reference import exact_scores, score_bound
from tracin import _tunables, backends
from tracin.gradients import KernelSide

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("dtype", "code"), [("float16", 1), ("bfloat16", 2)])
def test_resident_16bit_train_rows_widen_exactly_in_each_tile(rng, monkeypatch, dtype, code):
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 7 * 2 * (5 + 3))  # tiles of 7 rows: 3 per call
    backend = backends.get("torch:cpu")
    weights = [0.5, -1.25]
    test = [rng.standard_normal((4, d)).astype(np.float32) for d in (5, 3)]
    train = [
        torch.from_numpy(rng.standard_normal((20, d)).astype(np.float32)).to(getattr(torch, dtype)) for d in (5, 3)
    ]
    widened = [b.double().numpy() for b in train]  # the values the backend must score, exactly
    t, x = KernelSide(False, test, [0, 0]), KernelSide(False, train, [code, code])
    exact, bound = exact_scores(test, widened, weights), score_bound(test, widened, weights)
    assert np.all(np.abs(backend.scores(t, x, weights, num_threads=1) - exact) <= bound)
    prop, opp = backend.top_k(t, x, weights, 3, "both", num_threads=1)
    np.testing.assert_array_equal(prop.indices, np.argsort(-exact, axis=1, kind="stable")[:, :3])
    np.testing.assert_array_equal(opp.indices, np.argsort(exact, axis=1, kind="stable")[:, :3])
    own = sum(w * (b**2).sum(1) for w, b in zip(weights, widened, strict=True))
    np.testing.assert_allclose(backend.self_influence(x, weights, num_threads=1), own, rtol=1e-6)
    total = backend.aggregate(t, x, weights, num_threads=1)
    assert np.all(np.abs(total - exact.sum(0)) <= bound.sum(0))
