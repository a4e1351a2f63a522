"""r358 (mutation testing of the export loop's ZeroRows calls): a range writer (store_rows) whose range
starts inside a batch computes part of that batch; the rows found 0 there are numbered from the first row
it stores, not from the batch's first (killed mutant D5: see(batch.start, ...))."""

from __future__ import annotations

import warnings

from tests._export.test_zero_rows import ZERO_STARTS, _ckpts, _Masked
from tracin._export.driver import Options, export, store_rows


def test_rows_0_in_a_partly_stored_batch_of_a_range_writer_are_named_by_their_own_row(tmp_path):
    ckpts = _ckpts({6}, {6})  # row 6: 0 at both checkpoints
    with store_rows(0, 0):
        export(_Masked(size=4), ckpts, Options("full", None, "float32", tmp_path / "g", False), [])
    with store_rows(5, 10), warnings.catch_warnings(record=True) as caught:  # batch [4, 8): rows 5-7 stored
        warnings.simplefilter("always")
        export(_Masked(size=4), ckpts, Options("full", None, "float32", tmp_path / "g", False), [])
    said = [str(w.message) for w in caught if str(w.message).startswith(ZERO_STARTS)]
    assert said == [
        f"{ZERO_STARTS}row 6 of the data: its gradient is 0 at every checkpoint, so every score with it is 0 "
        "and cosine treats it as 0; a loss of exactly 0 for it? (e.g. all labels ignored, -100)"
    ]
