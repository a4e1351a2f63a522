"""Sinks: in-memory results and GradientStore output (written as it goes, resumable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_oracle import classification_data, mlp, train_checkpoints

import tracin
from tracin.torch import export_gradients

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture
def setup(tmp_path):
    model = mlp()
    data = classification_data(30, seed=6)
    return model, train_checkpoints(model, *data, tmp_path, steps=1), data


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_store_holds_what_memory_holds(setup, tmp_path, mode):
    model, checkpoints, data = setup
    memory = export_gradients(model, checkpoints, data, LOSS, mode=mode, batch_size=8, progress=False)
    store = export_gradients(model, checkpoints, data, LOSS, mode=mode, batch_size=8, progress=False,
                             store=tmp_path / "grads")
    assert isinstance(store, tracin.GradientStore)
    assert store.metadata["mode"] == mode and store.metadata["framework"] == "torch"
    np.testing.assert_array_equal(store.weights, memory.weights)
    np.testing.assert_allclose(tracin.self_influence(store), tracin.self_influence(memory), rtol=1e-6)
    np.testing.assert_allclose(tracin.scores(store, store), tracin.scores(memory, memory), rtol=1e-5, atol=1e-7)


class Killed(Exception):
    pass


def test_an_interrupted_export_resumes_skipping_finished_batches(setup, tmp_path, monkeypatch):
    model, checkpoints, data = setup
    path = tmp_path / "grads"
    from tracin.torch import per_example

    real = per_example.PerExampleGradients.__call__
    calls = []

    def dying(self, state, inputs, targets, out=None):
        calls.append(len(targets))
        if len(calls) == 6:  # 4 batches per checkpoint: dies in checkpoint 1, batch 1
            raise Killed
        return real(self, state, inputs, targets, out=out)

    monkeypatch.setattr(per_example.PerExampleGradients, "__call__", dying)
    with pytest.raises(Killed):
        export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=path)
    counted = []
    monkeypatch.setattr(per_example.PerExampleGradients, "__call__",
                        lambda self, *a, **k: counted.append(1) or real(self, *a, **k))
    resumed = export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=path)
    assert len(counted) == 3 + 4  # the rest of checkpoint 1, all of checkpoint 2
    fresh = export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False)
    np.testing.assert_allclose(tracin.scores(resumed, resumed), tracin.scores(fresh, fresh), rtol=1e-5, atol=1e-7)
    counted.clear()
    again = export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=path)
    assert not counted  # finished: nothing recomputed
    np.testing.assert_array_equal(tracin.self_influence(again), tracin.self_influence(resumed))


def test_store_needs_the_row_count_up_front(setup, tmp_path):
    model, checkpoints, (x, y) = setup
    with pytest.raises(ValueError, match="store= needs the number of examples"):
        export_gradients(model, checkpoints[:1], iter([(x, y)]), LOSS, progress=False, store=tmp_path / "g")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_store_keeps_the_requested_dtype(setup, tmp_path, dtype):
    model, checkpoints, data = setup
    store = export_gradients(model, checkpoints, data, LOSS, dtype=dtype, progress=False, store=tmp_path / "g")
    assert store.dtype == dtype
