"""tracin.distributed.top_k / aggregate with a whitened in-memory test side whose whitening was fitted on another
store than the train store: one warning on the client at the user's line, not one more relayed from the shards."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
import tracin.distributed as td

from .conftest import write_store

WEIGHTS = [0.5, 2.0]


# the client warns once (tracin.scoring._pair); the shards' tasks and _full_aggregate's second _pair run in
# scoring.pair_warnings_told()
@pytest.mark.parametrize("call", ["top_k", "aggregate"])
def test_a_whitening_fitted_elsewhere_warns_once_on_the_client(client, tmp_path, rng, call):
    blocks = {
        name: [rng.standard_normal((n, d)).astype(np.float32) for d in (5, 3)] for name, n in (("a", 6), ("b", 40))
    }
    test = write_store(tmp_path / "test", blocks["a"], WEIGHTS)
    train = write_store(tmp_path / "train", blocks["b"], WEIGHTS)
    whitened = tracin.Whitening.fit(test, damping=0.1, progress=False).apply(test, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if call == "top_k":
            td.top_k(whitened, train, k=3, client=client, shards=4, progress=False)
        else:
            td.aggregate(whitened, train, client=client, shards=4, progress=False)
    found = [r for r in record if "whitening was fitted on another gradient store" in str(r.message)]
    assert len(found) == 1, [str(f.message) for f in found]
    assert found[0].filename == __file__
    assert not str(found[0].message).startswith("tracin.distributed")
    assert f"(id {test.store_id})" in str(found[0].message) and f"(id {train.store_id})" in str(found[0].message)
