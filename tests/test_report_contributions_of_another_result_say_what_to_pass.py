"""checkpoint_contributions given a result that does not fit its test rows (made from another test set, or
with test and train passed the other way round) says how many test rows the result holds and what to
pass, not only that its integer indices "must be integer"."""

import numpy as np
import pytest

import tracin
from tracin.report import checkpoint_contributions


def _sides(rng: np.random.Generator) -> tuple[tracin.Gradients, tracin.Gradients]:
    train = tracin.Gradients([rng.standard_normal((20, 6), dtype=np.float32)], weights=[0.1])
    test = tracin.Gradients([rng.standard_normal((3, 6), dtype=np.float32)])
    return test, train


def test_a_result_of_another_test_set_names_its_rows_and_what_to_pass() -> None:
    test, train = _sides(np.random.default_rng(0))
    other = tracin.Gradients([np.random.default_rng(1).standard_normal((5, 6), dtype=np.float32)])
    result = tracin.top_k(other, train, k=2)
    with pytest.raises(ValueError) as e:
        checkpoint_contributions(test, train, result)
    message = str(e.value)
    assert "with m = 3 test rows" in message
    assert "result holds 5 test rows" in message
    assert "pass the test and train gradients top_k made it from" in message
    assert "swapped" not in message


def test_test_and_train_passed_the_other_way_round_are_named() -> None:
    test, train = _sides(np.random.default_rng(2))
    result = tracin.top_k(test, train, k=2)
    with pytest.raises(ValueError) as e:
        checkpoint_contributions(train, test, result)
    assert "test and train the other way round?" in str(e.value)
    # the same call the right way round works, and its parts sum to the scores
    parts = checkpoint_contributions(test, train, result)
    np.testing.assert_allclose(parts.sum(2), result.values, rtol=1e-5)


def test_indices_of_a_wrong_type_keep_the_plain_message() -> None:
    test, train = _sides(np.random.default_rng(3))
    result = tracin.top_k(test, train, k=2)
    with pytest.raises(ValueError, match=r"must be integer \(m, k\) with m = 3 test rows, got float64 \(3, 2\)$"):
        checkpoint_contributions(test, train, result._replace(indices=result.indices.astype(np.float64)))


def test_indices_without_two_dimensions_keep_the_plain_message() -> None:
    test, train = _sides(np.random.default_rng(4))
    result = tracin.top_k(test, train, k=2)
    with pytest.raises(ValueError, match=r"must be integer \(m, k\) with m = 3 test rows, got int64 \(\)$"):
        checkpoint_contributions(test, train, result._replace(indices=np.int64(1)))
