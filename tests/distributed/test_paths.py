"""Stores opened by a relative path: the workers, running in another directory, still find them."""

from __future__ import annotations

import os

import numpy as np

import tracin
import tracin.distributed as td
from tracin.distributed._shards import StoreRows

from .conftest import write_store


def test_a_store_opened_by_a_relative_path_is_found_by_workers_elsewhere(client, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    train = [rng.standard_normal((50, d)).astype(np.float32) for d in (4, 2)]
    write_store(tmp_path / "store", train, [0.5, 2.0])
    monkeypatch.chdir(tmp_path)
    store = tracin.GradientStore.open("store")
    rows = StoreRows.of(store[10:20])
    assert os.path.isabs(rows.path) and os.path.samefile(rows.path, tmp_path / "store")
    exact = sum(w * (m.astype(np.float64) ** 2).sum(1) for w, m in zip([0.5, 2.0], train, strict=True))
    before = client.run(os.getcwd)
    client.run(os.chdir, "/")  # workers started in other directories than the client
    try:
        for side in ("store", store):
            np.testing.assert_allclose(td.self_influence(side, client=client, progress=False), exact, rtol=1e-5)
    finally:
        for worker, cwd in before.items():
            client.run(os.chdir, cwd, workers=[worker])
