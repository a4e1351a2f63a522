"""An interrupted distributed export on Dask's default client (client=None, a client of the user's as
current) tells that its tasks already running go on, as with client= given: the default client's
cluster is not closed by the call, so its tasks are not stopped (r385 hand mutant E25: only client=
given counted as the user's cluster, and the note was left out)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tracin.distributed as td  # noqa: E402

from .test_export import _setup, one_torch_thread  # noqa: E402, F401 (an autouse fixture)


def test_the_default_clients_running_tasks_are_said_to_go_on(client, tmp_path, monkeypatch):
    def interrupted(job, parts, progress):
        assert job.client is client  # the default client, no LocalCluster of the call's own
        job.client.cancel(job.futures)
        raise KeyboardInterrupt

    monkeypatch.setattr(td._export.Job, "wait", interrupted)
    model, checkpoints, data, loss = _setup(20, 4)
    with client.as_current(), pytest.raises(KeyboardInterrupt) as e:
        td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s")
    notes = "".join(getattr(e.value, "__notes__", []))
    assert "tasks already running on the workers go on until their rows are written" in notes
    assert notes.endswith("before calling again to resume, or call client.restart()")
