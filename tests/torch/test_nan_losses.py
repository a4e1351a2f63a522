"""review328 F2: tracin.torch warns about an example whose loss is NaN or infinite, on every path that computes
per-example gradients (hooks, vmap, the per-example loop, Kronecker per-token and plain segments, factored
layers), as tracin.jax does: a per-example mean over answer tokens whose labels are all -100 is 0 / 0 = NaN, while
its gradient row is all 0 (cross_entropy's gradient at an ignored label), which scores as "no influence"."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin
from tracin.torch import export_gradients

N, T, V, C, BATCH = 6, 5, 7, 3, 4
NAN_ROW = 4  # the second batch's first row: the warning numbers the data's rows, not the batch's
NAN_LOSS = rf"loss_fn gives a NaN or infinite loss for row {NAN_ROW} of the data at checkpoint 0: .* as autograd gives"


class Tokens(nn.Module):
    """A token model (B, T) -> (B, T, V); with in_place, an in-place add into an unbatched tensor that vmap
    refuses (the per-example loop runs it)."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, V)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.register_buffer("offset", torch.full((8,), 0.1))
        self.in_place = in_place

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if self.in_place:
            base = self.offset.clone().expand(*ids.shape, 8).contiguous()
            base += h
            h = base
        return self.head(torch.tanh(h) * self.scale)


class Heads(nn.Module):
    """(B, 4) -> (B, T * C) through two Linears: T tokens of C classes, read by the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, T * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def answer_mean(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross entropy over each example's answer tokens (labels != -100); (B, T * C) outputs are T
    tokens of C classes."""
    logits = out.reshape(len(labels), T, -1)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return ce.sum(1) / (labels != -100).sum(1)


def _labels(classes: int, truncated: bool) -> torch.Tensor:
    """(N, T) labels, the first 2 tokens (the prompt) -100; with `truncated`, every token of NAN_ROW."""
    labels = torch.randint(0, classes, (N, T), generator=torch.Generator().manual_seed(2))
    labels[:, :2] = -100
    if truncated:
        labels[NAN_ROW] = -100
    return labels


def _tokens_export(in_place: bool, truncated: bool, **kwargs) -> tuple:
    model = Tokens(in_place)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(3))
    data = (ids, _labels(V, truncated))
    return export_gradients(model, [(model.state_dict(), 1.0)], data, answer_mean, batch_size=BATCH, **kwargs), data


def _heads_export(truncated: bool, **kwargs) -> tuple:
    model = Heads()
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(4))
    data = (x, _labels(C, truncated))
    return export_gradients(model, [(model.state_dict(), 1.0)], data, answer_mean, batch_size=BATCH, **kwargs), data


KRONECKER = {"projection": tracin.Projection(16, seed=0, per_layer=True, kronecker=True)}
PATHS = {
    "hooks": lambda truncated: _tokens_export(False, truncated, layers=["emb", "head"]),
    "vmap": lambda truncated: _tokens_export(False, truncated, layers=["scale"]),
    "loop": lambda truncated: _tokens_export(True, truncated, layers=["scale"]),
    "kronecker": lambda truncated: _tokens_export(False, truncated, layers=["emb", "head"], **KRONECKER),
    "kronecker_plain": lambda truncated: _tokens_export(False, truncated, layers=["scale"], **KRONECKER),
    "last_layer": lambda truncated: _heads_export(truncated, mode="last_layer"),
    "factored": lambda truncated: _heads_export(truncated, mode="factored"),
}


def _ours(caught: list) -> list:
    return [w for w in caught if "NaN or infinite loss" in str(w.message)]


@pytest.mark.parametrize("path", list(PATHS))
def test_an_example_whose_answer_was_truncated_away_is_warned_about_naming_its_row(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, _ = PATHS[path](True)
    if path == "loop":  # the path this case is meant to take
        assert any("slower per-example loop" in str(w.message) for w in caught)
    else:
        assert not any("slower per-example loop" in str(w.message) for w in caught)
    ours = _ours(caught)
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ours[0].category is RuntimeWarning
    assert re.search(NAN_LOSS, str(ours[0].message))
    assert ours[0].filename == __file__  # at the user's line: here, via PATHS
    row = np.asarray(g.left[0] if hasattr(g, "left") else g.matrices[0])[NAN_ROW]  # factored: dL/dy's row
    assert not row.any() or not np.isfinite(row).all()  # what the warning says: all 0 (silent before) or NaN


def test_the_hooked_row_of_such_an_example_is_all_zero_scoring_as_no_influence():
    """The case the warning exists for: the stored row is exactly 0, not NaN, so scoring cannot refuse it."""
    with pytest.warns(RuntimeWarning, match=NAN_LOSS):
        g, _ = PATHS["hooks"](True)
    rows = np.asarray(g.matrices[0])
    assert not rows[NAN_ROW].any() and np.delete(rows, NAN_ROW, 0).any(axis=1).all()
    np.testing.assert_array_equal(tracin.scores(g, g)[NAN_ROW], 0)


@pytest.mark.parametrize("path", list(PATHS))
def test_finite_losses_warn_nothing_about_losses(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PATHS[path](False)
    assert _ours(caught) == []


def test_an_export_of_finite_losses_on_the_hooks_gives_no_runtime_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        PATHS["hooks"](False)


def test_a_row_is_warned_about_once_an_export_at_the_first_checkpoint_holding_it():
    """Two checkpoints: one warning, at checkpoint 0, as tracin.jax (LossWatch counts a row once an export)."""
    model = Tokens()
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(3))
    later = {k: v + 0.01 for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(
            model, [(model.state_dict(), 1.0), (later, 1.0)], (ids, _labels(V, True)), answer_mean, progress=False
        )
    assert [str(w.message).split(":")[0] for w in _ours(caught)] == [
        f"loss_fn gives a NaN or infinite loss for row {NAN_ROW} of the data at checkpoint 0"
    ]


@pytest.mark.parametrize("mode", ["last_layer", "factored"])
def test_the_first_rows_checks_own_passes_leave_the_batchs_losses(mode, monkeypatch):
    """The first-rows check's widened look re-captures the checked rows (LinearFactors._captured, setting its
    `losses`): the batch's losses, saved before the check, are what the export reads; a NaN row of the first batch
    past the checked rows is still named."""
    from tracin.torch import last_layer

    verdict, calls = last_layer.LinearFactors._verdict, []

    def disagreeing_once(self, *args, **kwargs):  # the widened look runs as for a well-fit float32 regression
        bad, random = verdict(self, *args, **kwargs)
        calls.append(bad)
        return (bad or [self.names[0]]) if len(calls) == 1 else bad, random

    monkeypatch.setattr(last_layer.LinearFactors, "_verdict", disagreeing_once)
    model = Heads()
    labels = _labels(C, False)
    labels[BATCH - 1] = -100  # the first batch's last row, past the CHECKED_ROWS (2) the check looks at
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(model, [(model.state_dict(), 1.0)], (x, labels), answer_mean, batch_size=BATCH, mode=mode)
    assert len(calls) >= 2  # the widened look ran
    assert [str(w.message).split(":")[0] for w in _ours(caught)] == [
        f"loss_fn gives a NaN or infinite loss for row {BATCH - 1} of the data at checkpoint 0"
    ]


_INTERRUPT = {"at_call": 0, "calls": 0}  # the loss call raising KeyboardInterrupt (0: none)


def _interrupting_answer_mean(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """answer_mean, raising KeyboardInterrupt at its _INTERRUPT["at_call"]-th call (the same function on resume)."""
    _INTERRUPT["calls"] += 1
    if _INTERRUPT["calls"] == _INTERRUPT["at_call"]:
        raise KeyboardInterrupt
    return answer_mean(out, labels)


def test_an_interrupted_pass_warns_of_the_rows_it_stored_which_its_resume_skips(tmp_path):
    """The warning came at the end of a pass only: rows stored before a Ctrl-C were never named, as the
    resume does not compute them again (fr335)."""
    model = Tokens()
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(3))
    labels = _labels(V, truncated=False)
    labels[1] = -100  # in the first batch, stored before the interruption
    export = (model, [(model.state_dict(), 1.0)], (ids, labels), _interrupting_answer_mean)
    kwargs = {"batch_size": BATCH, "store": tmp_path / "s", "layers": ["emb", "head"]}
    _INTERRUPT.update(calls=0, at_call=0)
    export_gradients(*export, batch_size=BATCH, layers=["emb", "head"])  # counts the loss calls of a whole export
    last = _INTERRUPT["calls"]  # the second (last) batch's pass
    _INTERRUPT.update(calls=0, at_call=last)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("always")
        export_gradients(*export, **kwargs)
    assert ["loss for row 1 of the data at checkpoint 0: " in str(w.message) for w in _ours(caught)] == [True]
    _INTERRUPT.update(calls=0, at_call=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(*export, **kwargs)
    assert _ours(caught) == []  # row 1 not computed again
    assert tracin.GradientStore.open(tmp_path / "s").n_rows == N


def test_a_batch_cut_into_hook_passes_names_a_row_of_its_last_pass(monkeypatch):
    """PerExampleGradients joins the losses of a batch's hook passes (a batch over _PASS_BYTES is cut into
    several): a NaN row in the batch's second pass is named, not only the first pass's rows."""
    from tracin.torch import per_example

    passes = []
    by_hooks = per_example.PerExampleGradients._by_hooks

    def counted(self, state, inputs, targets, out):
        passes.append(out.shape[0])
        return by_hooks(self, state, inputs, targets, out)

    monkeypatch.setattr(per_example.PerExampleGradients, "_pass_rows", lambda self: 2)
    monkeypatch.setattr(per_example.PerExampleGradients, "_by_hooks", counted)
    model = Tokens()
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(3))
    labels = _labels(V, truncated=False)
    labels[BATCH - 1] = -100  # the first batch's last row: its second pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(
            model, [(model.state_dict(), 1.0)], (ids, labels), answer_mean, batch_size=BATCH, layers=["emb", "head"]
        )
    assert passes == [2, 2, 2]  # the batches of 4 and 2 rows in passes of 2
    assert [str(w.message).split(":")[0] for w in _ours(caught)] == [
        f"loss_fn gives a NaN or infinite loss for row {BATCH - 1} of the data at checkpoint 0"
    ]


def test_a_row_first_not_finite_at_a_later_checkpoint_is_named_at_that_checkpoint():
    """LossWatch.checkpoint is set as the export loads each checkpoint: a row whose loss is finite at
    checkpoint 0 and NaN at checkpoint 1 (a NaN embedding of a token only that row reads) is named at 1."""
    model = Tokens()
    ids = torch.randint(1, V, (N, T), generator=torch.Generator().manual_seed(3))
    ids[NAN_ROW, 2] = 0  # token 0: only this row, an answer token
    later = {k: v.clone() for k, v in model.state_dict().items()}
    later["emb.weight"][0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(
            model,
            [(model.state_dict(), 1.0), (later, 1.0)],
            (ids, _labels(V, False)),
            answer_mean,
            batch_size=BATCH,
            layers=["emb", "head"],
        )
    assert [str(w.message).split(":")[0] for w in _ours(caught)] == [
        f"loss_fn gives a NaN or infinite loss for row {NAN_ROW} of the data at checkpoint 1"
    ]


class _Interrupted:
    """Two batches of three rows: the first with a NaN-loss row (target -1), then `error` raised (a Ctrl-C,
    a disk gone while reading) before the second."""

    def __init__(self, error: BaseException):
        self.error = error
        torch.manual_seed(0)
        self.x, self.y = torch.randn(6, 4), torch.tensor([0, -1, 2, 0, 1, 2])

    def __len__(self) -> int:
        return 6

    def __iter__(self):
        yield self.x[:3], self.y[:3]
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk gone while reading batch 2")])
def test_an_interrupted_pass_raises_its_own_error_when_warnings_are_errors(error):
    """review343 M1: the NaN-loss warning of an interrupted pass (flushed so that its stored rows are told
    about) replaced the pass's own error when warnings were errors (pytest's filterwarnings=error): Ctrl-C
    arrived as a RuntimeWarning, an Exception. The pass's error is raised, the warning not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, C))

    def nan_at_negative(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(out, y.clamp(min=0), reduction="none")
        return torch.where(y < 0, torch.full_like(losses, float("nan")), losses)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)) as raised:
            export_gradients(model, [(model.state_dict(), 1.0)], _Interrupted(error), nan_at_negative, progress=False)
    assert raised.value is error


def test_a_float16_loss_that_overflows_is_said_to_be_one_and_its_finite_row_is_stored():
    """review343 L1: a float16 squared residual above 65504 is inf while its gradient row is finite and right
    (against float64 NumPy); the warning says it may be an overflow and to compute loss_fn in float32, not
    only to drop the example."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).half()
    x, y = torch.randn(4, 3).half(), torch.zeros(4, 1).half()
    y[2] = 300.0

    def squared(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out - t) ** 2).sum(1)

    with pytest.warns(RuntimeWarning, match="NaN or infinite loss") as caught:
        grads = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), squared, progress=False)
    ours = [str(w.message) for w in caught if "NaN or infinite loss" in str(w.message)]
    assert len(ours) == 1 and ours[0].startswith("loss_fn gives a NaN or infinite loss for row 2 of the data")
    assert ours[0].endswith(
        "or finite and right (a float16 loss that overflowed to infinity); compute loss_fn in float32 if it "
        "overflowed, else drop that example or fix its targets"
    )
    w, b = (model.weight.detach().double().numpy(), model.bias.detach().double().numpy())
    xs = x.double().numpy()
    residual = xs[2] @ w[0] + b[0] - 300.0
    exact = np.concatenate([2 * residual * xs[2], [2 * residual]])  # d/dw, d/db of (w.x + b - t)^2, float64
    row = np.asarray(grads.matrices[0], np.float64)[2]
    assert np.isfinite(row).all()
    np.testing.assert_allclose(row, exact, rtol=2e-2)


def test_an_interrupted_pass_with_warnings_as_errors_names_its_nan_rows_in_a_note():
    """The NaN-loss warning an interrupted pass cannot raise (warnings are errors: its own error is raised) is
    a note on that error: the rows stored are not computed, nor told about, again on resume."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, C))

    def nan_at_negative(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(out, y.clamp(min=0), reduction="none")
        return torch.where(y < 0, torch.full_like(losses, float("nan")), losses)

    error = OSError("disk gone while reading batch 2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OSError) as raised:
            export_gradients(model, [(model.state_dict(), 1.0)], _Interrupted(error), nan_at_negative, progress=False)
    assert raised.value is error
    assert [n.split(":")[:2] for n in getattr(error, "__notes__", [])] == [
        ["RuntimeWarning", " loss_fn gives a NaN or infinite loss for row 1 of the data at checkpoint 0"]
    ]


@pytest.mark.parametrize("interrupt", ["store refuses the row", "ctrl-c in loss_fn"])
def test_a_pass_stopped_by_the_export_not_the_data_names_its_nan_rows_in_a_note(tmp_path, interrupt):
    """review360 F3: under a warnings filter "error", a pass stopped by the export itself (a store refusing a
    NaN gradient row, a Ctrl-C while loss_fn runs), not by the data, lost the NaN-loss warning entirely (the
    batches generator saw only a GeneratorExit): it is a note on the error raised."""
    torch.manual_seed(0)
    model = nn.Linear(5, C)
    x, y = torch.randn(12, 5), torch.tensor([0, 1, 2, 2, 2, 0, 1, 1, 0, 0, 2, 1])  # batches of 3 told apart by y
    x[1] = float("nan")  # a NaN loss and a NaN gradient row, in the first batch

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if interrupt == "ctrl-c in loss_fn" and t.shape == (3,) and torch.equal(t, y[3:6]):  # the second batch
            raise KeyboardInterrupt
        return F.cross_entropy(out, t, reduction="none")

    store = tmp_path / "g" if interrupt == "store refuses the row" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError if store else KeyboardInterrupt) as raised:
            export_gradients(
                model, [(model.state_dict(), 1.0)], (x, y), loss, store=store, batch_size=3, progress=False
            )
    if store:
        assert "row 1 of checkpoint 0 holds NaN or Inf gradient values" in str(raised.value)
    assert [n.split(":")[:2] for n in getattr(raised.value, "__notes__", [])] == [
        ["RuntimeWarning", " loss_fn gives a NaN or infinite loss for row 1 of the data at checkpoint 0"]
    ]
