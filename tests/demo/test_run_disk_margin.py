"""The demo's free-space check keeps 4 MiB beyond what the stores and checkpoints take, for the
figures, report, ranking and record (run._check_free_space's docstring; r369 mutant N5)."""

from __future__ import annotations

import shutil

import pytest

import tracin.demo.run as demo_run

LAYERS = [(64, 128), (128, 10)]
MARGIN = 4 * 2**20  # bytes, the margin the docstring and README's disk estimate count


@pytest.mark.parametrize("need", [0, 1000, 10**9])
def test_the_free_space_must_cover_the_stores_and_the_margin(tmp_path, monkeypatch, need):
    usage = shutil.disk_usage
    free = []
    monkeypatch.setattr(demo_run.shutil, "disk_usage", lambda path: usage(path)._replace(free=free[-1]))
    free.append(need + MARGIN)
    demo_run._check_free_space(tmp_path, need, "numpy", LAYERS)  # just enough
    free.append(need + MARGIN - 1)
    with pytest.raises(ValueError, match=rf"needs about {(need + MARGIN) / 1e6:,.1f} MB free in "):
        demo_run._check_free_space(tmp_path, need, "numpy", LAYERS)
