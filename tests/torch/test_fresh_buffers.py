"""FreshBuffers: every forward starts from the buffers as loaded, which are never written, with a user's
forward pre-hooks, torch.func transforms and writes the version counter does not see; one copy of a
buffer at most. Rows against float64 per-example autograd from the checkpoint's state."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from _models import RunningMean
from torch import nn
from torch.func import functional_call, grad, vmap

from tracin.torch import export_gradients
from tracin.torch.checkpoints import FreshBuffers

LOSS = nn.CrossEntropyLoss(reduction="none")


def _reference(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, prepare=None) -> np.ndarray:
    """Per-example gradients in float64, each example's forward from `state` (`prepare` then run on the twin)."""
    twin = copy.deepcopy(model).double()
    twin._forward_pre_hooks.clear()
    rows = []
    for i in range(len(y)):
        twin.load_state_dict(state)
        if prepare is not None:
            prepare(twin)
        loss = nn.functional.cross_entropy(twin(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(twin.parameters()))]).numpy())
    return np.stack(rows)


def _unchanged(given: dict, kept: dict) -> None:
    for k in kept:
        torch.testing.assert_close(given[k], kept[k], rtol=0, atol=0)


def _exported_without_fallback(model: nn.Module, given: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The export's rows at checkpoint `given`, asserting no path was given up ('cannot run' warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    assert not [w for w in caught if "cannot run" in str(w.message)], [str(w.message) for w in caught]
    return got


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("temp", torch.ones(()))

    def forward(self, x):
        return self.lin(x) / self.temp


def test_a_user_pre_hook_setting_a_buffer_is_not_undone():
    """The restore ran after the user's hook and undid it from the second forward on (relative error 1.15)."""
    torch.manual_seed(0)
    model = _Temperature()
    given = copy.deepcopy(model.state_dict())

    def set_temperature(module, args):  # a temperature, a schedule's value, set before each call
        module.temp.fill_(2.0)

    model.register_forward_pre_hook(set_temperature)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    want = _reference(model, given, x, y, prepare=lambda twin: twin.temp.fill_(2.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(given["temp"]) == 1.0 and float(model.temp) == 1.0


class _WritesOutsideVmap(nn.Module):
    """Writes a buffer after using it, outside torch.func transforms only (a write under vmap(grad)
    fails anyway); `scale` is not a layer's, so its gradients come from torch.func.vmap."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.register_buffer("offset", torch.randn(3))

    def forward(self, x):
        out = self.lin(x) * self.scale + self.offset
        if not torch._C._are_functorch_transforms_active():
            self.offset.mul_(3)
        return out


def test_a_vmap_forward_after_a_forward_that_wrote_a_buffer_runs_under_vmap():
    """The restore ran inside vmap(grad), which refused it: the export fell back to the per-example
    loop with a warning blaming the model."""
    torch.manual_seed(0)
    model = _WritesOutsideVmap()
    given = copy.deepcopy(model.state_dict())
    kept = copy.deepcopy(given)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    got = _exported_without_fallback(model, given, x, y)
    np.testing.assert_allclose(got, _reference(model, kept, x, y), rtol=1e-5, atol=1e-6)
    _unchanged(given, kept)


def test_vmap_of_grad_of_a_functional_call_after_a_written_buffer():
    torch.manual_seed(0)
    model = _WritesOutsideVmap()
    state = copy.deepcopy(model.state_dict())
    kept = copy.deepcopy(state)
    x = torch.randn(3, 4)
    params = {k: v for k, v in state.items() if k != "offset"}

    def loss(p, one):
        return functional_call(model, {**state, **p}, (one[None],)).sum()

    with FreshBuffers(model) as buffers:
        buffers.keep(state)
        functional_call(model, state, (x,))  # writes the working copy of offset
        got = vmap(grad(loss), in_dims=(None, 0))(params, x)
    want = vmap(grad(loss), in_dims=(None, 0))(params, x)  # no write under vmap: offset as loaded
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    _unchanged(state, kept)


def test_fresh_buffers_never_writes_the_buffers_as_loaded():
    torch.manual_seed(0)
    model = RunningMean()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    given = {
        "lin.weight": torch.randn(3, 4),
        "lin.bias": torch.randn(3),
        "calls": torch.ones(()),
        "mean": torch.randn(4),
    }
    kept = copy.deepcopy(given)
    x = torch.randn(5, 4)
    twin = RunningMean()
    twin.load_state_dict(kept)
    want = twin(x)  # the first forward from the checkpoint's buffers
    buffers_before = list(model.buffers())
    versions = [t._version for t in (*given.values(), *buffers_before)]
    with FreshBuffers(model) as buffers:
        first = model(x)
        for _ in range(2):
            torch.testing.assert_close(model(x), first, rtol=0, atol=0)
        buffers.keep(given)
        for _ in range(3):
            torch.testing.assert_close(functional_call(model, given, (x,)), want, rtol=0, atol=0)
    assert all(a is b for a, b in zip(model.buffers(), buffers_before, strict=True))
    _unchanged(given, kept)
    _unchanged(model.state_dict(), own)
    assert [t._version for t in (*given.values(), *buffers_before)] == versions  # never written, nor set back
    assert model._forward_pre_hooks == {} and model._forward_hooks == {}


@pytest.mark.parametrize("source", ["memory", "file"])
def test_writes_through_data_are_found_after_the_first_forward(tmp_path, source):
    """`.data` writes bump no version counter: they changed the caller's checkpoint and two identical
    exports differed."""
    torch.manual_seed(0)
    model = RunningMean(through_data=True)
    given = {k: v.clone() for k, v in model.state_dict().items()}
    kept = copy.deepcopy(given)
    torch.save(given, tmp_path / "c.pt")
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    checkpoint = given if source == "memory" else str(tmp_path / "c.pt")
    want = _reference(model, kept, x, y)
    for _ in range(2):
        g = export_gradients(model, [(checkpoint, 1.0), (checkpoint, 1.0)], (x, y), LOSS, progress=False)
        for matrix in g.matrices:
            np.testing.assert_allclose(matrix, want, rtol=1e-5, atol=1e-6)
    _unchanged(given, kept)


class _LateWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("seen", torch.zeros(4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            self.seen.data.add_(1)
        return self.lin(x + self.seen)


def test_a_hidden_write_after_the_first_forward_is_reported_at_exit():
    model = _LateWrite()
    with pytest.warns(RuntimeWarning, match=r"buffer seen without its version counter"):
        with FreshBuffers(model):
            for _ in range(3):
                model(torch.randn(2, 4))
    assert torch.equal(model.seen, torch.zeros(4))


class _Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.register_buffer("table", torch.randn(1000, 1))  # read-only

    def forward(self, x):
        return self.lin(x + self.table[:8, 0])


def test_one_copy_of_a_buffer_per_checkpoint_none_of_the_models_own(monkeypatch):
    """Every buffer was copied at entry (the model's own) and at each keep, the previous checkpoint's
    alive: three copies at once; 1000 x 1 table: 3 clones for two checkpoints."""
    model = _Table()
    states = [copy.deepcopy(model.state_dict()) for _ in range(2)]
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or clone(t, *a, **k))
    with FreshBuffers(model) as buffers:
        for state in states:
            buffers.keep(state)
            for _ in range(3):
                functional_call(model, state, (torch.randn(2, 8),))
    assert clones.count(torch.Size([1000, 1])) == 2


def test_a_first_forward_under_inference_mode_makes_copies_the_next_forwards_can_use():
    torch.manual_seed(0)
    model = RunningMean()
    x = torch.randn(5, 4)
    want = copy.deepcopy(model)(x)
    with FreshBuffers(model):
        with torch.inference_mode():
            model(x)
        got = model(x)
        got.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Observed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.obs = torch.ao.quantization.observer.PerChannelMinMaxObserver(ch_axis=1)

    def forward(self, x):
        self.obs(x.detach())  # an observer left on, never run before the checkpoint: resizes its buffers
        return self.lin(x)


def test_a_buffer_resized_by_the_forward_is_resized_on_its_copy():
    """An uncalibrated per-channel observer failed ('storage not resizable'), with or without FreshBuffers."""
    torch.manual_seed(0)
    model = _Observed()
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    np.testing.assert_allclose(got, _reference(model, given, x, y), rtol=1e-5, atol=1e-6)
    assert given["obs.min_val"].shape == model.obs.min_val.shape == (0,)


class _Alias(nn.Module):
    """Writes its buffer through a plain attribute that aliases it (set at construction)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(3))
        self.alias = self.count

    def forward(self, x):
        out = self.lin(x) + self.count
        self.alias.add_(1)
        return out


def test_a_buffer_written_through_an_alias_is_set_back_or_reported():
    torch.manual_seed(0)
    model = _Alias()
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with FreshBuffers(model):
        for _ in range(2):
            torch.testing.assert_close(model(x), model.lin(x), rtol=0, atol=0)
    assert torch.equal(model.count, torch.zeros(3))  # set back from its copy
    # under functional_call the module's attribute is the checkpoint's buffer: the model's own has no copy
    with pytest.warns(RuntimeWarning, match="buffer count of the model was written"):
        got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    np.testing.assert_allclose(got, _reference(model, given, x, y), rtol=1e-5, atol=1e-6)
    assert torch.equal(given["count"], torch.zeros(3))


class _AliasAndAttribute(_Alias):
    def forward(self, x):
        out = self.lin(x) + self.count
        self.alias.add_(1)
        self.count.mul_(2)  # the working copy too
        return out


def test_a_buffer_written_through_an_alias_and_its_attribute_is_reported():
    model = _AliasAndAttribute()
    with pytest.warns(RuntimeWarning, match="buffer count was written through another reference"):
        with FreshBuffers(model):
            for _ in range(2):
                model(torch.randn(2, 4))


def _reference_built(make, state: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example gradients in float64 of a model built in float64 (.double() would split a buffer
    two modules share, or views of one storage), loaded from `state` before each example."""
    torch.set_default_dtype(torch.float64)
    try:
        twin = make()
    finally:
        torch.set_default_dtype(torch.float32)
    rows = []
    for i in range(len(y)):
        twin.load_state_dict(state)
        loss = nn.functional.cross_entropy(twin(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(twin.parameters()))]).numpy())
    return np.stack(rows)


class _Recursive(nn.Module):
    """Calls itself once (a recursion of the root), writing a call counter at each depth."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x, depth=1):
        inner = self(x, depth - 1) if depth > 0 else 0.0
        self.count += 1
        return self.lin(x) * (self.count * 1.0) + inner  # a product of the count: it is written again after


@pytest.mark.parametrize("batch_size", [None, 1])
def test_a_recursive_forward_shares_the_outer_forwards_copies(batch_size):
    """The inner call got a copy of the outer's copy: its write was lost (relative error 0.41), and a
    copy was left for each forward (201 after 200)."""
    torch.manual_seed(0)
    model = _Recursive()
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False, batch_size=batch_size).matrices[0]
    np.testing.assert_allclose(got, _reference_built(_Recursive, given, x, y), rtol=1e-5, atol=1e-6)
    with FreshBuffers(model) as buffers, torch.no_grad():
        for _ in range(20):
            torch.testing.assert_close(model(x), 3 * model.lin(x), rtol=1e-6, atol=1e-6)  # count 1 inner, 2 outer
        assert len(buffers._copies) == 1
    assert model.count.item() == 0


class _Holder(nn.Module):
    def __init__(self, shared: torch.Tensor):
        super().__init__()
        self.register_buffer("shared", shared)


class _SharedBuffer(nn.Module):
    """One buffer in two modules, written through one and read through the other."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.alpha = nn.Parameter(torch.full((3,), 0.7))
        shared = torch.ones(3)
        self.register_buffer("shared", shared)
        self.holder = _Holder(shared)

    def forward(self, x):
        self.holder.shared.mul_(2)
        return self.lin(x) * self.shared * self.alpha


def test_a_buffer_two_modules_share_stays_one_tensor_inside_transforms():
    """Inside torch.func transforms each slot got its own clone: the write through one was not seen
    through the other (relative error 0.53 through vmap, a gradient of x instead of 2x under grad)."""
    torch.manual_seed(0)
    model = _SharedBuffer()
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    np.testing.assert_allclose(got, _reference_built(_SharedBuffer, given, x, y), rtol=1e-5, atol=1e-6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with FreshBuffers(model):
        model(x[0])  # writes the working copy: the transform's forward then makes its own
        for _ in range(2):
            g = grad(lambda p: functional_call(model, p, (x[0],)).sum())(params)
            torch.testing.assert_close(g["lin.weight"][0], 2 * x[0] * params["alpha"][0], rtol=1e-6, atol=1e-6)
    assert torch.equal(model.shared, torch.ones(3)) and model.shared is model.holder.shared


class _GrowingCache(nn.Module):
    """A table grown in forward when the input is longer, its size in a Python int (the lazy cache of
    older rotary embeddings)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.cached = 2
        self.register_buffer("cos", torch.cos(torch.arange(2.0))[:, None], persistent=False)

    def forward(self, x):
        steps = x.shape[1]
        if steps > self.cached:
            self.cached = steps
            self.register_buffer("cos", torch.cos(torch.arange(float(steps)))[:, None], persistent=False)
        return (self.lin(x) * self.cos[:steps]).sum(1)


def test_a_buffer_grown_in_forward_is_kept_with_a_warning():
    """The table as loaded was put back while the int stayed grown: the export and the model after it
    failed ('size of tensor a (5) must match ... (2)')."""
    torch.manual_seed(0)
    model = _GrowingCache()
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="buffer cos"):
        got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    np.testing.assert_allclose(got, _reference_built(_GrowingCache, given, x, y), rtol=1e-5, atol=1e-6)
    assert model.cached == 5 and model.cos.shape == (5, 1)
    model(x)  # usable after the export


class _GrowingCacheHeld(nn.Module):
    """_GrowingCache held under one name, or under two (self.b = self.a), called as b."""

    def __init__(self, shared: bool = True):
        super().__init__()
        self.a = _GrowingCache()
        self.b = self.a if shared else None

    def forward(self, x):
        return (self.b or self.a)(x)


@pytest.mark.parametrize("shared", [False, True])
def test_a_buffer_grown_in_forward_is_kept_in_a_module_under_two_names(shared):
    """Was (review61 F2): the restore of a module shared under two names put the buffer as loaded back
    after each forward, so every forward started from the small table and the model ended with it,
    while the warning said it is kept (unshared: kept)."""
    torch.manual_seed(0)
    model = _GrowingCacheHeld(shared)
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="buffer .*cos"):
        got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False).matrices[0]
    np.testing.assert_allclose(
        got, _reference_built(lambda: _GrowingCacheHeld(shared), given, x, y), rtol=1e-5, atol=1e-6
    )
    assert model.a.cached == 5 and model.a.cos.shape == (5, 1)
    assert isinstance(model.a.lin.weight, nn.Parameter)
    model(x)  # usable after the export


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("make", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(2, 4))])
def test_a_script_module_is_refused_naming_the_model(make):
    """torch's 'register_forward_pre_hook is not supported on ScriptModules' came out of the export."""
    model = _Temperature()
    given = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="model: .*ScriptModule"):
        export_gradients(make(model), [(given, 1.0)], (torch.randn(2, 4), torch.zeros(2, dtype=torch.long)), LOSS)


class _Views(nn.Module):
    """Two buffers that are views of one storage: a write through one shows through the other."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        whole = torch.ones(3)
        self.register_buffer("whole", whole)
        self.register_buffer("head", whole[:2])

    def forward(self, x):
        self.whole.mul_(3)
        return self.lin(x) * self.head


def test_buffers_that_are_views_of_one_storage_stay_views_of_one_copy():
    """Each view got its own copy: the write through one was not seen through the other (relative
    error 0.75)."""
    torch.manual_seed(0)
    model = _Views()
    given = copy.deepcopy(model.state_dict())
    assert given["head"].untyped_storage().data_ptr() == given["whole"].untyped_storage().data_ptr()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    for batch_size in (None, 1):
        got = export_gradients(model, [(given, 1.0)], (x, y), LOSS, progress=False, batch_size=batch_size).matrices[0]
        np.testing.assert_allclose(got, _reference_built(_Views, given, x, y), rtol=1e-5, atol=1e-6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with FreshBuffers(model):
        for _ in range(2):
            torch.testing.assert_close(model(x), 3 * model.lin(x), rtol=1e-6, atol=1e-6)
        g = grad(lambda p: functional_call(model, p, (x[0],)).sum())(params)  # after a write: the transform's own
        torch.testing.assert_close(g["lin.weight"][0], 3 * x[0], rtol=1e-6, atol=1e-6)
    with FreshBuffers(model):  # the first forward inside the transform: no copy kept yet
        g = grad(lambda p: functional_call(model, p, (x[0],)).sum())(params)
        torch.testing.assert_close(g["lin.weight"][0], 3 * x[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(given["whole"], torch.ones(3)) and torch.equal(model.whole, torch.ones(3))
    assert model.head.untyped_storage().data_ptr() == model.whole.untyped_storage().data_ptr()


class _Stop(BaseException):
    pass


def test_forwards_after_a_base_exception_in_a_pre_hook_start_from_the_buffers_as_loaded():
    """A BaseException skips the forward hooks: the swap it left made the next forwards look like calls
    inside it, all run with one working copy (the counter went on)."""
    model = _Recursive()
    x = torch.randn(2, 4)

    def stop_once(module, args):
        if stopping:
            raise _Stop

    model.register_forward_pre_hook(stop_once)
    with FreshBuffers(model), torch.no_grad():
        stopping = True
        with pytest.raises(_Stop):
            model(x)
        stopping = False
        for _ in range(3):
            torch.testing.assert_close(model(x), 3 * model.lin(x), rtol=1e-6, atol=1e-6)
    assert model.count.item() == 0


def test_a_compiled_recursive_forward_shares_the_outer_forwards_copies():
    """Under torch.compile the stack walk telling a recursive call from a stale swap was traced by
    dynamo, which failed ('... is already tracked for mutation', review23 item 1)."""
    torch.manual_seed(0)
    model = _Recursive()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    with FreshBuffers(model), torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), 3 * model.lin(x), rtol=1e-6, atol=1e-6)
    assert model.count.item() == 0


def test_importing_tracin_torch_leaves_dynamo_unloaded():
    """The stack walk's dynamo exemption is lazy: torch.compiler.disable as a decorator imported
    torch._dynamo (sympy, inductor, onnx: +73 MiB resident, ~2 s) with every import of tracin.torch."""
    code = "import sys, tracin.torch; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"


class _ViewsScaled(_Views):
    """_Views with a parameter the batched hooks do not cover: the export runs it under vmap(grad)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((2,), 0.7))

    def forward(self, x):
        return super().forward(x) * self.alpha


def test_buffers_that_are_views_of_one_storage_stay_views_under_vmap_of_grad():
    """grad wraps the buffers it is given: each view got its own copy there (relative error 0.75)."""
    torch.manual_seed(0)
    model = _ViewsScaled()
    given = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    got = _exported_without_fallback(model, given, x, y)
    np.testing.assert_allclose(got, _reference_built(_ViewsScaled, given, x, y), rtol=1e-5, atol=1e-6)
    assert torch.equal(given["whole"], torch.ones(3))
