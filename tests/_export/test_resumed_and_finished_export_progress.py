"""What an export says about its store: one that resumes a store says so once, with the rows already in it,
and its bar starts at those rows (in the pass holding the first missing one), not at 0; one whose store is
finished already says so and shows no export bar counting from 0. progress=False stays silent. The same
driver serves tracin.torch and tracin.jax: both are run. Rows resumed are compared with an export that
ran through in memory."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tracin
from interrupts import ctrl_c_when
from tracin import _progress
from tracin._export.sinks import StoreSink
from tracin._progress import progress_bar

torch = pytest.importorskip("torch")


def _torch_export(store, progress):
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    doubled = {k: 2 * v for k, v in model.state_dict().items()}
    checkpoints = [(model.state_dict(), 0.1), (doubled, 0.05)]

    def loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    return export_gradients(model, checkpoints, (x, y), loss, store=store, batch_size=4, progress=progress)


def _jax_export(store, progress):
    jax = pytest.importorskip("jax")
    from tracin.jax import export_gradients

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 3)).astype(np.float32), rng.integers(0, 2, 10)
    w = rng.standard_normal((3, 2)).astype(np.float32)

    def loss(params, inputs, targets):
        logits = inputs @ params["w"]
        return -jax.numpy.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    checkpoints = [({"w": w}, 0.1), ({"w": 2 * w}, 0.05)]
    return export_gradients(loss, checkpoints, (x, y), store=store, batch_size=4, progress=progress)


EXPORTS = {"torch": _torch_export, "jax": _jax_export}


def _frames(err: str, name: str) -> list[str]:
    """The export bar's frames (tqdm redraws with \\r), not the read-through's."""
    return [f for f in re.split(r"[\r\n]", err) if f.startswith(f"tracin.{name} export checkpoint")]


def _interrupted(run, store) -> None:
    """Stops the export at the batch of rows [4, 8) of checkpoint 1: 10 + 4 of its 20 rows are written."""
    with ctrl_c_when(StoreSink, "write", lambda c, start, block: c == 1 and start == 4):
        run(store, False)


@pytest.mark.parametrize("name", EXPORTS)
def test_a_resumed_export_says_so_and_starts_its_bar_at_the_rows_done(name, tmp_path, capfd):
    run = EXPORTS[name]
    _interrupted(run, tmp_path / "g")
    capfd.readouterr()
    store = run(tmp_path / "g", True)
    err = capfd.readouterr().err
    said = f"tracin.{name} export: resuming gradient store {tmp_path / 'g'}: 14 of 20 rows already in it"
    assert err.count(said) == 1
    assert "(10 examples x 2 checkpoints); computing the other 6" in err
    frames = _frames(err, name)
    assert frames, err
    assert re.match(rf"tracin\.{name} export checkpoint 2/2: +40%.* 4/10 ", frames[0]), frames[0]
    assert not any("checkpoint 1/2" in f for f in frames)
    assert re.search(r" 10/10 ", frames[-1]), frames[-1]
    assert store.complete
    np.testing.assert_allclose(tracin.self_influence(store), tracin.self_influence(run(None, False)), rtol=1e-6)


@pytest.mark.parametrize("name", EXPORTS)
def test_a_finished_stores_export_says_so_without_a_bar_from_zero(name, tmp_path, capfd):
    run = EXPORTS[name]
    run(tmp_path / "g", False)
    capfd.readouterr()
    assert run(tmp_path / "g", True).complete
    err = capfd.readouterr().err
    said = f"tracin.{name} export: gradient store {tmp_path / 'g'} holds all 20 rows already"
    assert err.count(said) == 1
    assert "nothing to compute" in err
    assert _frames(err, name) == []  # no "0/10" bar of a pass that computes nothing


@pytest.mark.parametrize("name", EXPORTS)
def test_progress_false_says_nothing_of_a_resumed_or_finished_store(name, tmp_path, capfd):
    run = EXPORTS[name]
    _interrupted(run, tmp_path / "g")
    capfd.readouterr()
    run(tmp_path / "g", False)
    run(tmp_path / "g", False)
    assert capfd.readouterr().err == ""


def test_a_bar_made_at_initial_units_skips_them_in_its_updates(capfd):
    """progress_bar(initial=14) over 2 passes of 10: drawn at pass 2, 4/10; the caller's first 14 units of
    update() are those and not counted again, so 20 units end it at 10/10 of pass 2."""
    bar = progress_bar(10, True, "work", passes=2, unit_scale=False, initial=14)
    for _ in range(5):
        bar.update(4)  # 20 units: 14 already shown, 6 new
    bar.close()
    frames = [f for f in re.split(r"[\r\n]", capfd.readouterr().err) if f.startswith("work")]
    assert re.match(r"work checkpoint 2/2: +40%.* 4/10 ", frames[0]), frames[0]
    assert re.search(r" 10/10 ", frames[-1]) and "checkpoint 2/2" in frames[-1]
    assert not any("11/10" in f or "checkpoint 1/2" in f for f in frames)


def test_an_automatic_bar_made_late_starts_at_initial_units(capfd, monkeypatch):
    """The automatic bar (enabled=None, made at an update after the delay) starts where a resumed one does."""
    monkeypatch.setattr(_progress, "shows_automatically", lambda: True)
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.0)
    bar = progress_bar(10, None, "work", passes=2, unit_scale=False, initial=14)
    bar.update(14)  # the rows done before: nothing new to draw
    bar.update(2)
    bar.update(4)
    bar.close()
    frames = [f for f in re.split(r"[\r\n]", capfd.readouterr().err) if f.startswith("work")]
    assert frames and all("checkpoint 2/2" in f for f in frames), frames
    assert re.search(r" 10/10 ", frames[-1]), frames[-1]
    assert not any("11/10" in f for f in frames)


def test_a_plain_bar_made_at_initial_units():
    bar = progress_bar(10, True, "work", unit_scale=False, initial=3)
    bar.update(5)
    assert bar._bar.n == 5 and bar._bar.initial == 3
    bar.close()
