"""The line a resumed store export prints counts every row already in the store, those written after a
missing row of their checkpoint too (range writers of a distributed export leave gaps), and says that those
are computed again (each checkpoint resumes at its first missing row); the bar still ends at its total. The
finished store's gradients are checked against float64 NumPy gradients of the same linear model."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tracin
from tracin._export.driver import store_rows

torch = pytest.importorskip("torch")


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    doubled = {k: 2 * v for k, v in model.state_dict().items()}
    return model, x, y, [(model.state_dict(), 0.1), (doubled, 0.05)]


def _run(store, progress):
    from tracin.torch import export_gradients

    model, x, y, checkpoints = _setup()

    def loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    return export_gradients(model, checkpoints, (x, y), loss, store=store, batch_size=4, progress=progress)


def _expected_self_influence() -> np.ndarray:
    """sum_c w_c |g_c|^2 of softmax cross-entropy on a linear layer, in float64 NumPy."""
    _, x, y, checkpoints = _setup()
    x, y = x.numpy().astype(np.float64), y.numpy()
    total = np.zeros(len(x))
    for state, lr in checkpoints:
        w, b = state["weight"].numpy().astype(np.float64), state["bias"].numpy().astype(np.float64)
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = p - np.eye(2)[y]  # dloss/dlogits
        total += lr * ((r**2).sum(1) * (x**2).sum(1) + (r**2).sum(1))
    return total


def _written(store, *ranges) -> None:
    with store_rows(0, 0):  # creates the store, computing nothing
        _run(store, False)
    for a, b in ranges:
        with store_rows(a, b):
            _run(store, False)


@pytest.mark.parametrize(
    ("ranges", "said"),
    [
        # rows [0, 4) and [8, 10) of both checkpoints: 12 of 20 in it, [4, 10) of each computed (4 again)
        (
            [(0, 4), (8, 10)],
            "12 of 20 rows already in it (10 examples x 2 checkpoints); computing 12: the 8 missing and the 4 "
            "written after a missing row of their checkpoint",
        ),
        # rows [4, 10) only: 12 of 20 in it, every row computed (12 again); it said nothing at all
        (
            [(4, 10)],
            "12 of 20 rows already in it (10 examples x 2 checkpoints); computing 20: the 8 missing and the 12 "
            "written after a missing row of their checkpoint",
        ),
    ],
)
def test_the_resume_line_counts_rows_written_after_a_gap(ranges, said, tmp_path, capfd):
    _written(tmp_path / "g", *ranges)
    capfd.readouterr()
    store = _run(tmp_path / "g", True)
    err = capfd.readouterr().err
    line = f"tracin.torch export: resuming gradient store {tmp_path / 'g'}: {said}"
    assert err.count(line) == 1, err
    frames = [f for f in re.split(r"[\r\n]", err) if f.startswith("tracin.torch export checkpoint")]
    assert frames and re.search(r"checkpoint 2/2: 100%.* 10/10 ", frames[-1]), frames[-1:]
    assert not any("11/10" in f for f in frames)
    assert store.complete
    np.testing.assert_allclose(tracin.self_influence(store), _expected_self_influence(), rtol=1e-5)


def test_rows_in_order_keep_the_plain_resume_line(tmp_path, capfd):
    """No gap (rows [0, 6) of both checkpoints): the line as before, 'computing the other'."""
    _written(tmp_path / "g", (0, 6))
    capfd.readouterr()
    _run(tmp_path / "g", True)
    err = capfd.readouterr().err
    assert "resuming gradient store" in err and "12 of 20 rows already in it" in err
    assert "(10 examples x 2 checkpoints); computing the other 8" in err
    assert "written after a missing row" not in err
