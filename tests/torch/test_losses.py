"""The loss checks of losses.check_loss_on that review162 asked for: a loss_fn reading a model parameter directly
(F1) and one coupling the examples of a batch (F2) are refused, naming loss_fn; correct losses are not, their rows
equal to float64 per-example autograd."""

from __future__ import annotations

import copy
import importlib
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin
from tracin.torch import export_gradients

CE = nn.CrossEntropyLoss(reduction="none")
MODES = ["full", "factored", "last_layer"]


class Body(nn.Module):
    """Returns hidden states; the head is applied by whoever calls it (as LM code often does)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return torch.tanh(self.body(x))


class Whole(nn.Module):
    """The fix the error advises: body and head in one forward."""

    def __init__(self, inner: Body):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.head(self.inner(x))


def _data(rows: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)


def _later(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A checkpoint other than the model's live weights."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _reference(model: nn.Module, state, x, y, loss_fn, names=None) -> np.ndarray:
    """float64 per-example gradients by autograd on each example alone, of a copy loaded with `state`."""
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    params = [p for n, p in m.named_parameters() if p.requires_grad and (names is None or n in names)]
    rows = []
    for i in range(len(y)):
        one = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        loss = loss_fn(m(one), y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).numpy()


def _relerr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    ("mode", "projection"), [("full", None), ("factored", None), ("last_layer", None), ("full", tracin.Projection(8))]
)
def test_a_loss_fn_applying_the_models_head_is_refused_naming_it(mode, projection):
    model = Body()
    x, y = _data()

    def loss(hidden, targets):
        return CE(model.head(hidden), targets)

    checkpoints = [(_later(model), 1.0)]
    with pytest.raises(ValueError, match=r"loss_fn reads the model's parameters 'head.weight', 'head.bias'") as e:
        export_gradients(model, checkpoints, (x, y), loss, mode=mode, projection=projection, progress=False)
    assert "inside the model's forward" in str(e.value)


def test_the_advised_fix_gives_exact_rows():
    inner = Body()
    model = Whole(inner)
    state = {f"inner.{k}": v for k, v in _later(inner).items()}
    x, y = _data()
    got = export_gradients(model, [(state, 1.0)], (x, y), CE, progress=False).matrices[0]
    assert _relerr(got, _reference(model, state, x, y, CE)) < 1e-5


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_a_weight_penalty_in_loss_fn_is_refused(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    else:
        model = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    x, y = _data()
    last = model[-1]

    def penalised(outputs, targets):
        return CE(outputs, targets) + 0.5 * last.weight.pow(2).sum()

    with pytest.raises(ValueError, match=rf"loss_fn reads the model's parameter '{len(model) - 1}.weight' directly"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), penalised, progress=False)


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight, a frozen projection between, a buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("shift", torch.full((4,), 0.1))

    def forward(self, ids):
        return self.head(torch.tanh(self.frozen(self.emb(ids).mean(1)) + self.shift))


def test_losses_reading_only_the_outputs_are_not_refused():
    """A tied weight, a frozen layer, a buffer and a checkpoint other than the live weights: the loss reads the
    outputs only, and the rows are per-example autograd's."""
    model = TiedLM()
    state = _later(model)
    state["head.weight"] = state["emb.weight"]  # one tensor under both names
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 7, (10, 5), generator=g), torch.randint(0, 7, (10,), generator=g)
    got = export_gradients(model, [(state, 1.0)], (ids, y), CE, progress=False, batch_size=4).matrices[0]
    assert _relerr(got, _reference(model, state, ids, y, CE)) < 1e-5


class TiedHidden(TiedLM):
    def forward(self, ids):
        return torch.tanh(self.frozen(self.emb(ids).mean(1)) + self.shift)


def test_a_tied_head_applied_in_loss_fn_is_named_under_both_names():
    model = TiedHidden()
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 7, (4, 5), generator=g), torch.randint(0, 7, (4,), generator=g)

    def loss(hidden, targets):
        return CE(model.head(hidden), targets)

    with pytest.raises(ValueError, match=r"parameter 'emb.weight' \(also 'head.weight'\) directly"):
        export_gradients(model, [(model.state_dict(), 1.0)], (ids, y), loss, progress=False)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_takes_a_correct_loss_on_a_checkpoint_other_than_the_live_weights(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    state = _later(model)
    x, y = _data(10)
    got = export_gradients(model, [(state, 1.0)], (x, y), CE, mode=mode, progress=False, batch_size=4)
    want = _reference(model, state, x, y, CE)
    np.testing.assert_allclose(tracin.scores(got, got), want @ want.T, rtol=1e-4, atol=1e-5 * np.abs(want).max() ** 2)


def test_a_loss_module_with_parameters_of_its_own_is_not_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, outputs, targets):
            return CE(outputs * self.scale, targets)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data()
    loss = Scaled()
    got = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), loss, progress=False).matrices[0]
    assert _relerr(got, _reference(model, model.state_dict(), x, y, lambda o, t: CE(o * 2.0, t))) < 1e-5


def _centred(outputs, targets):
    losses = CE(outputs, targets)
    return losses - losses.mean()


def _per_batch_mean(outputs, targets):
    return CE(outputs, targets) / outputs.shape[0]


def _infonce(outputs, targets):
    z = F.normalize(outputs, dim=1)
    return CE(z @ z.T / 0.5, torch.arange(len(targets)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_fn", [_centred, _per_batch_mean, _infonce])
def test_a_loss_coupling_the_examples_of_a_batch_is_refused(loss_fn, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(12)
    with pytest.raises(ValueError, match="loss_fn's loss of one example depends on the other examples of its batch"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), loss_fn, mode=mode, progress=False, batch_size=6)


def _five_percent_heavier_in_a_batch(outputs, targets):
    return CE(outputs, targets) * (1.05 if len(targets) > 1 else 1.0)


def test_a_coupling_of_a_few_percent_of_the_loss_is_refused():
    # a gap of 4.8% of the loss, over the 1e-2 tolerance (the other couplings refused are near 100%)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(12)
    loss_fn = _five_percent_heavier_in_a_batch
    with pytest.raises(ValueError, match=r"loss_fn's loss of one example depends .* \(by 4\.8e-02 of its size"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), loss_fn, progress=False, batch_size=6)


def test_the_coupling_error_gives_the_row_and_its_loss_in_the_batch_and_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(12)
    with torch.no_grad():
        ce = CE(model(x[:6]), y[:6])
    in_batch = f"{(ce[0] - ce.mean()).item():.6g}"  # the export words an error of its first rows on the whole batch
    with pytest.raises(ValueError, match=rf"row 0's loss is {in_batch} in a batch of 6 rows and 0 alone"):
        export_gradients(model, [(model.state_dict(), 1.0)], (x, y), _centred, progress=False, batch_size=6)


def _rounded_at_the_batch_scale(outputs, targets):
    """Cross-entropy rounded at a magnitude set by the batch size, 2^15 alone (float32 spacing 2^-8) and 2^22 in a
    batch (spacing 0.5): exactly ce in exact arithmetic, its gradient ce's; alone and in its batch it differs by
    float32 rounding only, not in float64 (exact there)."""
    ce = CE(outputs, targets)
    big = outputs.new_tensor(2.0 ** (15 if len(targets) == 1 else 22))
    return ce + ((big + ce) - big - ce)


def test_a_loss_differing_alone_by_float32_rounding_only_is_not_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(12)
    with torch.no_grad():
        outputs = model(x[:2])
        alone = _rounded_at_the_batch_scale(outputs[:1], y[:1])
        batched = _rounded_at_the_batch_scale(outputs, y[:2])[:1]
    assert abs(alone - batched).item() > 1e-2 * abs(alone).item()  # beyond the float32 tolerance: float64 decides
    state = model.state_dict()
    loss = _rounded_at_the_batch_scale
    got = export_gradients(model, [(state, 1.0)], (x, y), loss, progress=False, batch_size=6).matrices[0]
    assert _relerr(got, _reference(model, state, x, y, CE)) < 1e-5


class PerToken(nn.Module):
    """(batch, tokens, classes) logits, large enough that well-fit examples' losses are tiny (float32 rounding of
    logsumexp - z_y is then most of the loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, ids):
        return 40 * self.out(self.emb(ids))


def _per_token(outputs, targets):
    return CE(outputs.flatten(0, 1), targets.flatten()).view(len(targets), -1).mean(1)


def test_per_token_losses_with_tiny_values_are_not_taken_for_coupling():
    model = PerToken()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 11, (6, 7), generator=g)
    with torch.no_grad():
        y = model(ids).argmax(-1)  # every token predicted: losses ~1e-10 and below
    state = model.state_dict()
    got = export_gradients(model, [(state, 1.0)], (ids, y), _per_token, progress=False, batch_size=3).matrices[0]
    want = _reference(model, state, ids, y, _per_token)
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-12) + 1e-12


class SequenceFirst(nn.Module):
    """(tokens, batch, classes) outputs and a 0-d auxiliary loss: not batch-first, the coupling is not judged."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x).unsqueeze(0).expand(2, -1, -1), self.fc.weight.pow(2).sum()


def test_outputs_that_are_not_batch_first_are_not_judged():
    model = SequenceFirst()
    x, y = _data(4)

    def loss(outputs, targets):
        return CE(outputs[0].mean(0), targets)  # (T, B, C) -> mean over T -> (B, C)

    state = model.state_dict()
    got = export_gradients(model, [(state, 1.0)], (x, y), loss, progress=False, batch_size=2).matrices[0]
    assert _relerr(got, _reference(model, state, x, y, loss)) < 1e-5


class Checkpointed(nn.Module):
    """A block between two layers run under torch.utils.checkpoint (reentrant or not)."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.h = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.reentrant = reentrant

    def block(self, t):
        return torch.tanh(self.b(t))

    def forward(self, x):
        t = torch.tanh(self.a(x))
        if self.reentrant is not None:  # None: the same model without checkpointing, the reference's
            return self.h(torch.utils.checkpoint.checkpoint(self.block, t, use_reentrant=self.reentrant))
        return self.h(self.block(t))


_CHECKPOINTING = r"checkpoints its activations .* model\.gradient_checkpointing_disable\(\)"
HOW = {
    "full": {},
    "factored": {"mode": "factored"},
    "last_layer": {"mode": "last_layer"},
    "kronecker": {"projection": tracin.Projection(16, seed=0, per_layer=True, kronecker=True)},
}


@pytest.mark.parametrize("how", [h for h in HOW if h != "last_layer"])
def test_non_reentrant_checkpointing_is_refused_at_a_checkpoint_other_than_the_live_weights(how):
    """Was exported with no warning, rows silently wrong (full: layer a's 20-60% off, factored: 57%): the backward
    recomputed the block from the model's own weights, the checkpoint's swapped out (review183 F1)."""
    model = Checkpointed(reentrant=False)
    x, y = _data()
    with pytest.raises(ValueError, match=_CHECKPOINTING + r".*use_reentrant=False.*model's own weights"):
        export_gradients(model, [(_later(model), 1.0)], (x, y), CE, progress=False, batch_size=3, **HOW[how])
    assert torch.utils.checkpoint._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"


def test_composable_checkpointing_of_a_submodule_is_refused_too():
    """torch.distributed._composable.checkpoint(module) imports the non-reentrant generator by name, so swapping
    torch.utils.checkpoint's missed it: exported silently, rows up to 27% off (fr195); the name is put back."""
    composable = pytest.importorskip("torch.distributed._composable")  # absent from builds without distributed
    model = Checkpointed(reentrant=None)
    composable.checkpoint(model.b)
    x, y = _data()
    with pytest.raises(ValueError, match=_CHECKPOINTING + r".*use_reentrant=False"):
        export_gradients(model, [(_later(model), 1.0)], (x, y), CE, progress=False, batch_size=3)
    activation = importlib.import_module("torch.distributed._composable.checkpoint_activation")
    assert activation._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"


@pytest.mark.parametrize("how", [{"mode": "last_layer"}, {"layers": ["h"]}])
def test_a_head_after_a_non_reentrant_checkpointed_block_is_exported_right(how):
    """The backward to the head alone never recomputes the block: was refused as soon as the block ran (fr189)."""
    model = Checkpointed(reentrant=False)
    state = _later(model)
    x, y = _data()
    got = export_gradients(model, [(state, 1.0)], (x, y), CE, progress=False, batch_size=3, **how)
    want = _reference(Checkpointed(reentrant=None), state, x, y, CE, ["h.weight", "h.bias"])
    np.testing.assert_allclose(tracin.scores(got, got), want @ want.T, rtol=1e-4, atol=1e-5 * np.abs(want).max() ** 2)


def test_another_threads_non_reentrant_checkpointing_during_the_check_is_not_the_models():
    """User code in another thread running its own checkpointed block while the export checks the loss: the
    model (no checkpointing) was refused as checkpointing its activations (fr189)."""
    other = Checkpointed(reentrant=False)
    steps = []

    def step():  # forward and backward: the block run and recomputed
        other(torch.randn(2, 6)).sum().backward()
        steps.append(1)

    class Waiting(nn.Module):  # the loss check's forwards (torch's generator swapped) wait for another thread's step
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.h = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            if torch.utils.checkpoint._checkpoint_without_reentrant_generator.__module__ != "torch.utils.checkpoint":
                worker = threading.Thread(target=step)
                worker.start()
                worker.join()
            return self.h(torch.tanh(self.a(x)))

    model = Waiting()
    state = _later(model)
    x, y = _data()
    got = export_gradients(model, [(state, 1.0)], (x, y), CE, progress=False, batch_size=3)
    assert steps
    assert _relerr(got.matrices[0], _reference(model, state, x, y, CE)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_reentrant_checkpointing_at_a_checkpoint_other_than_the_live_weights_is_refused_or_right(mode):
    model = Checkpointed(reentrant=True)
    state = _later(model)
    x, y = _data()
    try:
        got = export_gradients(model, [(state, 1.0)], (x, y), CE, mode=mode, progress=False, batch_size=3)
    except ValueError as e:
        assert re.search(_CHECKPOINTING, str(e))
        return
    names = ["h.weight", "h.bias"] if mode == "last_layer" else None
    want = _reference(Checkpointed(reentrant=None), state, x, y, CE, names)
    np.testing.assert_allclose(tracin.scores(got, got), want @ want.T, rtol=1e-4, atol=1e-5 * np.abs(want).max() ** 2)


class Prior(nn.Module):
    """Logits, and a class prior (a buffer) and a temperature (a frozen parameter) a logit-adjusted loss reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.register_buffer("log_prior", torch.log(torch.tensor([0.5, 0.3, 0.2])))
        self.temperature = nn.Parameter(torch.tensor(1.5), requires_grad=False)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("read", ["log_prior", "temperature"])
def test_a_loss_fn_reading_a_buffer_or_frozen_parameter_the_checkpoint_holds_otherwise_is_refused(read, mode):
    """Was exported with the live buffer: rows 49% off those of the checkpoint's (review183 F2)."""
    model = Prior()
    state = _later(model)  # its buffer and frozen parameter differ from the live ones
    live = {n: t.clone() for n, t in model.state_dict().items()}

    def loss(logits, targets):
        if read == "log_prior":
            return CE(logits + model.log_prior, targets)
        return CE(logits / model.temperature, targets)

    x, y = _data()
    with pytest.raises(ValueError, match=rf"loss_fn reads the model's buffer or frozen parameter '{read}' directly"):
        export_gradients(model, [(state, 1.0)], (x, y), loss, mode=mode, progress=False, batch_size=4)
    for n, t in model.state_dict().items():  # the values tried are put back
        assert torch.equal(t, live[n]), n


@pytest.mark.parametrize("mode", MODES)
def test_a_loss_fn_reading_a_buffer_the_checkpoint_holds_unchanged_is_not_refused(mode):
    """A fixed prior, equal in every checkpoint: the loss sees the checkpoint's value, the rows are right."""
    model = Prior()
    state = _later(model)
    state["log_prior"] = model.log_prior.clone()
    state["temperature"] = model.temperature.detach().clone()

    def loss(logits, targets):
        return CE(logits / model.temperature + model.log_prior, targets)

    def reference_loss(logits, targets):
        return CE(logits / state["temperature"].double() + state["log_prior"].double(), targets)

    x, y = _data(10)
    got = export_gradients(model, [(state, 1.0)], (x, y), loss, mode=mode, progress=False, batch_size=4)
    names = ["net.2.weight", "net.2.bias"] if mode == "last_layer" else None
    want = _reference(model, state, x, y, reference_loss, names)
    np.testing.assert_allclose(tracin.scores(got, got), want @ want.T, rtol=1e-4, atol=1e-5 * np.abs(want).max() ** 2)


def test_a_loss_fn_adding_random_noise_is_neither_taken_for_coupling_nor_for_reading_a_buffer():
    """A loss drawing random numbers (noise that carries no gradient) gives other losses on every call: the checks
    comparing calls (a row alone against the batch, the buffers swapped to the checkpoint's) cannot judge it and must
    not refuse it (r329 mutants: the coupling check without its _random_loss guard, the buffer check without its
    changed() guard, refused it); its rows are the noise-free loss's, float64 reference."""
    model = Prior()
    state = _later(model)  # its buffer and frozen parameter differ from the live ones; loss_fn reads neither

    def noisy(logits, targets):
        return CE(logits, targets) + 0.5 * torch.rand(len(targets))

    x, y = _data(10)
    got = export_gradients(model, [(state, 1.0)], (x, y), noisy, progress=False, batch_size=4)
    want = _reference(model, state, x, y, CE)
    np.testing.assert_allclose(got.matrices[0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_a_loss_fn_reading_a_buffer_the_checkpoint_holds_a_little_otherwise_is_refused():
    """A prior up to 3e-4 off in the checkpoint (not a shift of all classes) moves the losses by less than 1e-3 of
    their size, far beyond float32 rounding: still a loss reading the live buffer (r329 mutant: a 1e-3 relative
    tolerance on the losses took it as unread)."""
    model = Prior()
    state = _later(model)
    state["log_prior"] = model.log_prior + torch.tensor([3e-4, 0.0, -3e-4])
    state["temperature"] = model.temperature.detach().clone()

    def loss(logits, targets):
        return CE(logits + model.log_prior, targets)

    x, y = _data()
    with pytest.raises(ValueError, match=r"loss_fn reads the model's buffer or frozen parameter 'log_prior' directly"):
        export_gradients(model, [(state, 1.0)], (x, y), loss, progress=False, batch_size=4)


def test_a_coupled_loss_is_refused_when_another_checked_row_has_a_nan_loss():
    """Row 1's input is NaN (its loss NaN in the batch and alone): row 0's coupling is still measured against the
    finite losses' size (r329 mutant: the NaN taken into that size made every gap NaN, and the coupled loss
    passed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(12)
    x[1] = float("nan")
    with pytest.raises(ValueError, match=r"loss_fn's loss of one example depends .* row 0's loss"):
        export_gradients(
            model, [(model.state_dict(), 1.0)], (x, y), _five_percent_heavier_in_a_batch, progress=False, batch_size=6
        )
