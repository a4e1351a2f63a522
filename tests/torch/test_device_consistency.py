"""The first-rows checks keep every tensor they compare on the model's device: on a GPU a CPU tensor meeting
a CUDA one raises 'Expected all tensors to be on the same device'. A CPU run cannot see that mismatch, so
these tests run each check under a guard that treats the CPU model as if it were on an accelerator: it
tracks the tensors that would be on the host whatever the model's device, and records where they meet the
model's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

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
    torch.scalar_tensor,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.eye,
    torch.linspace,
}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like}


def _names_host(device: object) -> bool:
    """Whether `device`, as the code wrote it, is the CPU whatever the model's device: a string ("cpu",
    "cpu:0"). A torch.device stands for the model's (a CPU run cannot tell model.device from a literal)."""
    return isinstance(device, str) and device.startswith("cpu")


class _HostGuard(TorchFunctionMode):
    """Tracks the tensors that would be on the host on any device: made by .cpu(), .to("cpu"),
    torch.from_numpy, a factory without device= (or device=None / "cpu"), a *_like with device="cpu", and
    whatever is computed from them alone; .to(a torch.device) moves one to the model's device. Records (in
    `host`) every op mixing such a tensor with the model's, and .numpy() / np.asarray of the model's
    tensors (a TypeError on CUDA)."""

    def __init__(self):
        super().__init__()
        self.host: list[str] = []
        self._on_host = WeakTensorKeyDictionary()

    def __enter__(self):
        self._from_numpy = torch.from_numpy  # not a torch function: TorchFunctionMode does not see it
        torch.from_numpy = lambda array: self._mark(self._from_numpy(array))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def _mark(self, out: object) -> object:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._on_host[t] = True
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = [t in self._on_host for t in tensors]
        if name in ("numpy", "__array__") and not any(on_host):
            self.host.append(name)
        elif any(on_host) and not all(on_host):
            self.host.append(f"{name} of host and device tensors")
        out = func(*args, **kwargs)
        if (name in ("cpu", "to") or func in _FACTORIES) and any(out is t for t in tensors):
            out = out.view_as(out)  # already on the CPU, the tensor itself: a copy on an accelerator
        if self._makes_host(func, name, args, kwargs, any(on_host)):
            self._mark(out)
        return out

    @staticmethod
    def _makes_host(func, name: str, args: tuple, kwargs: dict, from_host: bool) -> bool:
        if name == "cpu" or (func in _FACTORIES and (kwargs.get("device") is None or _names_host(kwargs["device"]))):
            return True
        if name == "to":
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            return _names_host(device) or (from_host and device is None)
        if func in _LIKE and "device" in kwargs and kwargs["device"] is not None:
            return _names_host(kwargs["device"])
        return from_host


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


class _Positions(nn.Module):
    """Token and position embeddings, the positions' on ids without a batch dimension (wpe(arange(T)),
    broadcast): the Kronecker check projects them from full per-example gradients (vmap)."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(11, 6), nn.Embedding(8, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))))


def test_kronecker_check_of_an_unbatched_embedding_leaves_nothing_on_the_host(monkeypatch):
    host = _guarded(monkeypatch, KroneckerRows, "check")
    torch.manual_seed(0)
    model = _Positions()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 11, (5, 4), generator=g), torch.randint(0, 3, (5, 4), generator=g)

    def loss(logits, y):
        return nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    projection = tracin.Projection(36, seed=1, per_layer=True, kronecker=True)
    with pytest.warns(UserWarning, match="without a batch dimension"):
        export_gradients(model, [(model.state_dict(), 1.0)], (ids, labels), loss, projection=projection, progress=False)
    assert host == []


_REWRITES = {
    "cpu()": lambda w: w.cpu(),
    "to('cpu')": lambda w: w.to("cpu"),
    "double().to(device='cpu')": lambda w: w.double().to(device="cpu"),
    "from_numpy(numpy())": lambda w: torch.from_numpy(w.detach().numpy()),
    "as_tensor(np.asarray)": lambda w: torch.as_tensor(np.asarray(w.detach()), device=w.device),
    "zeros(device=None)": lambda w: torch.zeros(w.shape, device=None),
    "zeros(no device)": lambda w: torch.zeros(w.shape),
    "zeros_like(device='cpu')": lambda w: torch.zeros_like(w, device="cpu"),
    "a host tensor's new_zeros": lambda w: torch.ones(1).new_zeros(w.shape),
}


@pytest.mark.parametrize("rewrite", list(_REWRITES), ids=list(_REWRITES))
def test_the_guard_records_a_host_tensor_meeting_the_models(rewrite):
    """Each way of putting a tensor on the host (review15 item 4: to('cpu'), np.asarray, from_numpy,
    device=None, zeros_like(device='cpu') were not seen), met with the model's weight, is recorded; moved
    back with .to(the model's device) it is not."""
    w = nn.Linear(3, 2).weight
    with _HostGuard() as guard:
        _ = _REWRITES[rewrite](w) * w
    assert guard.host
    with _HostGuard() as guard:
        _ = _REWRITES[rewrite](w).to(w.device) * w
        _ = torch.zeros_like(w) + torch.zeros(2, 3, device=w.device) * w.new_ones(1)
    assert [r for r in guard.host if r not in ("numpy", "__array__")] == []
