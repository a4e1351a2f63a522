"""A whitened side scored against a train store other than the one its whitening was fitted on (say a
whitening fitted on the test store) warns at the user's line, naming both store ids; the refusals of rows that
do not match a whitening say what to do in Python."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin
from store.helpers import write_store

WEIGHTS = [0.5, 2.0]
DIMS = [5, 3]


def _rows(rng: np.random.Generator, n: int, dims=DIMS) -> list[np.ndarray]:
    return [rng.standard_normal((n, d)).astype(np.float32) for d in dims]


@pytest.fixture
def stores(tmp_path, rng):
    test = write_store(tmp_path / "test", _rows(rng, 6), WEIGHTS)
    train = write_store(tmp_path / "train", _rows(rng, 20), WEIGHTS)
    return test, train


def _warned(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [r for r in record if "fitted on another gradient store" in str(r.message)]


CALLS = {
    "top_k": lambda test, train: tracin.top_k(test, train, k=3),
    "scores": lambda test, train: tracin.scores(test, train),
    "aggregate": lambda test, train: tracin.aggregate(test, train),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_whitening_fitted_on_the_test_store_warns_once_at_the_users_line(stores, name):
    test, train = stores
    whitened = tracin.Whitening.fit(test, damping=0.1, progress=False).apply(test, progress=False)
    found = _warned(lambda: CALLS[name](whitened, train))
    assert len(found) == 1, [str(f.message) for f in found]
    (w,) = found
    assert w.category is UserWarning
    assert w.filename == __file__
    text = str(w.message)
    assert f"(id {test.store_id})" in text and f"(id {train.store_id})" in text
    assert str(train.path) in text
    assert "Whitening.fit(train)" in text and "unless that was meant (a subset or a copy re-exported)" in text


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_whitened_train_side_of_another_store_than_fitted_on_warns(stores, name):
    """Whitened train rows are W g_train only with W fitted on them: rows of another store (here the test store's)
    whitened by a whitening fitted on the train store warn, naming both ids (rows of the store fitted on do not:
    tests/test_whitened_train_rows_not_warned.py)."""
    test, train = stores
    whitened = tracin.Whitening.fit(train, damping=0.1, progress=False).apply(test, progress=False)
    found = _warned(lambda: CALLS[name](test, whitened))
    assert len(found) == 1
    assert str(found[0].message).startswith(
        f"the train side holds rows of a gradient store (id {test.store_id}) whitened by a whitening fitted on "
        f"another gradient store (id {train.store_id}); "
    )


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_whitening_fitted_on_the_train_store_or_in_memory_is_not_warned_about(stores, name):
    test, train = stores
    for fitted_on in (train, tracin.Gradients(_rows(np.random.default_rng(1), 20), WEIGHTS)):
        whitened = tracin.Whitening.fit(fitted_on, damping=0.1, progress=False).apply(test, progress=False)
        assert _warned(lambda w=whitened: CALLS[name](w, train)) == []
    # a shard of the store it was fitted on is the same store (a subset): nothing to warn of
    whitened = tracin.Whitening.fit(train, damping=0.1, progress=False).apply(test, progress=False)
    assert _warned(lambda: CALLS[name](whitened, train.shard(1, 2))) == []


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (lambda rng: _rows(rng, 4, [5, 2]), r"test dims \[5, 2\] differ from the whitening's dims \[5, 3\]"),
        (lambda rng: _rows(rng, 4, [5]), "test has 1 checkpoint but the whitening has 2 checkpoints"),
    ],
)
def test_rows_that_do_not_match_a_whitening_are_told_what_to_do_in_python(rng, rows, expected):
    whitening = tracin.Whitening.fit(tracin.Gradients(_rows(rng, 30), WEIGHTS), damping=0.1, progress=False)
    odd = tracin.Gradients(rows(rng))
    advice = "; apply a whitening fitted on gradients exported the same way: Whitening.fit(train)"
    with pytest.raises(ValueError, match=f"^{expected}{advice.replace('(', r'[(]').replace(')', r'[)]')}$"):
        whitening.apply(odd, progress=False)
    with pytest.raises(ValueError, match=expected.replace("test", "train", 1)) as e:
        whitening.self_influence(odd)
    assert str(e.value).endswith(advice)


@pytest.mark.parametrize("via", ["Whitening.self_influence", "tracin.self_influence"])
def test_whitened_self_influence_of_another_store_warns_at_the_users_line(stores, via):
    """self_influence(train, whitening=w) with w fitted on another store: the self-influence is whitened by that
    store's R, silently (the command line warned, Python did not); once, at the caller's line, naming both ids."""
    test, train = stores
    w = tracin.Whitening.fit(test, damping=0.1, progress=False)
    if via == "tracin.self_influence":
        found = _warned(lambda: tracin.self_influence(train, whitening=w, progress=False))
    else:
        found = _warned(lambda: w.self_influence(train, progress=False))
    assert len(found) == 1, [str(f.message) for f in found]
    assert found[0].filename == __file__
    text = str(found[0].message)
    assert f"(id {test.store_id}) than the train store {train.path} (id {train.store_id})" in text, text
    assert "Whitening.fit(train)" in text
    assert not _warned(lambda: tracin.Whitening.fit(train, damping=0.1, progress=False).self_influence(train))
