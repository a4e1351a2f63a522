"""The export bar's row count of a store whose metadata lists no checkpoint digests (an empty
fingerprints["checkpoints"], a user's own metadata): each column counts as a checkpoint, as without the
record (r385 hand mutant E21: the empty list divided the columns, a ZeroDivisionError)."""

from __future__ import annotations

import numpy as np

import tracin
from tracin.distributed import _export
from tracin.store._files import read_manifest


def test_an_empty_checkpoint_record_counts_per_column(tmp_path):
    path = tmp_path / "s"
    writer = tracin.GradientStore.create(path, 10, [3, 2], None, metadata={"fingerprints": {"checkpoints": []}})
    writer.write(0, 0, np.ones((4, 3), np.float32))  # 4 rows of column 0, none of column 1
    writer.close()
    rows = _export.RowsWritten(path, read_manifest(path))
    assert (rows.total, rows.count()) == (20, 4)
