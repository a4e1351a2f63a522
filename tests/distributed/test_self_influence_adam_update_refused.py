"""tracin.distributed.self_influence refuses preconditioner='adam_update' rows on the client, in the
words of tracin.self_influence, before any cluster is used (r385 hand mutant M12: without the client's
check every task would raise it on its worker, after a LocalCluster was started for the call)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
import tracin.distributed as td


def test_adam_update_rows_are_refused_before_any_cluster(tmp_path, monkeypatch):
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    writer = tracin.GradientStore.create(
        tmp_path / "s", 4, [3], [1.0], metadata={"preconditioner": {"kind": "adam_update"}}
    )
    writer.write(0, 0, rows)
    writer.finalize()
    store = tracin.GradientStore.open(tmp_path / "s")

    def no_cluster(client):
        raise AssertionError("a cluster was used for adam_update rows")

    monkeypatch.setattr(td._api, "client_for", no_cluster)
    with pytest.raises(ValueError, match="preconditioner='adam_update'") as one_machine:
        tracin.self_influence(store)
    with pytest.raises(ValueError, match="no self-influence") as cluster:
        td.self_influence(store)
    assert str(cluster.value) == str(one_machine.value)
