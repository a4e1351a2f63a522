"""tracin._progress: an automatic bar (enabled=None) makes no tqdm bar for quick work."""

from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest

import tracin
from tracin import _progress

tqdm_auto = pytest.importorskip("tqdm.auto")


@pytest.fixture
def terminal(monkeypatch):
    """stderr counts as a terminal, as where someone watches: automatic bars show."""
    monkeypatch.setattr(_progress, "stderr_is_a_terminal", lambda: True)


@pytest.fixture
def made(monkeypatch):
    """The tqdm bars made from here on (tqdm.auto.tqdm, as _progress imports it, counting)."""
    bars = []

    class Counting(tqdm_auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm_auto, "tqdm", Counting)
    return bars


def test_quick_automatic_calls_make_no_tqdm_bar(made, capsys):
    a = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for _ in range(3):
        tracin.top_k(a, a, k=2)
        tracin.self_influence(a)
        tracin.scores(a, a)
        tracin.aggregate(a, a)
    assert made == [] and capsys.readouterr().err == ""
    tracin.top_k(a, a, k=2, progress=True)  # asked for: at once
    assert len(made) == 1 and made[0].n == 4


def test_slow_automatic_bar_is_made_late_with_the_count_and_time_so_far(made, monkeypatch, capsys, terminal):
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.2)
    bar = _progress.progress_bar(10, None, "work", unit="row")
    bar.update(3)
    bar.set_postfix_str("early")
    assert made == []
    time.sleep(0.25)
    bar.update(2)
    assert len(made) == 1 and made[0].n == 5 and made[0].total == 10
    assert time.time() - made[0].start_t >= 0.25  # elapsed from the start of the work
    bar.update(5)
    bar.close()
    err = capsys.readouterr().err
    assert "work" in err and "10.0/10.0" in err and "early" in err


def test_slow_automatic_bar_over_passes_starts_in_the_pass_reached(made, monkeypatch, capsys, terminal):
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.0)
    bar = _progress.progress_bar(3, None, "export", passes=2, unit_scale=False)
    bar.update(4)  # one pass of 3 and one unit of the second
    bar.close()
    assert len(made) == 1 and made[0].n == 1
    assert "export checkpoint 2/2" in capsys.readouterr().err


def test_a_bar_over_passes_ends_full_in_its_last_pass(made, capsys):
    bar = _progress.progress_bar(3, True, "export", passes=2, unit_scale=False)
    bar.update(2)
    bar.update(4)  # the rest of the first pass and the whole second: the last pass stays full, not a third begun
    bar.close()
    assert len(made) == 1 and made[0].n == 3 and made[0].total == 3
    err = capsys.readouterr().err
    assert "export checkpoint 2/2" in err and "3/2" not in err


def test_each_pass_of_a_bar_times_its_own_rows(made, capsys):
    """review280 F1: the count restarted per pass but the clock ran from the first pass, so the rate a
    later pass ended on was about 1/c of its own; each pass now starts its clock (a fake one here)."""
    clock = [100.0]
    bar = _progress.progress_bar(3, True, "export", passes=3, unit_scale=False)
    tqdm_bar = made[0]
    tqdm_bar._time = lambda: clock[0]
    tqdm_bar.start_t = tqdm_bar.last_print_t = clock[0]
    for _ in range(9):  # one row a second, three passes of three rows
        clock[0] += 1.0
        bar.update(1)
    assert tqdm_bar.format_dict["elapsed"] == pytest.approx(3.0)  # the last pass's 3 s, not all 9
    assert tqdm_bar.n == 3
    bar.close()
    assert "1.00ex/s" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_a_late_bar_over_passes_times_the_pass_it_reaches_from_when_that_pass_began(made, monkeypatch, terminal):
    """review294 F6: an automatic bar made late replays the count so far, and the pass boundary it crossed
    set the pass's clock to the moment the bar appeared (a rate 3x too high here); the pass now starts
    where the even-rate estimate from the work's start puts it. Fake clock: passes of 10 rows, 0.13 s a row."""
    clock = [1000.0]
    monkeypatch.setattr(_progress, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=lambda: clock[0]))
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])  # the clock tqdm bars take
    bar = _progress.progress_bar(10, None, "export", passes=3, unit_scale=False)
    for _ in range(19):  # the bar appears at row 16 (2.08 s), in pass 2, which began at row 10 (1.30 s)
        clock[0] += 0.13
        bar.update(1)
    (tqdm_bar,) = made
    assert tqdm_bar.start_t == pytest.approx(1001.30)
    assert tqdm_bar.n == 9 and tqdm_bar.format_dict["elapsed"] == pytest.approx(9 * 0.13)
    clock[0] += 0.26
    bar.update(2)  # two rows: pass 2 ends with the first, so pass 3 began one row's time ago
    assert tqdm_bar.n == 1 and tqdm_bar.start_t == pytest.approx(clock[0] - 0.13)
    bar.close()


def test_a_late_bar_times_its_pass_from_when_it_began_after_a_pass_counted_at_once(made, monkeypatch, terminal):
    """A resumed export counts a checkpoint written before at once (update(total) at the start), so an even
    rate over the work so far is wrong: the pass the late bar shows began at that update, not part-way."""
    clock = [1000.0]
    monkeypatch.setattr(_progress, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=lambda: clock[0]))
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    bar = _progress.progress_bar(10, None, "export", passes=3, unit_scale=False)
    bar.update(10)  # checkpoint 1 written before: counted at once
    for _ in range(8):  # checkpoint 2: a row every 0.25 s, the bar appears at 2 s
        clock[0] += 0.25
        bar.update(1)
    (tqdm_bar,) = made
    assert tqdm_bar.n == 8 and tqdm_bar.start_t == pytest.approx(1000.0)


def test_closing_an_automatic_bar_that_never_showed_is_harmless(made):
    bar = _progress.progress_bar(None, None, "quick")
    bar.update(1)
    bar.close()
    bar.close()
    assert made == []


def test_automatic_bars_only_where_stderr_is_a_terminal_and_asked_for_bars_everywhere(made, monkeypatch, capsys):
    # a log (stderr not a terminal) collected a frame of every automatic bar per refresh
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.0)
    for enabled in (None, True):
        bar = _progress.progress_bar(10, enabled, f"work {enabled}")
        bar.update(10)
        bar.close()
    assert len(made) == 1 and "work True" in capsys.readouterr().err  # captured: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = _progress.progress_bar(10, None, "work None")
    bar.update(10)
    bar.close()
    assert len(made) == 2 and "work None" in capsys.readouterr().err


def test_automatic_bars_show_in_a_notebook_kernel_whose_stderr_is_no_terminal(monkeypatch):
    # Jupyter / VS Code / Spyder kernels: stderr is no terminal; tqdm.auto draws widgets where ipywidgets
    # is installed and text bars in the cell's output otherwise (e70ebc7 showed only the widgets)
    class Shell:
        kernel = object()

    class TerminalShell:  # the IPython terminal: no kernel (its stderr is the terminal)
        pass

    ipython = types.ModuleType("IPython")
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert not _progress.stderr_is_a_terminal()  # pytest captures it
    ipython.get_ipython = lambda: None
    assert not _progress.shows_automatically()
    ipython.get_ipython = TerminalShell
    assert not _progress.shows_automatically()
    ipython.get_ipython = Shell
    assert _progress.shows_automatically()


@pytest.mark.parametrize("function", ["top_k", "scores", "self_influence", "aggregate"])
def test_progress_true_without_tqdm_names_progress_and_the_install(function, monkeypatch):
    # review69 F4: the core install (NumPy only) with progress=True gave a bare "No module named 'tqdm'"
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # as if tqdm were not installed
    a = np.ones((6, 4), np.float32)
    args = (a,) if function == "self_influence" else (a, a)
    with pytest.raises(ModuleNotFoundError, match=r"progress=True needs tqdm.*pip install tqdm.*progress=False") as e:
        getattr(tracin, function)(*args, progress=True)
    assert e.value.name.startswith("tqdm")
    getattr(tracin, function)(*args, progress=False)  # no bar: no tqdm needed


@pytest.mark.parametrize("flag", [np.bool_(True), np.bool_(False)])
def test_progress_takes_numpy_booleans_as_normalize_does(flag):
    # review92 F1: np.bool_ was refused ("progress must be True, False or None") though normalize= takes it
    assert _progress.check_progress(flag) is bool(flag)
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(tracin.top_k(a, a, k=2, progress=flag).indices, tracin.top_k(a, a, k=2).indices)


@pytest.mark.parametrize("bad", [1, 0, "yes", np.int64(1)])
def test_progress_refuses_what_is_not_a_boolean(bad):
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        _progress.check_progress(bad)
