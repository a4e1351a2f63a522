"""Checkpoint lists and learning rates, validated the same way for both adapters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tracin._export.checkpoints import learning_rate, parse_checkpoints


@pytest.mark.parametrize("lr", ["0.1", True, False, None, 1j, [0.1]])
def test_learning_rates_must_be_real_numbers_not_bools_or_strings(lr):
    with pytest.raises(TypeError, match=r"checkpoints\[0\]\[1\] \(learning rate\) must be a real number"):
        parse_checkpoints([("a", lr)], "params")


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), np.float32("-inf")])
def test_learning_rates_must_be_finite(lr):
    with pytest.raises(ValueError, match="must be finite"):
        learning_rate(lr, "lr")


@pytest.mark.parametrize("lr", [-1.0, -1e-12, np.int64(-2), np.array(-0.5)])
def test_negative_learning_rates_are_refused_naming_the_entry_and_value(lr):
    with pytest.raises(ValueError, match=r"checkpoints\[1\]\[1\] \(learning rate\) must not be negative, got -"):
        parse_checkpoints([("a", 0.1), ("b", lr)], "params")


def test_a_zero_learning_rate_warns_once_per_checkpoint_that_it_adds_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse_checkpoints([("a", 0.0), ("b", 0.5), ("c", np.float32(-0.0)), ("d", 0)], "params")
    messages = [str(w.message) for w in caught]
    assert [entry.lr for entry in parsed] == [0.0, 0.5, 0.0, 0.0]
    assert len(messages) == 3 and all(issubclass(w.category, UserWarning) for w in caught)
    for i, message in zip((0, 2, 3), messages, strict=True):
        assert message.startswith(f"checkpoints[{i}][1] (learning rate) is 0") and "add nothing to any score" in message


def test_numpy_and_integer_rates_become_floats():
    parsed = parse_checkpoints([("a", np.float32(0.5)), ("b", 2), ("c", np.int64(3))], "params")
    assert parsed == [("a", 0.5, None), ("b", 2.0, None), ("c", 3.0, None)]
    assert all(type(entry.lr) is float for entry in parsed)


def test_a_third_item_is_the_optimizer_state_wrapped_by_the_adapter():
    parsed = parse_checkpoints(
        [("a", 1.0, {"m": 1}), ("b", 2.0), ("c", 3.0, None)], "params", optimizer=lambda state, i: (i, state)
    )
    assert [entry.optimizer for entry in parsed] == [(0, {"m": 1}), None, None]
    with pytest.raises(
        TypeError,
        match=r"checkpoints\[0\] must be a \(params, learning_rate\) pair or a "
        r"\(params, learning_rate, optimizer_state\) triple, got a tuple of length 4",
    ):
        parse_checkpoints([("a", 1.0, {}, 0)], "params")


def test_sources_are_checked_by_the_adapter_rule():
    with pytest.raises(TypeError, match=r"checkpoints\[1\]\[0\] must be a path"):
        parse_checkpoints([("a", 1.0), (3, 1.0)], "path", accepts=lambda s: isinstance(s, str))
    with pytest.raises(TypeError, match="sequence of"):
        parse_checkpoints({"a": 1.0}, "path")
    with pytest.raises(ValueError, match="empty"):
        parse_checkpoints([], "path")


def test_an_optimizer_state_in_the_learning_rates_place_is_named_as_the_learning_rate():
    """review212 F2: (params, state, lr) was read state first and blamed checkpoints[0][2], the float,
    for holding no optimizer state; the rate is read first and its message shows its type, cut short."""

    def optimizer(state, i):
        raise AssertionError("the state is read after the learning rate")

    state = ({"mu": list(range(1000))},)
    message = r"^checkpoints\[0\]\[1\] \(learning rate\) must be a real number, got tuple "
    with pytest.raises(TypeError, match=message) as e:
        parse_checkpoints([("a", state, 0.1)], "params", optimizer=optimizer)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    "one_pair",
    [({"w": 1}, 0.1), ("ckpt.pt", np.float32(0.1), {"m": 1}), ["a", 2], ({"w": 1}, np.array(0.1))],
)
def test_one_pair_given_for_the_list_of_pairs_is_named_as_such(one_pair):
    """review274 F2: export(loss, (params, lr), data) blamed checkpoints[0], the params, for not being a
    pair; the message says the value looks like one pair and asks for a list of them."""
    with pytest.raises(TypeError, match=r"looks like one pair itself.*pass a list of them") as caught:
        parse_checkpoints(one_pair, "params")
    assert "checkpoints[0]" not in str(caught.value)
    assert len(parse_checkpoints([one_pair], "params")) == 1


def test_one_pair_with_a_0d_tensor_rate_is_named_as_such_too():
    """review294 F4: learning_rate() takes a 0-d tensor, the one-pair check did not see one."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"looks like one pair itself"):
        parse_checkpoints(({"w": 1}, torch.tensor(0.1)), "params")


def test_a_learning_rate_schedule_is_told_to_pass_its_value_at_the_step():
    def schedule(step):
        return 0.1 * 0.5**step

    with pytest.raises(TypeError, match=r"checkpoints\[2\] \(learning rate\)") as caught:
        learning_rate(schedule, "checkpoints[2]")
    assert "float(schedule(step))" in str(caught.value), caught.value


def test_a_rate_that_is_no_number_and_no_callable_gets_no_schedule_hint():
    with pytest.raises(TypeError, match="must be a real number") as caught:
        learning_rate("0.1", "checkpoints[0]")
    assert "schedule" not in str(caught.value), caught.value
