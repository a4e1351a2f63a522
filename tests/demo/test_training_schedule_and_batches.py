"""training.py's schedule and batch order, against hand-worked values: the rate drops 10x from the
first epoch at or after decay_at * epochs; each epoch visits every row once, in a new order
(r369 mutants T1, T3, T7)."""

from __future__ import annotations

import numpy as np
import pytest

from tracin.demo.training import TrainingConfig, batches, sgd_momentum


def test_the_rate_drops_at_the_decay_epoch_not_one_later():
    config = TrainingConfig(epochs=10, decay_at=0.5, learning_rate=0.1, checkpoints=1)
    rates = [config.learning_rate_at(e) for e in range(10)]
    assert rates == pytest.approx([0.1] * 5 + [0.01] * 5)
    default = TrainingConfig()  # 150 epochs, decay after 60%: epochs 0..89 at 0.1, 90.. at 0.01
    assert default.learning_rate_at(89) == pytest.approx(0.1)
    assert default.learning_rate_at(90) == pytest.approx(0.01)
    assert TrainingConfig(epochs=4, decay_at=0.0, checkpoints=1).learning_rate_at(0) == pytest.approx(0.01)
    assert TrainingConfig(epochs=4, decay_at=1.0, checkpoints=1).learning_rate_at(3) == pytest.approx(0.1)


def test_every_epoch_visits_each_row_once_in_batches_of_the_size_asked():
    config = TrainingConfig(epochs=3, batch_size=64, checkpoints=1)
    epochs = list(batches(config, 150))
    assert [e for e, _ in epochs] == [0, 1, 2]
    for _, rows in epochs:
        assert [len(b) for b in rows] == [64, 64, 22]  # the last, partial batch included
        np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(150))


def test_the_order_is_reshuffled_every_epoch_and_follows_the_seed():
    orders = [np.concatenate(rows) for _, rows in batches(TrainingConfig(epochs=3, checkpoints=1, seed=4), 100)]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    again = [np.concatenate(rows) for _, rows in batches(TrainingConfig(epochs=3, checkpoints=1, seed=4), 100)]
    for a, b in zip(orders, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sgd_momentum_takes_two_hand_worked_steps():
    # torch.optim.SGD's rule: v = m * v + g, p = p - lr * v; lr 0.5, m 0.9, g 2 then 1, from p 1, v 0
    p, v = {"w": np.array([1.0])}, {"w": np.array([0.0])}
    p, v = sgd_momentum(p, v, {"w": np.array([2.0])}, 0.5, 0.9)
    assert (p["w"][0], v["w"][0]) == pytest.approx((0.0, 2.0))
    p, v = sgd_momentum(p, v, {"w": np.array([1.0])}, 0.5, 0.9)
    assert (p["w"][0], v["w"][0]) == pytest.approx((-1.4, 2.8))


@pytest.mark.parametrize(
    ("decay_at", "epochs", "full"), [(0.28, 25, 7), (0.56, 50, 28), (0.07, 100, 7), (0.6, 150, 90)]
)
def test_the_decay_epoch_is_the_fraction_asked_not_its_float_rounding(decay_at, epochs, full):
    """0.28 * 25 is 7.000000000000001 in float arithmetic: the rate held for an 8th epoch. The rate drops
    after decay_at of the epochs as the decimal fraction given: 7 of 25 (hand-worked: 28/100 * 25 = 7)."""
    config = TrainingConfig(epochs=epochs, decay_at=decay_at, checkpoints=1)
    rates = [config.learning_rate_at(e) for e in range(epochs)]
    assert rates == pytest.approx([0.1] * full + [0.01] * (epochs - full))
