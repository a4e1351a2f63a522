"""A task chained after a shard's task (Job.then: the aggregate's links over test shards) is named in
errors as that shard, as the shard's own task is: a cancelled link names the shard's rows, not a task key."""

from __future__ import annotations

import operator
import time

import pytest

import tracin.distributed as td
from tracin.distributed._run import Job


def _slowly(x: int) -> int:
    time.sleep(5)
    return x


def test_a_cancelled_link_names_the_shard_it_follows(client):
    job = Job(client, "aggregate")
    part = job.submit(operator.add, 1, 1, label="rows [0, 3) of /some/store")
    link = job.then(_slowly, part)
    client.cancel([link])
    with pytest.raises(td.TaskFailedError) as e:
        job.wait([link], progress=False)
    assert str(e.value) == (
        "tracin.distributed aggregate: the task on rows [0, 3) of /some/store was cancelled on the cluster "
        "(client.restart(), or its data lost with a worker?); call again"
    )
