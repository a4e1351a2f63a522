"""While a tracin.distributed export's tasks run, its store (recording no rows until a task's first batch) is
held: another export of other inputs into the same path is refused instead of making the store again under them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("distributed")
torch = pytest.importorskip("torch")

import tracin.distributed as td  # noqa: E402
import tracin.torch  # noqa: E402
from tracin.distributed import _export  # noqa: E402


def _loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _other_loss(outputs, targets):
    return 2.0 * torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


KW = {"batch_size": 10, "progress": False}


@pytest.fixture
def problem():
    """A Linear(6, 3) model, one checkpoint of it and 30 rows of data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    return model, checkpoints, (torch.randn(30, 6), torch.randint(0, 3, (30,)))


def test_another_export_cannot_remake_the_store_while_tasks_run(client, problem, tmp_path, monkeypatch):
    model, checkpoints, data = problem
    store = tmp_path / "s"
    write_ranges = _export._write_ranges
    refused = []

    def other_export_first(*args, **kwargs):  # before any task takes its range: the store records no rows
        with pytest.raises(RuntimeError, match="is being written by"):
            tracin.torch.export_gradients(model, checkpoints, data, _other_loss, store=store, **KW)
        refused.append(True)
        return write_ranges(*args, **kwargs)

    monkeypatch.setattr(_export, "_write_ranges", other_export_first)
    found = td.export_gradients("torch", model, checkpoints, data, _loss, store=store, client=client, **KW)
    expected = tracin.torch.export_gradients(model, checkpoints, data, _loss, store=tmp_path / "one", **KW)
    assert refused == [True]
    assert found.complete
    name = "checkpoint_000.npy"
    assert (Path(found.path) / name).read_bytes() == (Path(expected.path) / name).read_bytes()
    assert found.metadata == expected.metadata


def test_a_store_made_again_before_the_lock_is_taken_is_refused(client, problem, tmp_path, monkeypatch):
    """Between the client's create step and its shared lock another export of other inputs makes the empty
    store again (and finishes it): the call refuses it, naming both store ids, rather than writing into it
    or returning that export's store."""
    model, checkpoints, data = problem
    store = tmp_path / "s"
    lock = _export.DirectoryLock

    def other_export_then_lock(*args, **kwargs):
        tracin.torch.export_gradients(model, checkpoints, data, _other_loss, store=store, **KW)
        return lock(*args, **kwargs)

    monkeypatch.setattr(_export, "DirectoryLock", other_export_then_lock)
    with pytest.raises(RuntimeError, match=r"was made again by another export \(store id \S+, now \S+\)"):
        td.export_gradients("torch", model, checkpoints, data, _loss, store=store, client=client, **KW)
