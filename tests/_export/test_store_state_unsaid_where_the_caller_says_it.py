"""Inside store_state_unsaid() an export does not say that its store is finished already or resumed: the caller
says what it does (tracin.distributed's client finalizing the store its range writers just filled, after its
own line "every row written ..."), so the user does not read two lines about one step, the second calling the
rows just written 'already' there. Outside, the line is said as before."""

from __future__ import annotations

import pytest

from tracin._export import driver

torch = pytest.importorskip("torch")


def _run(store, progress):
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))

    def loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    return export_gradients(model, [(model.state_dict(), 0.1)], (x, y), loss, store=store, progress=progress)


def test_a_finished_store_is_not_said_inside_store_state_unsaid(tmp_path, capfd):
    with driver.store_rows(0, 0):
        _run(tmp_path / "g", False)
    with driver.store_rows(0, 10):  # every row written by a range writer, the store not finalized
        _run(tmp_path / "g", False)
    capfd.readouterr()
    with driver.store_state_unsaid():
        assert _run(tmp_path / "g", True).complete
    assert "holds all" not in capfd.readouterr().err
    _run(tmp_path / "g", True)
    assert capfd.readouterr().err.count("holds all 10 rows already") == 1


def test_a_resumed_store_is_not_said_inside_store_state_unsaid(tmp_path, capfd):
    with driver.store_rows(0, 0):
        _run(tmp_path / "g", False)
    with driver.store_rows(0, 4):
        _run(tmp_path / "g", False)
    capfd.readouterr()
    with driver.store_state_unsaid():
        _run(tmp_path / "g", True)
    err = capfd.readouterr().err
    assert "resuming" not in err and "rows already" not in err
