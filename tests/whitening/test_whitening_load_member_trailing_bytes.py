"""Whitening.load refuses a member holding more bytes than its .npy header implies (a damaged or crafted file,
not one save wrote), naming the member (mutant W20: the trailing bytes ignored, the file loaded)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

import tracin
from tracin.whitening import Whitening


@pytest.mark.parametrize("member", ["moment_0", "inverse_0", "spec"])
def test_a_member_with_bytes_after_its_data_is_refused(tmp_path, member):
    rng = np.random.default_rng(1)
    w = Whitening.fit(tracin.Gradients([rng.standard_normal((30, 5)).astype(np.float32)]))
    saved, damaged = tmp_path / "w.npz", tmp_path / "damaged.npz"
    w.save(saved)
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data + b"\0" * 8 if info.filename == f"{member}.npy" else data)
    assert np.array_equal(Whitening.load(saved).inverses[0], w.inverses[0])  # the undamaged copy loads
    with pytest.raises(ValueError, match=rf"is not a saved tracin.Whitening \({member} holds other than the \d+ bytes"):
        Whitening.load(damaged)
