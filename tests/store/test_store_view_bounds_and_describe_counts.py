"""A view of a store reads only its own rows (kernel_side past the view's end refused), and describe()'s
lists and sizes at their edges: exactly 20 metadata keys listed with no '... and 0 more', sizes of 1024
bytes and up in KiB (mutation testing m405: S5, S11, S14)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.store import describe
from tracin.store._store import _human

from .helpers import random_blocks, write_store


def _line(text: str, key: str) -> str:
    (found,) = [line for line in text.splitlines() if line.startswith(key + " ")]
    return found


def test_a_view_reads_its_own_rows_and_refuses_rows_past_its_end(tmp_path):
    blocks = random_blocks(10, [3, 2], "float32", False)
    store = write_store(tmp_path / "s", blocks)
    view = store[2:5]
    side = view.kernel_side(1, 3)
    for got, whole in zip(side.blocks, blocks, strict=True):
        np.testing.assert_array_equal(np.asarray(got), whole[3:5])
    # rows 5.. exist in the files, but not in the view: asking for them is an error, not the next rows
    for start, stop in [(0, 4), (2, 10), (3, 4)]:
        with pytest.raises(ValueError, match=rf"row range \[{start}, {stop}\) is outside the store's 3 rows"):
            view.kernel_side(start, stop)
    with pytest.raises(ValueError, match=r"row range \[0, 2\) is outside the store's 1 rows"):
        store.shard(3, 4)[1:2].kernel_side(0, 2)


@pytest.mark.parametrize("count, more", [(19, ""), (20, ""), (21, ", ... and 1 more")])
def test_metadata_keys_are_cut_only_past_twenty(tmp_path, count, more):
    keys = [f"k{i:02d}" for i in range(count)]
    tracin.GradientStore.create(tmp_path / "s", 2, [2], metadata=dict.fromkeys(keys, 1)).close()
    shown = ", ".join(keys[:20])
    assert _line(describe(tmp_path / "s"), "metadata") == f"metadata        {shown}{more}"


def test_parameters_are_named_up_to_four_then_counted(tmp_path):
    for count, tail in [(4, ""), (5, ", ... and 1 more")]:
        params = [{"name": f"layer{i}.weight"} for i in range(count)]
        path = tmp_path / f"s{count}"
        tracin.GradientStore.create(path, 2, [2], metadata={"params": params, "framework": "torch"}).close()
        names = ", ".join(f"layer{i}.weight" for i in range(min(count, 4)))
        assert _line(describe(path), "parameters") == f"parameters      {count}: {names}{tail}"


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2 - 1, "1024.0 KiB"),
        (1024**2, "1.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (2048 * 1024**4, "2048.0 TiB"),
    ],
)
def test_sizes_on_disk_are_in_the_largest_unit_below_1024(n, text):
    assert _human(n) == text


def test_a_store_with_one_checkpoint_whole_and_another_not_says_to_finish_writing(tmp_path):
    """Only a store with every row of every checkpoint written is "never finalized"; one checkpoint whole
    and another half written is unfinished, and the message says how many rows each has."""
    blocks = random_blocks(4, [3, 2], "float32", False)
    with tracin.GradientStore.create(tmp_path / "s", 4, [3, 2]) as w:
        w.write(0, 0, blocks[0])
        w.write(1, 0, blocks[1][:2])
    store = tracin.GradientStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match="unfinished") as refused:
        tracin.self_influence(store)
    said = str(refused.value)
    assert "rows usable from row 0, per checkpoint: [4, 2] of 4" in said and "allow_partial=True" in said
    assert "never finalized" not in said


def test_fingerprints_that_do_not_divide_the_slots_leave_each_slot_a_checkpoint(tmp_path):
    """5 factor pairs and 2 checkpoint fingerprints: no whole number of layers per checkpoint, so the store is
    shown as 5 slots (not '2 x 2 layers'), and contributions / diagnostics take 1 slot per checkpoint."""
    blocks = random_blocks(3, [(2, 1)] * 5, "float32", True)
    write_store(tmp_path / "s", blocks, factored=True, metadata={"fingerprints": {"checkpoints": ["a", "b"]}})
    assert tracin.GradientStore.open(tmp_path / "s").info()["layers_per_checkpoint"] == 1
    text = describe(tmp_path / "s")
    assert _line(text, "checkpoints") == "checkpoints     5  (weights 1, 1, 1, 1, 1, the default)"
    assert _line(text, "dims") == "dims            [2, 1], [2, 1], [2, 1], [2, 1], [2, 1]"


def test_repr_names_the_rows_of_a_view_only(tmp_path):
    store = write_store(tmp_path / "s", random_blocks(6, [2, 3], "float32", False))
    whole = f"GradientStore({str(store.path)!r}, n_rows=6, dims=[2, 3], dtype='float32', complete=True"
    assert repr(store) == whole + ")" and repr(store[:]) == whole + ")"
    assert repr(store[:4]) == whole.replace("n_rows=6", "n_rows=4") + ", rows=[0, 4))"
    assert repr(store[2:]) == whole.replace("n_rows=6", "n_rows=4") + ", rows=[2, 6))"
    assert repr(store[2:5][1:]) == whole.replace("n_rows=6", "n_rows=2") + ", rows=[3, 5))"
