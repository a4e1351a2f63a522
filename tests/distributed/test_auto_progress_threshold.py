"""When tracin.distributed's scoring functions show a bar at once with progress=None (r385 hand mutant
M15): at AUTO_PROGRESS_MACS multiply-adds or more, where a bar can be shown automatically, as
tracin.top_k does; below it, or where no bar can show, progress stays None; True / False are kept."""

from __future__ import annotations

from tracin._tunables import AUTO_PROGRESS_MACS
from tracin.distributed import _api


def test_a_bar_at_once_from_the_threshold_up(monkeypatch):
    monkeypatch.setattr(_api, "shows_automatically", lambda: True)
    assert _api._options(None, None, None, AUTO_PROGRESS_MACS)[2] is True
    assert _api._options(None, None, None, 10 * AUTO_PROGRESS_MACS)[2] is True
    assert _api._options(None, None, None, AUTO_PROGRESS_MACS - 1)[2] is None
    assert _api._options(None, None, None, 0)[2] is None
    assert _api._options(None, None, False, 10 * AUTO_PROGRESS_MACS)[2] is False
    assert _api._options(None, None, True, 0)[2] is True


def test_no_bar_at_once_where_none_can_show(monkeypatch):
    monkeypatch.setattr(_api, "shows_automatically", lambda: False)
    assert _api._options(None, None, None, 10 * AUTO_PROGRESS_MACS)[2] is None


def test_shards_and_threads_come_back_checked(monkeypatch):
    monkeypatch.setattr(_api, "shows_automatically", lambda: False)
    assert _api._options(None, None, None, 0)[:2] == (None, None)
    assert _api._options(3, 2, None, 0)[:2] == (3, 2)
