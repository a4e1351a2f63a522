"""fr357: check_preconditioning's Trainer-folder hint for a checkpoint given as a PathLike whose __fspath__
gives bytes: the ValueError saying the optimizer state is missing, not os.path.join's TypeError."""

import os

import pytest

from tracin._export.checkpoints import Checkpoint
from tracin._export.driver import check_preconditioning


class _BytesPath(os.PathLike):
    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return os.fsencode(self.path)


def test_a_bytes_pathlike_folder_holding_optimizer_pt_gets_the_folder_hint(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no optimizer state.*its folder holds optimizer\.pt") as caught:
        check_preconditioning("adam", "full", [Checkpoint(_BytesPath(str(tmp_path)), 0.1)])
    assert repr(str(tmp_path)) in str(caught.value), caught.value
