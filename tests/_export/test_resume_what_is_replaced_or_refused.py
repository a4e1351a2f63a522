"""What an export run again into an existing store keeps, makes again or refuses (tracin._export.resume):
a store recording rows (in its manifest or in any range writer's progress file, one unreadable included)
is never made again; an empty one differing only by its learning rates is; the store made again records
this export's own metadata, not the older store's form of it; stores of other lengths are refused naming
the counts, never with an IndexError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from drifted_states import drifted_states
from tracin._export.driver import store_rows
from tracin._export.fingerprint import callable_identity
from tracin._export.resume import changed_params, without_code
from tracin.store import GradientStore
from tracin.torch import export_gradients

N_ROWS = 11
_STOP = [False]  # set: the loss stops the export at its first batch (an interrupted export); not fingerprinted


def good_loss(outputs, targets):
    if _STOP[0]:
        raise KeyboardInterrupt
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def other_loss(outputs, targets):
    return 2.0 * nn.functional.cross_entropy(outputs, targets, reduction="none")


@pytest.fixture
def problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    states = drifted_states(model, 2)
    return model, [(states[0], 0.5), (states[1], 0.25)], (torch.randn(N_ROWS, 4), torch.randint(0, 3, (N_ROWS,)))


def _export(model, checkpoints, data, loss, path, **kwargs):
    return export_gradients(model, checkpoints, data, loss, store=path, batch_size=4, progress=False, **kwargs)


def _interrupted_at_the_first_batch(model, checkpoints, data, path) -> None:
    _STOP[0] = True
    try:
        with pytest.raises(KeyboardInterrupt):
            _export(model, checkpoints, data, good_loss, path)
    finally:
        _STOP[0] = False
    doc = json.loads((path / "manifest.json").read_text())
    assert [c["written"] for c in doc["checkpoints"]] == [[] for _ in checkpoints]  # no rows recorded


def _reference(checkpoints, data) -> list[np.ndarray]:
    """Per checkpoint the float64 per-example gradients of cross entropy, (N_ROWS, 15): weight then bias."""
    x, y = data[0].double(), data[1]
    rows = []
    for state, _ in checkpoints:
        w, b = (state[k].double().requires_grad_() for k in ("0.weight", "0.bias"))
        per = []
        for i in range(len(x)):
            loss = nn.functional.cross_entropy((x[i] @ w.T + b)[None], y[i : i + 1])
            per.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, (w, b))]).numpy())
        rows.append(np.stack(per))
    return rows


def _store_id(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["id"]


def _range_store(problem, path: Path) -> None:
    """A store created for range writers, rows [0, 4) of both checkpoints written by one (rows-0-4.json)."""
    model, checkpoints, data = problem
    with store_rows(0, 0):
        _export(model, checkpoints, data, good_loss, path)
    with store_rows(0, 4):
        _export(model, checkpoints, data, good_loss, path)
    doc = json.loads((path / "manifest.json").read_text())
    assert [c["written"] for c in doc["checkpoints"]] == [[], []]  # the manifest records no row


def test_an_unreadable_progress_file_counts_as_holding_rows(problem, tmp_path):
    """A range writer's progress file that cannot be read may hold rows: the store is not made again for an export
    of other inputs (which is refused, advising to delete it rather than calling it empty), and the file stays."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _range_store(problem, path)
    (path / "rows-0-4.json").write_text("{ not json")
    store_id = _store_id(path)
    with pytest.raises(ValueError, match="other inputs: .*the loss function differs") as err:
        _export(model, checkpoints, data, other_loss, path)
    assert "delete this one" in str(err.value) and "no rows yet" not in str(err.value)
    assert _store_id(path) == store_id
    assert (path / "rows-0-4.json").read_text() == "{ not json"


@pytest.mark.parametrize("lock", ["kept", "removed"])
def test_a_progress_file_holding_rows_of_one_checkpoint_only_is_never_replaced(problem, tmp_path, lock):
    """A range writer stopped after its first checkpoint's rows ([[0, 4]] there, none of the second): rows are
    recorded, so an export of other inputs is refused and the rows stay; its progress file counts also
    when its lock file is gone (a store copied without it, or a user's cleanup)."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _range_store(problem, path)
    progress = json.loads((path / "rows-0-4.json").read_text())
    progress["written"] = [[[0, 4]], []]
    (path / "rows-0-4.json").write_text(json.dumps(progress))
    if lock == "removed":
        (path / "rows-0-4.lock").unlink()
    store_id = _store_id(path)
    with pytest.raises(ValueError, match="other inputs: .*the loss function differs") as err:
        _export(model, checkpoints, data, other_loss, path)
    assert "delete this one" in str(err.value) and "no rows yet" not in str(err.value)
    assert _store_id(path) == store_id
    assert json.loads((path / "rows-0-4.json").read_text())["written"] == [[[0, 4]], []]


def test_an_empty_store_of_other_learning_rates_is_made_again_with_these(problem, tmp_path):
    """Interrupted at its first batch, then run again with another learning rate only: nothing is recorded, so
    the store is made again with the new rates (not refused for them) and finished, equal to float64."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _interrupted_at_the_first_batch(model, checkpoints, data, path)
    rerun = [checkpoints[0], (checkpoints[1][0], 0.3)]
    _export(model, rerun, data, good_loss, path)
    store = GradientStore.open(path)
    assert store.complete and [float(w) for w in store.weights] == [0.5, 0.3]
    for c, ref in enumerate(_reference(checkpoints, data)):
        np.testing.assert_allclose(np.load(path / f"checkpoint_{c:03d}.npy"), ref, rtol=1e-5, atol=1e-6)


def test_an_empty_store_made_again_records_this_exports_metadata_not_the_older_form(problem, tmp_path):
    """An empty store recording the loss as versions before code digests did ("module.good_loss", which
    names the same function) and of other data (7 rows): made again, with this export's metadata (the loss
    with its code digest), as a fresh export's, and finished."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _interrupted_at_the_first_batch(model, checkpoints, (data[0][:7], data[1][:7]), path)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    identity = callable_identity(good_loss)
    assert doc["metadata"]["fingerprints"]["loss"] == identity and " code[" in identity
    doc["metadata"]["fingerprints"]["loss"] = without_code(identity)
    manifest.write_text(json.dumps(doc))
    resumed = _export(model, checkpoints, data, good_loss, path)
    fresh = _export(model, checkpoints, data, good_loss, tmp_path / "fresh")
    assert resumed.complete and resumed.metadata["fingerprints"]["loss"] == identity
    assert GradientStore.open(path).metadata == GradientStore.open(tmp_path / "fresh").metadata == fresh.metadata
    for c, ref in enumerate(_reference(checkpoints, data)):
        np.testing.assert_allclose(np.load(path / f"checkpoint_{c:03d}.npy"), ref, rtol=1e-5, atol=1e-6)


def test_a_store_from_before_checkpoint_sources_with_fewer_checkpoints_is_refused_naming_the_counts(problem, tmp_path):
    """A finished store of one checkpoint, written before metadata["checkpoint_sources"] was recorded, run again
    with two: refused saying 1 there, 2 here (its digests are not matched past its own length)."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _export(model, checkpoints[:1], data, good_loss, path)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["metadata"]["checkpoint_sources"]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"other inputs: the checkpoints differ \(1 there, 2 here\)"):
        _export(model, checkpoints, data, good_loss, path)
    assert GradientStore.open(path).complete


def test_a_jax_store_of_fewer_in_memory_checkpoints_is_refused_naming_the_counts(tmp_path):
    """tracin.jax: a finished store of one in-memory checkpoint run again with two is refused naming the counts
    (the check for digests of arrays alone compares only stores of as many checkpoints)."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from tracin.jax import export_gradients as jax_export

    rng = np.random.default_rng(0)
    params = [{"w": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(2)]
    x, y = rng.standard_normal((N_ROWS, 4)).astype(np.float32), rng.standard_normal((N_ROWS, 3)).astype(np.float32)

    def loss(p, inputs, targets):
        return jnp.sum((inputs @ p["w"] - targets) ** 2, axis=-1)

    def run(n):
        return jax_export(loss, [(p, 1.0) for p in params[:n]], (x, y), store=tmp_path / "s", progress=False)

    assert run(1).complete
    with pytest.raises(ValueError, match=r"other inputs: the checkpoints differ \(1 there, 2 here\)"):
        run(2)


def test_changed_params_counts_a_scalar_parameter_as_one_column():
    """A scalar parameter (shape []) is one column: 1 + 2 * 3 = 7 columns there, 6 here."""
    before = [{"name": "temperature", "shape": []}, {"name": "w", "shape": [2, 3]}]
    now = [{"name": "w", "shape": [2, 3]}]
    assert changed_params(before, now) == "only there: 'temperature' (7 columns there, 6 here)"
    assert changed_params(now, now) is None
    assert changed_params(list(reversed(before)), before) == (
        "the same parameters in another order (7 columns there, 7 here)"
    )


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (dict(dtype="float16"), "dtype 'float32' there vs 'float16' here"),
        (dict(mode="last_layer"), "mode 'full' there vs 'last_layer' here"),
    ],
    ids=["dtype", "mode"],
)
def test_a_finished_store_run_again_with_another_dtype_or_mode_names_that_setting(problem, tmp_path, option, named):
    """The same inputs with another dtype= or mode=: refused as other settings, naming the one that differs, and
    the finished store left as it was."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _export(model, checkpoints, data, good_loss, path)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError) as err:
        _export(model, checkpoints, data, good_loss, path, **option)
    assert str(err.value) == (
        f"{path} holds gradients exported with other settings: {named}. Rows from both cannot be mixed: export into "
        "another directory, or delete this one"
    )
    assert (path / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    ("defect", "named"),
    [
        (lambda doc: "{", r"manifest\.json: corrupt manifest, not valid JSON"),
        (lambda doc: json.dumps({**doc, "n_rows": -1}), r"manifest\.json: n_rows must be a positive integer"),
    ],
    ids=["not JSON", "negative n_rows"],
)
def test_a_store_with_a_defective_manifest_is_refused_by_the_store_with_the_export_advice(
    problem, tmp_path, defect, named
):
    """A store whose manifest cannot be read is left to the store to report (not replaced, not read as an
    export's), with how an export gets past it: export elsewhere or delete it."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _interrupted_at_the_first_batch(model, checkpoints, data, path)
    damaged = defect(json.loads((path / "manifest.json").read_text()))
    (path / "manifest.json").write_text(damaged)
    with pytest.raises(ValueError, match=named) as err:
        _export(model, checkpoints, data, good_loss, path)
    assert str(err.value).endswith("; export into another directory, or delete this one")
    assert (path / "manifest.json").read_text() == damaged


def test_a_store_from_before_preconditioners_run_again_with_adam_says_it_holds_plain_gradients(problem, tmp_path):
    """A finished store whose metadata records no "preconditioner" (written before preconditioners existed) run
    again with preconditioner="adam": it holds plain gradients and cannot be resumed with Adam's; the message
    says so and to export elsewhere, not that "the optimizer states differ" (r342 M14)."""
    model, checkpoints, data = problem
    path = tmp_path / "s"
    _export(model, checkpoints, data, good_loss, path)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["metadata"]["preconditioner"]
    manifest.write_text(json.dumps(doc))
    adam = []
    for state, lr in checkpoints:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.load_state_dict(state)
        model(data[0]).sum().backward()
        optimizer.step()
        adam.append((state, lr, optimizer.state_dict()))
    with pytest.raises(ValueError, match="holds plain gradients") as caught:
        _export(model, adam, data, good_loss, path, preconditioner="adam")
    message = str(caught.value)
    assert "preconditioner='adam'" in message and "export into another directory" in message, message
    assert "optimizer states" not in message, message
    assert GradientStore.open(path).complete
