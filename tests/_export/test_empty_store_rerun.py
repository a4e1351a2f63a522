"""An export that fails at its first batch (a mean-reduced loss, a bug in the model's forward) leaves a
store that records no rows: the fixed export makes it again and finishes it, equal to a fresh export
and to float64 per-example gradients. A store that records a row, a range writer's progress holding
rows, a store held by another writer, a range writer (tracin.distributed's tasks) and a store not
written by an export are never replaced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from drifted_states import drifted_states
from tracin._export.driver import store_rows
from tracin.store import GradientStore
from tracin.store._locks import DirectoryLock
from tracin.torch import export_gradients

N_ROWS = 11


def good_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def mean_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets)


def other_loss(outputs, targets):
    return 2.0 * nn.functional.cross_entropy(outputs, targets, reduction="none")


def _net(bug: bool) -> nn.Module:
    """A Linear(4, 3) in a custom module whose forward (the same qualname either way) has a shape bug or not."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        if bug:

            def forward(self, x):
                return self.fc(x.T)

        else:

            def forward(self, x):
                return self.fc(x)

    torch.manual_seed(0)
    return Net()


@pytest.fixture
def problem():
    torch.manual_seed(1)
    model = _net(bug=False)
    states = drifted_states(model, 2)
    return [(states[0], 0.5), (states[1], 0.25)], (torch.randn(N_ROWS, 4), torch.randint(0, 3, (N_ROWS,)))


def _written(path: Path) -> list:
    return [c["written"] for c in json.loads((path / "manifest.json").read_text())["checkpoints"]]


def _reference(checkpoints, data) -> list[np.ndarray]:
    """Per checkpoint the float64 per-example gradients of good_loss, (N_ROWS, 15): weight then bias."""
    x, y = (t.double() for t in data)
    rows = []
    for state, _ in checkpoints:
        w, b = (state[k].double().requires_grad_() for k in ("fc.weight", "fc.bias"))
        per = []
        for i in range(N_ROWS):
            loss = nn.functional.cross_entropy((x[i] @ w.T + b)[None], y[i : i + 1].long())
            gw, gb = torch.autograd.grad(loss, (w, b))
            per.append(torch.cat([gw.reshape(-1), gb]).numpy())
        rows.append(np.stack(per))
    return rows


def _export(model, checkpoints, data, loss, path, **kwargs):
    return export_gradients(model, checkpoints, data, loss, store=path, batch_size=4, progress=False, **kwargs)


def _check_finished(path: Path, fresh: Path, checkpoints, data) -> None:
    """The store at `path` is finished, byte for byte a fresh export's data and metadata, and close to float64."""
    assert GradientStore.open(path).complete
    for c, ref in enumerate(_reference(checkpoints, data)):
        name = f"checkpoint_{c:03d}.npy"
        assert (path / name).read_bytes() == (fresh / name).read_bytes()
        np.testing.assert_allclose(np.load(path / name), ref, rtol=1e-5, atol=1e-6)
    assert GradientStore.open(path).metadata == GradientStore.open(fresh).metadata


def test_mean_reduced_loss_then_fixed_loss(problem, tmp_path):
    checkpoints, data = problem
    with pytest.raises(ValueError, match="reduction='none'"):
        _export(_net(bug=False), checkpoints, data, mean_loss, tmp_path / "s")
    assert _written(tmp_path / "s") == [[], []]  # the store is left, recording no rows
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "s")
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "fresh")
    _check_finished(tmp_path / "s", tmp_path / "fresh", checkpoints, data)


def test_an_empty_store_holding_the_users_own_file_is_refused_not_replaced(problem, tmp_path):
    """A file of the user's in the store's folder: the export's own refusal (other inputs), not the store's
    "remove those to replace the store", and nothing replaced (review123 F3)."""
    checkpoints, data = problem
    with pytest.raises(ValueError, match="reduction='none'"):
        _export(_net(bug=False), checkpoints, data, mean_loss, tmp_path / "s")
    (tmp_path / "s" / "NOTES.txt").write_text("mine")
    store_id = GradientStore.open(tmp_path / "s", allow_partial=True).store_id
    with pytest.raises(ValueError, match="other inputs") as err:
        _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "s")
    assert "remove those" not in str(err.value)
    assert GradientStore.open(tmp_path / "s", allow_partial=True).store_id == store_id
    assert (tmp_path / "s" / "NOTES.txt").read_text() == "mine"


def test_forward_bug_then_fixed_forward(problem, tmp_path):
    checkpoints, data = problem
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _export(_net(bug=True), checkpoints, data, good_loss, tmp_path / "s")
    assert _written(tmp_path / "s") == [[], []]
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "s")
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "fresh")
    _check_finished(tmp_path / "s", tmp_path / "fresh", checkpoints, data)


def test_other_spec_and_dtype_replace_an_empty_store(problem, tmp_path):
    """Other rows (n_rows), columns (dims) and dtype than the failed export's: the store's own spec check
    would refuse them too, but nothing is recorded."""
    checkpoints, data = problem
    with pytest.raises(ValueError, match="reduction='none'"):
        _export(_net(bug=False), checkpoints, (data[0][:7], data[1][:7]), mean_loss, tmp_path / "s", dtype="float16")
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "s")
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "fresh")
    _check_finished(tmp_path / "s", tmp_path / "fresh", checkpoints, data)


def test_a_recorded_row_is_never_replaced(problem, tmp_path):
    checkpoints, data = problem
    path = tmp_path / "s"

    def interrupted(outputs, targets):  # Ctrl-C once the first row is recorded
        if (path / "manifest.json").exists() and any(_written(path)):
            raise KeyboardInterrupt
        return good_loss(outputs, targets)

    with pytest.raises(KeyboardInterrupt):
        export_gradients(_net(bug=False), checkpoints, data, interrupted, store=path, batch_size=1, progress=False)
    recorded = _written(path)
    assert recorded == [[[0, 1]], []]
    kept = (path / "checkpoint_000.npy").read_bytes()
    with pytest.raises(ValueError, match="other inputs: .*the loss function differs") as err:
        _export(_net(bug=False), checkpoints, data, other_loss, path)
    assert "delete this one" in str(err.value) and "no rows yet" not in str(err.value)
    assert _written(path) == recorded and (path / "checkpoint_000.npy").read_bytes() == kept


def test_a_range_writers_rows_are_never_replaced(problem, tmp_path):
    """The manifest records no row, a range writer's progress file does: refused, nothing removed."""
    checkpoints, data = problem
    path = tmp_path / "s"
    with store_rows(0, 0):
        _export(_net(bug=False), checkpoints, data, good_loss, path)
    with store_rows(0, 4):
        _export(_net(bug=False), checkpoints, data, good_loss, path)
    assert _written(path) == [[], []] and (path / "rows-0-4.json").exists()
    with pytest.raises(ValueError, match="the loss function differs") as err:
        _export(_net(bug=False), checkpoints, data, other_loss, path)
    assert "no rows yet" not in str(err.value)
    assert (path / "rows-0-4.json").exists()
    _export(_net(bug=False), checkpoints, data, good_loss, path)  # merges the range's rows and finishes it
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "fresh")
    _check_finished(path, tmp_path / "fresh", checkpoints, data)


def test_a_range_writer_refuses_an_empty_store_saying_so(problem, tmp_path):
    """A range writer (a tracin.distributed task) never makes the store again: the other writers' store."""
    checkpoints, data = problem
    path = tmp_path / "s"
    with store_rows(0, 0):
        _export(_net(bug=False), checkpoints, data, good_loss, path)
    store_id = GradientStore.open(path, allow_partial=True).store_id
    with store_rows(0, 4), pytest.raises(ValueError, match="other inputs") as err:
        _export(_net(bug=False), checkpoints, data, other_loss, path)
    assert "Rows from both cannot be mixed; it holds no rows yet: unless an export is writing it now, delete it" in str(
        err.value
    )
    assert GradientStore.open(path, allow_partial=True).store_id == store_id


def test_distributed_flow_after_a_first_batch_failure(problem, tmp_path):
    """As tracin.distributed runs it: the client creates the store (store_rows(0, 0)), a task fails at its
    first batch; the fixed call's client makes the store again, its task and the final export finish it."""
    checkpoints, data = problem
    path = tmp_path / "s"
    with store_rows(0, 0):
        _export(_net(bug=True), checkpoints, data, good_loss, path)
    with store_rows(0, N_ROWS), pytest.raises(RuntimeError, match="cannot be multiplied"):
        _export(_net(bug=True), checkpoints, data, good_loss, path)
    for rows in ((0, 0), (0, N_ROWS)):
        with store_rows(*rows):
            _export(_net(bug=False), checkpoints, data, good_loss, path)
    _export(_net(bug=False), checkpoints, data, good_loss, path)
    _export(_net(bug=False), checkpoints, data, good_loss, tmp_path / "fresh")
    _check_finished(path, tmp_path / "fresh", checkpoints, data)


def test_an_empty_store_held_by_another_writer_is_left(problem, tmp_path):
    checkpoints, data = problem
    path = tmp_path / "s"
    with pytest.raises(ValueError, match="reduction='none'"):
        _export(_net(bug=False), checkpoints, data, mean_loss, path)
    before = (path / "manifest.json").read_bytes()
    lock = DirectoryLock(path)
    try:
        with pytest.raises(RuntimeError, match="is being written by another writer"):
            _export(_net(bug=False), checkpoints, data, good_loss, path)
    finally:
        lock.release()
    assert (path / "manifest.json").read_bytes() == before


def test_a_store_not_written_by_an_export_is_left(problem, tmp_path):
    """An empty store a user created (no fingerprints in its metadata) is not the export's to replace."""
    checkpoints, data = problem
    path = tmp_path / "s"
    GradientStore.create(path, N_ROWS, [15, 15], [0.5, 0.25], "float32", metadata={"mine": 1}).close()
    with pytest.raises(ValueError, match="different spec"):
        _export(_net(bug=False), checkpoints, data, good_loss, path)
    assert GradientStore.open(path, allow_partial=True).metadata == {"mine": 1}


def test_an_empty_store_with_ids_is_left(problem, tmp_path):
    """review309: a store holding the user's row ids (GradientStore.create(ids=...)) with an export's metadata and no
    rows is not an export's leftover: replacing it would drop the ids; the export refuses it instead."""
    checkpoints, data = problem
    with pytest.raises(ValueError, match="reduction='none'"):
        _export(_net(bug=False), checkpoints, data, mean_loss, tmp_path / "s")
    metadata = GradientStore.open(tmp_path / "s", allow_partial=True).metadata
    path, ids = tmp_path / "ids", [f"row{i}" for i in range(N_ROWS)]
    GradientStore.create(path, N_ROWS, [15, 15], [0.5, 0.25], "float32", metadata=metadata, ids=ids).close()
    store_id = GradientStore.open(path, allow_partial=True).store_id
    with pytest.raises(ValueError, match="other inputs: the loss function differs"):
        _export(_net(bug=False), checkpoints, data, good_loss, path)
    assert GradientStore.open(path, allow_partial=True).store_id == store_id
    assert json.loads((path / "manifest.json").read_text())["ids"]


def test_jax_mean_reduced_loss_then_fixed_loss(tmp_path):
    """tracin.jax shares the driver: the same rerun, against a fresh export and float64 gradients."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from tracin.jax import export_gradients as jax_export

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    x, y = rng.standard_normal((N_ROWS, 4)).astype(np.float32), rng.standard_normal((N_ROWS, 3)).astype(np.float32)

    def per_example(p, inputs, targets):
        return jnp.sum((inputs @ p["w"] + p["b"] - targets) ** 2, axis=-1)

    def mean(p, inputs, targets):
        return jnp.mean(per_example(p, inputs, targets))

    def run(loss, path):
        return jax_export(loss, [(params, 0.5)], (x, y), store=path, batch_size=4, progress=False)

    with pytest.raises(ValueError, match="per-example"):
        run(mean, tmp_path / "s")
    assert _written(tmp_path / "s") == [[]]
    run(per_example, tmp_path / "s")
    run(per_example, tmp_path / "fresh")
    assert GradientStore.open(tmp_path / "s").complete
    rows = np.load(tmp_path / "s" / "checkpoint_000.npy")
    assert rows.tobytes() == np.load(tmp_path / "fresh" / "checkpoint_000.npy").tobytes()
    residual = x.astype(np.float64) @ params["w"] + params["b"] - y  # d/dw = 2 x r^T, d/db = 2 r
    grads = {"w": 2 * x[:, :, None] * residual[:, None, :], "b": 2 * residual}
    names = [p["name"] for p in GradientStore.open(tmp_path / "s").metadata["params"]]
    ref = np.concatenate([grads[n].reshape(N_ROWS, -1) for n in names], axis=1)
    np.testing.assert_allclose(rows, ref, rtol=1e-5, atol=1e-5)
