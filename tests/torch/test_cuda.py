"""CUDA models: gradients computed on the device equal those computed on the CPU, in every mode.

These run only where torch sees a CUDA device (`.ci/gpu-check` runs them on such a machine).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch_oracle import classification_data, cnn_with_checkpoints, mlp, train_checkpoints

import tracin
from tracin.torch import export_gradients

LOSS = nn.CrossEntropyLoss(reduction="none")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def trained(tmp_path):
    model = mlp()
    train = classification_data(40, seed=1)
    return model, train_checkpoints(model, *train, tmp_path), train


def export_on_cuda(model: nn.Module, *args, **kwargs):
    """export_gradients of a CUDA copy of `model`; asserts the export left that user's model as it
    was: the same Parameter objects, still on the GPU, with the same values."""
    user_model = copy.deepcopy(model).cuda()
    before = [(name, p, p.detach().clone()) for name, p in user_model.named_parameters()]
    result = export_gradients(user_model, *args, **kwargs)
    after = dict(user_model.named_parameters())
    assert [name for name, *_ in before] == list(after)
    for name, p, values in before:
        assert after[name] is p and p.device.type == "cuda" and torch.equal(p.detach(), values), name
    return result


def assert_same_influence(gpu, cpu, rtol: float = 1e-4) -> None:
    """Equal scores among the rows and self-influence, within rtol of the largest (any gradient
    set: Gradients, FactoredGradients or a store, in any stored dtype)."""
    for ours, theirs in (
        (tracin.scores(gpu, gpu), tracin.scores(cpu, cpu)),
        (tracin.self_influence(gpu), tracin.self_influence(cpu)),
    ):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * float(np.abs(theirs).max()))


@pytest.mark.parametrize("mode", ["full", "last_layer", "factored"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_model_matches_cpu_in_every_mode(trained, mode, dtype):
    model, checkpoints, train = trained
    cpu = export_gradients(model, checkpoints, train, LOSS, mode=mode, dtype=dtype, batch_size=16, progress=False)
    gpu = export_on_cuda(model, checkpoints, train, LOSS, mode=mode, dtype=dtype, batch_size=16, progress=False)
    assert_same_influence(gpu, cpu, rtol=1e-4 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("mode, dtype", [("full", "float32"), ("full", "float16"), ("factored", "bfloat16")])
def test_cuda_export_copies_to_the_host_in_pieces_through_pinned_memory(trained, monkeypatch, mode, dtype):
    """Batches larger than the pinned staging buffer go in several pieces (full float32 rows straight
    into the result's array, other blocks into host tensors of their own)."""
    from tracin.torch import host_copy

    monkeypatch.setattr(host_copy, "PIECE_BYTES", 3 * 1024)  # a few rows per piece, a ragged last one
    model, checkpoints, train = trained
    kwargs = {"mode": mode, "dtype": dtype, "batch_size": 16, "progress": False}
    cpu = export_gradients(model, checkpoints, train, LOSS, **kwargs)
    gpu = export_on_cuda(model, checkpoints, train, LOSS, **kwargs)
    assert_same_influence(gpu, cpu, rtol=1e-4 if dtype == "float32" else 2e-2)


def test_cuda_inputs_projection_and_store(trained, tmp_path):
    model, checkpoints, (x, y) = trained
    projection = tracin.Projection(16, seed=1)
    cpu = export_gradients(model, checkpoints, (x, y), LOSS, projection=projection, progress=False)
    gpu = export_on_cuda(
        model, checkpoints, (x.cuda(), y.cuda()), LOSS, projection=projection, store=tmp_path / "store", progress=False
    )
    assert isinstance(gpu, tracin.GradientStore) and gpu.complete
    assert_same_influence(gpu, cpu)


def test_cuda_inputs_to_a_cpu_model_give_the_cpu_rows(trained):
    """Batches on the GPU for a model on the CPU are copied to the host before the forward reads them
    (review31 F8: an asynchronous device-to-host copy could be read before it landed)."""
    model, checkpoints, (x, y) = trained
    cpu = export_gradients(model, checkpoints, (x, y), LOSS, batch_size=8, progress=False)
    moved = export_gradients(model, checkpoints, (x.cuda(), y.cuda()), LOSS, batch_size=8, progress=False)
    for ours, theirs in zip(moved.matrices, cpu.matrices, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_cuda_cnn_through_vmap_matches_cpu(tmp_path, monkeypatch):
    # cuDNN convolutions use TF32 by default (errors about 2e-4 of the largest score here); the export
    # runs the model under the user's settings, so this user turns it off
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, checkpoints, (x, y) = cnn_with_checkpoints(tmp_path, 24)
    cpu = export_gradients(model, checkpoints, (x, y), LOSS, batch_size=8, progress=False)
    gpu = export_on_cuda(model, checkpoints, (x, y), LOSS, batch_size=8, progress=False)
    assert_same_influence(gpu, cpu)
