"""tracin.backends: the registry the scoring functions get their backend from."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin import backends
from tracin.backends import placement
from tracin.backends.cpu import CpuBackend

from .numpy_reference import NumpyReference


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, restored after the test."""
    monkeypatch.setattr(backends, "_factories", dict(backends._factories))
    monkeypatch.setattr(backends, "_loaded", {})
    return backends


def test_cpu_is_registered_and_created_once():
    assert "cpu" in backends.names()
    cpu = backends.get("cpu")
    assert isinstance(cpu, CpuBackend) and cpu.name == "cpu" and backends.get("cpu") is cpu


def test_a_registered_factory_runs_on_first_use_only(registry):
    made = []
    registry.register("reference", lambda: made.append(1) or NumpyReference())
    assert made == [] and registry.names()[-1] == "reference"
    assert isinstance(registry.get("reference"), NumpyReference)
    registry.get("reference")
    assert made == [1]


@pytest.mark.parametrize(
    "name, error, match",
    [
        ("tpu", ValueError, r"unknown scoring backend 'tpu'; registered: 'cpu', 'cuda' \(or 'cuda:N'\), 'torch:cpu'"),
        ("cpu:1", ValueError, r"unknown scoring backend 'cpu:1'"),
        ("cuda:x", ValueError, r"unknown scoring backend 'cuda:x'"),
        (["cpu"], TypeError, r"backend name must be a string \('cpu', .*\), got \['cpu'\]"),
        (None, TypeError, "backend name must be a string"),
    ],
)
def test_get_errors(name, error, match):
    with pytest.raises(error, match=match):
        backends.get(name)


def test_register_errors(registry):
    with pytest.raises(ValueError, match="a scoring backend named 'cpu' is already registered"):
        registry.register("cpu", NumpyReference)
    with pytest.raises(TypeError, match="backend name must be a non-empty string"):
        registry.register("", NumpyReference)
    with pytest.raises(TypeError, match="factory for backend 'x' must be callable"):
        registry.register("x", NumpyReference())
    assert registry.names() == ("cpu", "cuda", "torch:cpu")


def test_an_indexed_factory_gets_the_device_number(registry):
    made = []
    registry.register("gpu", lambda index: made.append(index) or NumpyReference(), indexed=True)
    first, second = registry.get("gpu:3"), registry.get("gpu")
    assert made == [3, None] and first is not second and registry.get("gpu:3") is first
    assert registry.names()[-1] == "gpu"


def test_scoring_reaches_the_kernel_through_the_registry(registry, rng):
    """Whatever is registered as "cpu" scores every public function: no other path to the kernel."""
    calls = []

    class Recording:
        name = "cpu"

        def __getattr__(self, method):
            calls.append(method)
            return getattr(NumpyReference(), method)

    registry._factories["cpu"] = Recording
    test = np.round(rng.standard_normal((3, 5))).astype(np.float32)
    train = np.round(rng.standard_normal((9, 5))).astype(np.float32)
    exact = test.astype(np.float64) @ train.T.astype(np.float64)  # integers: exact in float32
    np.testing.assert_array_equal(tracin.scores(test, train), exact)
    assert tracin.top_k(test, train, k=2).indices.shape == (3, 2)
    np.testing.assert_array_equal(tracin.self_influence(train), (train.astype(np.float64) ** 2).sum(1))
    np.testing.assert_array_equal(tracin.aggregate(test, train), exact.sum(0))
    assert calls == ["scores", "top_k", "self_influence", "aggregate"]


def test_torch_devices_after_an_interrupted_torch_import_are_refused_not_reimported(monkeypatch):
    """review202 F1: Ctrl-C during the first torch-device call left torch half imported (its submodules
    in sys.modules, torch itself not); importing it again aborted the process in torch's C++ code."""
    pytest.importorskip("torch")
    import sys

    monkeypatch.delitem(sys.modules, "torch")  # the state a KeyboardInterrupt during `import torch` leaves
    assert any(name.startswith("torch.") for name in sys.modules)
    with pytest.raises(ValueError, match=r"device='torch:cpu' .* import of torch in this process was interrupted"):
        backends.torch_module("torch:cpu")


@pytest.mark.parametrize(("installed", "why"), [(False, "is not installed"), (True, "failed to import")])
def test_a_missing_or_broken_torch_names_the_device_asked_for(monkeypatch, installed, why):
    """review202 F2: device='torch:cpu' without torch named device='cpu' and offered it as the way out."""
    import importlib.util
    import sys

    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setitem(sys.modules, "tracin.backends.torch_device", None)  # its import raises ImportError
    monkeypatch.delattr(backends, "torch_device", raising=False)  # else `from . import` takes the attribute
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if installed else None)
    with pytest.raises(ValueError, match=f"^device='torch:cpu' scores with torch, which {why} "):
        backends.get("torch:cpu")


def _fake_torch_backends(registry, monkeypatch) -> list:
    """Makes the registry's torch backends NumpyReferences; the list of the devices they were made for."""
    made = []

    class FakeTorchDevice:
        @staticmethod
        def make(device):
            made.append(device)
            return NumpyReference()

    monkeypatch.setattr(registry, "torch_module", lambda device: FakeTorchDevice)
    return made


def test_the_built_in_torch_backends_are_made_for_the_device_asked_for(registry, monkeypatch):
    """'cuda:N' makes the torch backend on device N ('cuda': the current one), 'torch:cpu' on the CPU; a
    lost index would score every GPU's share of a multi-GPU run on the current device."""
    made = _fake_torch_backends(registry, monkeypatch)
    registry.get("cuda:1")
    registry.get("cuda")
    registry.get("torch:cpu")
    assert made == ["cuda:1", "cuda", "cpu"]


def test_a_device_index_of_several_digits_is_placed_on_that_gpu(registry, monkeypatch):
    """device='cuda:12' (a machine of 16 GPUs) is a device like 'cuda:1': placement hands it to the torch
    backend of GPU 12, not refusing it as an unknown device name."""
    made = _fake_torch_backends(registry, monkeypatch)
    host = tracin.Gradients(np.ones((3, 2), np.float32))
    assert isinstance(placement.choose("cuda:12", "float32", {"train": host}), NumpyReference)
    assert made == ["cuda:12"]
