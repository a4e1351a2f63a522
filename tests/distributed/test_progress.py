"""The progress bar over shards, and the LocalCluster started when no client is given."""

from __future__ import annotations

import re

import numpy as np

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
