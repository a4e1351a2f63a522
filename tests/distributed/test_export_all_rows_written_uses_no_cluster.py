"""A rerun of a distributed export whose every row was written by range tasks (interrupted before its
client finalized) needs no cluster: the client finalizes the store itself, byte for byte the
single-process export, without starting a LocalCluster or waiting for workers (r385 hand mutant E15:
the ranges' step ran with no missing rows, starting a cluster and waiting for a worker for nothing)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tracin.distributed as td  # noqa: E402
import tracin.torch  # noqa: E402
from tracin._export.driver import store_rows  # noqa: E402
from tracin.distributed import _export  # noqa: E402

from .test_export import _same_store, _setup, one_torch_thread  # noqa: E402, F401 (an autouse fixture)


def test_every_row_written_is_finalized_without_a_cluster(tmp_path, monkeypatch):
    model, checkpoints, data, loss = _setup(30, 4)
    kw = {"batch_size": 10, "progress": False}
    expected = tracin.torch.export_gradients(model, checkpoints, data, loss, store=tmp_path / "one", **kw)
    store = tmp_path / "many"
    for a, b in [(0, 0), (0, 12), (12, 30)]:  # (0, 0) creates it; then two range writers' rows, not finalized
        with store_rows(a, b):
            tracin.torch.export_gradients(model, checkpoints, data, loss, store=store, **kw)
    assert not tracin.GradientStore.open(store, allow_partial=True).complete

    def no_cluster(client):
        raise AssertionError("a cluster was used with every row written")

    monkeypatch.setattr(_export, "client_for", no_cluster)
    found = td.export_gradients("torch", model, checkpoints, data, loss, store=store, **kw)
    assert found.complete
    _same_store(found, expected)
