"""tracin.distributed.top_k / aggregate of two stores whose checkpoints were given as files on one side and in
memory on the other: the warning that they cannot be compared comes once, on the client at the user's line, not
once more relayed from the shards (their tasks run in scoring.pair_warnings_told())."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
import tracin.distributed as td

WEIGHTS = [0.5, 2.0]


def _store(path, rng, n, sources):
    metadata = {"framework": "torch", "fingerprints": {"checkpoints": ["a", "b"]}, "checkpoint_sources": sources}
    w = tracin.GradientStore.create(path, n, [5, 3], WEIGHTS, metadata=metadata)
    for c, d in enumerate((5, 3)):
        w.write(c, 0, rng.standard_normal((n, d)).astype(np.float32))
    w.finalize()
    return tracin.GradientStore.open(path)


@pytest.mark.parametrize("call", ["top_k", "aggregate"])
def test_checkpoints_given_differently_warn_once_on_the_client(client, tmp_path, rng, call):
    test = _store(tmp_path / "test", rng, 6, ["file", "file"])
    train = _store(tmp_path / "train", rng, 40, ["state", "state"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if call == "top_k":
            td.top_k(test, train, k=3, client=client, shards=4, progress=False)
        else:
            td.aggregate(test, train, client=client, shards=4, progress=False)
    found = [str(r.message) for r in record if "cannot check that both sides" in str(r.message)]
    assert len(found) == 1, found
    assert found[0].startswith("checkpoints [0, 1] were given as a file or folder path for test and in memory"), found
    assert [r.filename for r in record if "cannot check" in str(r.message)] == [__file__]
