"""Sinks: in-memory results and GradientStore output (written as it goes, resumable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_oracle import classification_data, mlp, train_checkpoints

import tracin
from tracin.store._format import data_files
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
    assert store.metadata == memory.metadata
    for c in range(len(checkpoints)):  # the stored rows are the in-memory rows, bit for bit
        stored = [np.load(tmp_path / "grads" / name) for name in data_files(c, mode == "last_layer")]
        kept = [memory.left[c], memory.right[c]] if mode == "last_layer" else [memory.matrices[c]]
        for a, b in zip(stored, kept):
            assert a.dtype == np.float32 and a.tobytes() == np.asarray(b).tobytes()


def _store_bytes(path):
    """{file name: bytes} of a store directory: the .npy files and the manifest."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix in (".npy", ".json")}


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
    fresh = export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=tmp_path / "fresh")
    assert _store_bytes(path) == _store_bytes(tmp_path / "fresh")  # identical files, manifest included
    assert len(_store_bytes(path)) == 1 + len(checkpoints)
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


def test_a_keyboard_interrupt_releases_the_store_for_a_resume(setup, tmp_path, monkeypatch):
    model, checkpoints, data = setup
    from tracin.torch import per_example

    real = per_example.PerExampleGradients.__call__
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(per_example.PerExampleGradients, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:  # the traceback keeps the export's frames alive
        export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=tmp_path / "g")
    monkeypatch.setattr(per_example.PerExampleGradients, "__call__", real)
    resumed = export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=tmp_path / "g")
    fresh = export_gradients(model, checkpoints, data, LOSS, batch_size=8, progress=False, store=tmp_path / "f")
    assert caught.value is not None and _store_bytes(tmp_path / "g") == _store_bytes(tmp_path / "f")


def test_resuming_with_other_data_or_checkpoints_is_refused(setup, tmp_path):
    model, checkpoints, (x, y) = setup
    path = tmp_path / "g"
    export_gradients(model, checkpoints, (x, y), LOSS, progress=False, store=path)
    other_x = x.clone()
    other_x[-1] += 1  # same size, one input changed
    with pytest.raises(ValueError, match="different spec.*metadata"):
        export_gradients(model, checkpoints, (other_x, y), LOSS, progress=False, store=path)
    swapped = [(checkpoints[1][0], checkpoints[0][1])] + checkpoints[1:]  # same learning rates, other weights
    with pytest.raises(ValueError, match="different spec.*metadata"):
        export_gradients(model, swapped, (x, y), LOSS, progress=False, store=path)
    again = export_gradients(model, checkpoints, (x, y), LOSS, progress=False, store=path)
    assert again.complete


def test_a_loader_that_shuffles_its_iterable_dataset_is_caught(setup):
    model, checkpoints, (x, y) = setup

    class Shuffled(torch.utils.data.IterableDataset):
        def __iter__(self):
            order = torch.randperm(len(y))
            return iter(zip(x[order], y[order]))

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Shuffled(), batch_size=10)
    with pytest.raises(ValueError, match="holds other targets than on the first pass"):
        export_gradients(model, checkpoints, loader, LOSS, progress=False)
