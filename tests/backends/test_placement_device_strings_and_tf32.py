"""tracin.backends.placement: a device= string is accepted only as a whole ('cpu', 'cuda', 'cuda:N',
'torch:cpu'), and precision='tf32' on a CUDA device hands back the backend's TF32 variant (killer tests
of hand mutants P3: fullmatch -> match, P9: with_tf32() dropped, P15; m401)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tracin
from tracin import backends
from tracin.backends import placement
from tracin.gradients import GradientSet, KernelSide

ACCEPTED = r"device must be 'cpu' \(the C\+\+ kernel\), 'cuda' or 'cuda:N' \(a GPU, through torch\) or 'torch:cpu'"
WHOLE = ACCEPTED + r" \(the torch backend on the CPU, for tests\), or None \(where the rows are\), got "


@pytest.mark.parametrize(
    "device",
    ["cpux", "cpu ", "cuda:0x", "cuda:", "torch:cpu:0", "cuda:1:2", "CPU", "cuda:01", "cuda:\u0661", "cuda:-1"],
)
def test_a_device_string_with_more_after_a_valid_name_is_refused_as_a_device(device):
    """'cpux' or 'cuda:0x' begins like a device name: refused by device='s own message (listing what is
    accepted and naming the string), not passed on to the backend registry as a name it does not know.
    'cuda:01' and 'cuda:' + an Arabic-Indic one (a Unicode digit) are refused as torch refuses them: before,
    they scored on GPU 1, yet rows on cuda:1 were refused as not on 'cuda:01' (m401)."""
    host = tracin.Gradients(np.ones((3, 2), np.float32))
    with pytest.raises(
        ValueError,
        match=f"^{WHOLE}{re.escape(repr(device))}$",
    ):
        placement.choose(device, "float32", {"train": host})
    with pytest.raises(ValueError, match=f"^{ACCEPTED}"):
        tracin.scores(host, host, device=device)


class _Plain:
    """A stand-in torch backend; with_tf32() gives its TF32 variant."""

    name = "fake-cuda"

    def with_tf32(self):
        return _Tf32()


class _Tf32:
    name = "fake-cuda-tf32"


@pytest.fixture
def fake_cuda(monkeypatch):
    """The registry's torch backends made as _Plain (no torch, no GPU touched); the devices asked for."""
    monkeypatch.setattr(backends, "_loaded", {})
    made = []

    class FakeTorchDevice:
        @staticmethod
        def make(device):
            made.append(device)
            return _Plain()

    monkeypatch.setattr(backends, "torch_module", lambda device: FakeTorchDevice)
    return made


def test_tf32_on_a_cuda_device_scores_with_the_backends_tf32_variant(fake_cuda):
    host = tracin.Gradients(np.ones((3, 2), np.float32))
    assert isinstance(placement.choose("cuda:1", "tf32", {"train": host}), _Tf32)
    assert isinstance(placement.choose("cuda:1", "float32", {"train": host}), _Plain)
    assert fake_cuda == ["cuda:1"]  # one backend per device, its TF32 variant derived from it


class _OnDevice(GradientSet):
    """A set whose rows say they live on `device` (placement reads only each block's .device)."""

    factored, weights, weights_given, metadata = False, np.ones(1), False, {}

    def __init__(self, device: str):
        self.device = device

    n_rows = property(lambda self: 4)
    dims = property(lambda self: (3,))

    def kernel_side(self, start: int = 0, stop: int | None = None) -> KernelSide:
        return KernelSide(False, [type("Block", (), {"device": self.device})()], [0])


def test_test_and_train_on_the_same_gpu_score_there_without_device(fake_cuda):
    """device=None with both sets on cuda:2: the backend of GPU 2 (one device, however many sets are on
    it; only sets on different GPUs are refused). Killer test of hand mutant P15 (sets counted, not their
    devices; m401)."""
    chosen = placement.choose(None, "float32", {"test": _OnDevice("cuda:2"), "train": _OnDevice("cuda:2")})
    assert isinstance(chosen, _Plain) and fake_cuda == ["cuda:2"]
    with pytest.raises(ValueError, match=r"^the sets are on different devices \(test on cuda:2, train on cuda:0\)"):
        placement.choose(None, "float32", {"test": _OnDevice("cuda:2"), "train": _OnDevice("cuda:0")})
