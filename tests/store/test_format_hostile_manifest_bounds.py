"""Manifest validation at its exact bounds (r384, hand mutation testing of store/_format.py): row and
column counts up to 2**63 - 1, data file names matched whole (no path past the name), the ids key
naming ids.npy only, nesting at most 64 levels, and metadata strings holding escaped quotes before brackets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError

from .helpers import random_blocks, write_store
from .test_hostile import _nested


@pytest.fixture
def store(tmp_path):
    """A finished store of 6 rows, two checkpoints (dims 4 and 3), with ids."""
    return write_store(tmp_path / "s", random_blocks(6, [4, 3], "float32", False), [0.5, 2.0], ids=list(range(6)))


def _edit(path: Path, change) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(n_rows=2**63), r"n_rows must be a positive integer below 2\*\*63, got 9223372036854775808"),
        (lambda d: d["checkpoints"][1].update(dim=2**63), r"checkpoints\[1\] dims must be positive integers below"),
    ],
)
def test_a_count_of_2_to_the_63_is_refused_as_such(store, change, message):
    _edit(store.path, change)
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.open(store.path)


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint_001.npy/../../outside.npy",  # a prefix that matches the pattern, then a path out of the store
        "checkpoint_001.npy.bak",
        "checkpoint_001_left.npy\n",
    ],
)
def test_a_data_file_name_is_matched_whole(store, tmp_path, name):
    # only a name that is the pattern from its first character to its last may be opened in the store
    victim = write_store(tmp_path / "v", random_blocks(6, [3], "float32", False), [1.0])
    (tmp_path / "outside.npy").write_bytes((victim.path / "checkpoint_000.npy").read_bytes())
    _edit(store.path, lambda d: d["checkpoints"][1].update(file=name))
    with pytest.raises(StoreFormatError, match=r"checkpoints\[1\] names unexpected data files"):
        tracin.GradientStore.open(store.path)


@pytest.mark.parametrize("ids", ["../ids.npy", "checkpoint_000.npy", True, 1, ["ids.npy"]])
def test_the_ids_key_may_name_ids_npy_only(store, ids):
    _edit(store.path, lambda d: d.update(ids=ids))
    with pytest.raises(StoreFormatError, match=r"ids must be null or 'ids.npy', got "):
        tracin.GradientStore.open(store.path)


def test_a_manifest_one_level_past_the_nesting_bound_is_refused(store):
    # the manifest object (1) holds metadata (2), whose "deep" value of 62 levels makes 64: the bound
    _edit(store.path, lambda d: d.update(metadata={"deep": _nested(62)}))
    assert tracin.GradientStore.open(store.path).metadata["deep"] == _nested(62)
    _edit(store.path, lambda d: d.update(metadata={"deep": _nested(63)}))
    with pytest.raises(StoreFormatError, match=r"nested too deeply \(65 levels; at most 64\)"):
        tracin.GradientStore.open(store.path)


def test_metadata_whose_strings_hold_quotes_and_brackets_round_trips(tmp_path):
    # json.dumps writes the quote as \" : the brackets after it are inside the string, not 200 levels
    metadata = {"note": 'say "' + "[" * 200, "path": "C:\\dir\\" + "{" * 100}
    w = tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata=metadata)
    w.write(0, 0, np.ones((2, 3), np.float32))
    store = tracin.GradientStore.open(w.finalize().path)
    assert store.metadata == metadata


@pytest.mark.parametrize("dims", [[2], [2, 2, 2], []])
def test_a_factored_checkpoint_needs_exactly_two_dims(tmp_path, dims):
    # a factored entry is (p, q): one left and one right file; any other count is a malformed manifest
    path = tmp_path / "f"
    w = tracin.GradientStore.create(path, 3, [(2, 2)], factored=True)
    w.write(0, 0, (np.ones((3, 2), np.float32), np.ones((3, 2), np.float32)))
    w.finalize()
    _edit(path, lambda d: d["checkpoints"][0].update(dims=dims))
    with pytest.raises(StoreFormatError, match=r"checkpoints\[0\] dims must be positive integers below 2\*\*63, got "):
        tracin.GradientStore.open(path)


def test_a_huge_integer_is_named_by_its_bit_count_not_its_digits(store, tmp_path):
    # 10**4000 has floor(4000 * log2(10)) + 1 = 13288 bits; its 4001 digits are not quoted
    _edit(store.path, lambda d: d.update(n_rows=10**4000))
    with pytest.raises(StoreFormatError, match=r"n_rows must be .*, got an integer of 13288 bits$"):
        tracin.GradientStore.open(store.path)
    # 10**5000 (16610 bits) is past Python's 4300-digit limit for int -> str: repr() itself would fail
    with pytest.raises(ValueError, match=r"ids\[0\] = an integer of 16610 bits does not fit in uint64"):
        tracin.GradientStore.create(tmp_path / "t", 2, [3], ids=[10**5000, 1])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(dtype=["float32"]), r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got \["),
        (lambda d: d.update(dtype={"float32": 1}), r"dtype must be one of .*, got \{'float32': 1\}"),
        (lambda d: d.update(id=12345678901234567890123456789012), r"id must be 32 lowercase hex digits, got 1234"),
        (lambda d: d.update(version=True), r"format version must be a positive integer, got True"),
    ],
)
def test_values_of_the_wrong_json_type_are_refused_as_malformed(store, change, message):
    # a list or object where a string is due is unhashable, a number of 32 digits reads like an id, true == 1
    _edit(store.path, change)
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.open(store.path)
