"""client= given a cluster object (a natural first try: LocalCluster(...) or SLURMCluster(...)): the
TypeError says what to pass instead, refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import LocalCluster

import tracin
import tracin.distributed as td


def test_a_cluster_object_is_refused_naming_a_client_of_it(tmp_path):
    store = tracin.GradientStore.create(tmp_path / "s", 2, [3], [1.0])
    store.write(0, 0, np.ones((2, 3), np.float32))
    train = store.finalize()
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as cluster:
        with pytest.raises(TypeError) as e:
            td.self_influence(train, client=cluster, progress=False)
    assert str(e.value) == (
        "client must be a distributed.Client or None, got LocalCluster (a cluster object): "
        "pass distributed.Client(cluster), a client of that cluster"
    )


@pytest.mark.parametrize("bad", [3])
def test_other_objects_keep_the_plain_message(tied, bad):
    with pytest.raises(TypeError) as e:
        td.aggregate(tied["test"], tied["store"], client=bad, progress=False)
    assert str(e.value) == f"client must be a distributed.Client or None, got {type(bad).__name__}"


def test_a_scheduler_address_is_refused_naming_the_client_to_make(tied):
    with pytest.raises(TypeError) as e:
        td.top_k(tied["test"], tied["store"], client="tcp://127.0.0.1:8786", progress=False)
    assert str(e.value) == (
        "client must be a distributed.Client or None, got str ('tcp://127.0.0.1:8786'): "
        "pass distributed.Client('tcp://127.0.0.1:8786') to use the scheduler at that address"
    )


def test_client_local_is_told_to_leave_client_none(tied):
    """'local' (the CLI's --scheduler local) is no address: distributed.Client('local') would fail too."""
    with pytest.raises(TypeError) as e:
        td.top_k(tied["test"], tied["store"], client="local", progress=False)
    assert str(e.value) == (
        "client must be a distributed.Client or None, got str ('local'): "
        "leave client=None to run on a LocalCluster made for the call (or the default client)"
    )


class _Unstarted:
    """A cluster-like object whose scheduler_address raises something other than AttributeError."""

    def scale(self, n: int) -> None:
        pass

    @property
    def scheduler_address(self) -> str:
        raise RuntimeError("cluster not started")


def test_an_object_whose_properties_raise_still_gets_the_type_error(tied):
    with pytest.raises(TypeError) as e:
        td.aggregate(tied["test"], tied["store"], client=_Unstarted(), progress=False)
    assert str(e.value) == "client must be a distributed.Client or None, got _Unstarted"
