"""A task cancelled while its client is still closing (Client.close sets status "closing" before it
cancels the client's futures) is named as one of a closed client, not of a lost scheduler."""

from __future__ import annotations

import pytest

from tracin.distributed._run import Job


class _Client:
    scheduler = type("Rpc", (), {"address": "tcp://10.0.0.9:8786"})()

    def __init__(self, status: str):
        self.status = status


@pytest.mark.parametrize("status", ["closing", "closed"])
def test_a_task_cancelled_while_the_client_closes_names_the_close(status):
    job = Job(_Client(status), "self_influence")
    job.labels["k-0"] = "rows [0, 4) of /some/store"
    assert str(job._cancelled("k-0")) == (
        "tracin.distributed self_influence: the task on rows [0, 4) of /some/store was cancelled because the "
        "client of the scheduler at tcp://10.0.0.9:8786 was closed during the call (client.close(), or it lost "
        "the scheduler and gave up reconnecting); call again with a running client"
    )


def test_a_task_cancelled_on_a_running_client_names_the_cluster():
    job = Job(_Client("running"), "self_influence")
    assert str(job._cancelled(None)) == (
        "tracin.distributed self_influence: the task on one of its shards was cancelled on the cluster "
        "(client.restart(), or its data lost with a worker?); call again"
    )
