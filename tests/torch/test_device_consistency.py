"""The first-rows checks keep every tensor they compare on the model's device: on a GPU a CPU tensor meeting
a CUDA one raises 'Expected all tensors to be on the same device'. A CPU run cannot see that mismatch, so
these tests run each check under a guard that records what would put a tensor on the CPU whatever the
model's device: .cpu(), .numpy(), and factory functions (torch.zeros, ...) called without device=."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import tracin
from tracin.torch import export_gradients
from tracin.torch.last_layer import LinearFactors
from tracin.torch.per_example import PerExampleGradients
from tracin.torch.token_projection import KroneckerRows

_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.eye,
    torch.linspace,
}


class _HostGuard(TorchFunctionMode):
    """Records (in `host`) the calls that would leave a tensor on the CPU on any device."""

    def __init__(self):
        super().__init__()
        self.host: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("cpu", "numpy") or (func in _FACTORIES and "device" not in kwargs):
            self.host.append(name)
        return func(*args, **kwargs)


def _guarded(monkeypatch, cls, method: str) -> list[str]:
    """Runs cls.method under a _HostGuard for the rest of the test; the list of what it recorded."""
    host: list[str] = []
    inner = getattr(cls, method)

    def run(self, *args, **kwargs):
        with _HostGuard() as guard:
            try:
                return inner(self, *args, **kwargs)
            finally:
                host.extend(guard.host)

    monkeypatch.setattr(cls, method, run)
    return host


class _Net(nn.Module):
    """Two Linear layers, the second's output also through a third Linear that the loss does not reach (its
    directional derivative is None: zeros)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.unused(h)
        return self.b(h)


LOSS = nn.CrossEntropyLoss(reduction="none")


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("mode", ["factored", "last_layer"])
def test_factored_check_leaves_nothing_on_the_host(monkeypatch, mode):
    host = _guarded(monkeypatch, LinearFactors, "_check")
    torch.manual_seed(0)
    model = _Net()
    layers = ["a", "b", "unused"] if mode == "factored" else ["b"]
    export_gradients(model, [(model.state_dict(), 1.0)], _data(), LOSS, mode=mode, layers=layers, progress=False)
    assert host == []


def test_kronecker_check_leaves_nothing_on_the_host(monkeypatch):
    host = _guarded(monkeypatch, KroneckerRows, "check")
    torch.manual_seed(0)
    model = _Net()
    projection = tracin.Projection(36, seed=1, per_layer=True, kronecker=True)
    export_gradients(model, [(model.state_dict(), 1.0)], _data(), LOSS, projection=projection, progress=False)
    assert host == []


def test_hook_check_leaves_nothing_on_the_host(monkeypatch):
    host = _guarded(monkeypatch, PerExampleGradients, "_by_hooks")
    torch.manual_seed(0)
    model = _Net()
    export_gradients(model, [(model.state_dict(), 1.0)], _data(), LOSS, layers=["a", "b"], progress=False)
    assert host == []
