"""The progress bar over shards, and the LocalCluster started when no client is given."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tracin
import tracin.distributed as td


def test_bar_over_shards(client, tied, capsys):
    td.top_k(tied["test"], tied["store"], 3, client=client, shards=6, progress=True)
    err = capsys.readouterr().err
    assert "tracin.distributed top_k (proponents)" in err and re.search(r"100%.* 6/6 .*shard", err)
    td.top_k(tied["test"], tied["store"], 3, client=client, shards=6, progress=False)
    td.top_k(tied["test"], tied["store"], 3, client=client, shards=6)  # None: seconds of work only
    assert "tracin.distributed top_k" not in capsys.readouterr().err  # (Dask's own log lines may be there)


def test_default_client_is_used(client, tied, capsys):
    with client.as_current():
        found = td.self_influence(tied["store"], shards=3)
    np.testing.assert_array_equal(found, tracin.self_influence(tied["store"]))
    assert "LocalCluster" not in capsys.readouterr().err


def test_local_cluster_started_on_loopback(tied, capsys):
    found = td.self_influence(tied["store"], shards=3)
    np.testing.assert_array_equal(found, tracin.self_influence(tied["store"]))
    err = capsys.readouterr().err
    assert "tracin.distributed: LocalCluster of" in err and "dashboard http://127.0.0.1:" in err


def test_export_bar_counts_one_range_per_worker_thread(client, tmp_path, capsys):
    """Each range reads all the data (once per checkpoint): the default is one per worker thread."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    data = (torch.randn(30, 4), torch.randint(0, 3, (30,)))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    td.export_gradients("torch", model, checkpoints, data, loss, store=tmp_path / "s", client=client, progress=True)
    assert re.search(r"100%.* 2/2 .*shard", capsys.readouterr().err)  # 2 worker threads
    one = (data[0][:1], data[1][:1])
    td.export_gradients("torch", model, checkpoints, one, loss, store=tmp_path / "one", client=client, progress=True)
    assert re.search(r"100%.* 1/1 .*shard", capsys.readouterr().err)  # at most one per row
