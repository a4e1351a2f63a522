"""open() checks the manifest against the files and says what is wrong."""

import json
import re

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError

from .helpers import random_blocks, read_rows, write_store


@pytest.fixture
def store_dir(tmp_path):
    write_store(tmp_path / "s", random_blocks(6, [4, 3], "float16", False), dtype="float16", ids=list(range(6)))
    return tmp_path / "s"


def _edit_manifest(root, change):
    doc = json.loads((root / "manifest.json").read_text())
    change(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


def test_a_valid_store_opens(store_dir):
    assert tracin.GradientStore.open(store_dir).n_rows == 6


def test_truncated_data_file(store_dir):
    f = store_dir / "checkpoint_001.npy"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(StoreFormatError, match=r"checkpoint_001.npy: truncated, \d+ bytes on disk but \d+ expected"):
        tracin.GradientStore.open(store_dir)


def test_extra_bytes_after_the_data(store_dir):
    with open(store_dir / "checkpoint_000.npy", "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(StoreFormatError, match="3 unexpected bytes after the data"):
        tracin.GradientStore.open(store_dir)


def test_wrong_dtype_on_disk(store_dir):
    np.save(store_dir / "checkpoint_000.npy", np.zeros((6, 4), np.float32))
    with pytest.raises(StoreFormatError, match="dtype float32 on disk, but the manifest implies float16"):
        tracin.GradientStore.open(store_dir)


def test_wrong_shape_on_disk(store_dir):
    np.save(store_dir / "checkpoint_001.npy", np.zeros((6, 5), np.float16))
    with pytest.raises(StoreFormatError, match=r"shape \(6, 5\) on disk, but the manifest implies \(6, 3\)"):
        tracin.GradientStore.open(store_dir)


def test_a_fortran_order_data_file_is_refused_not_read_transposed(store_dir):
    """The same dtype, shape and size, its values in column order: read as C order they would be other rows."""
    np.save(store_dir / "checkpoint_000.npy", np.asfortranarray(np.arange(24, dtype=np.float16).reshape(6, 4)))
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy: stored in Fortran order; the format requires C"):
        tracin.GradientStore.open(store_dir)


def test_manifest_dims_disagreeing_with_the_files(store_dir):
    _edit_manifest(store_dir, lambda d: d["checkpoints"][0].update(dim=5))
    with pytest.raises(StoreFormatError, match=r"shape \(6, 4\) on disk, but the manifest implies \(6, 5\)"):
        tracin.GradientStore.open(store_dir)


def test_corrupt_npy_header(store_dir):
    (store_dir / "checkpoint_000.npy").write_bytes(b"garbage" * 20)
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy: corrupt .npy header"):
        tracin.GradientStore.open(store_dir)


def test_missing_data_file(store_dir):
    (store_dir / "checkpoint_001.npy").unlink()
    with pytest.raises(StoreFormatError, match="checkpoint_001.npy: data file is missing"):
        tracin.GradientStore.open(store_dir)


def test_bad_ids_file(store_dir):
    np.save(store_dir / "ids.npy", np.arange(5))
    with pytest.raises(StoreFormatError, match=r"expected 6 integer or string ids, got shape \(5,\)"):
        tracin.GradientStore.open(store_dir)


@pytest.mark.parametrize("ids", [np.arange(6.0), np.arange(6) % 2 == 0, np.arange(6) + 0j])
def test_an_ids_file_of_numbers_other_than_integers_is_refused(store_dir, ids):
    # 6 ids of the right shape: 0.0 .. 5.0 would compare equal to integer ids, yet are neither kind the format has
    np.save(store_dir / "ids.npy", ids)
    with pytest.raises(
        StoreFormatError, match=rf"expected 6 integer or string ids, got shape \(6,\) dtype {ids.dtype}"
    ):
        tracin.GradientStore.open(store_dir)


def test_a_data_file_with_a_version_2_header_reads_as_its_version_1_copy(store_dir):
    # .npy 2.0 (a 4-byte header length) holds the same array: read like NumPy reads it, not refused as corrupt
    before = read_rows(tracin.GradientStore.open(store_dir))
    path = store_dir / "checkpoint_001.npy"
    array = np.load(path)
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=(2, 0))
    assert path.read_bytes()[6:8] == b"\x02\x00"
    for got, expected in zip(read_rows(tracin.GradientStore.open(store_dir)), before, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_manifest_of_no_checkpoints_is_refused(store_dir):
    _edit_manifest(store_dir, lambda d: d.update(checkpoints=[]))
    with pytest.raises(StoreFormatError, match="checkpoints must be a non-empty list"):
        tracin.GradientStore.open(store_dir)


def test_newer_format_version(store_dir):
    _edit_manifest(store_dir, lambda d: d.update(version=2))
    with pytest.raises(StoreFormatError, match="format version 2, but this tracin reads versions up to 1; upgrade"):
        tracin.GradientStore.open(store_dir)


def test_corrupt_manifest(store_dir):
    (store_dir / "manifest.json").write_text('{"format": "tracin-gradient-st')
    with pytest.raises(StoreFormatError, match="corrupt manifest, not valid JSON"):
        tracin.GradientStore.open(store_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("dtype"), "missing key 'dtype'"),
        (lambda d: d.update(format="other"), "not a tracin gradient store manifest"),
        (lambda d: d.update(dtype="int8"), "dtype must be one of"),
        (lambda d: d.update(mode="diagonal"), "mode must be 'full' or 'factored'"),
        (lambda d: d.update(n_rows=-1), "n_rows must be a positive integer"),
        (lambda d: d["checkpoints"][0].update(weight="fast"), r"checkpoints\[0\] weight must be a finite number"),
        (lambda d: d["checkpoints"][1].update(written=[[0, 9]]), r"checkpoints\[1\].written must be sorted"),
        (lambda d: d["checkpoints"][1].update(file="../elsewhere.npy"), "names unexpected data files"),
        (lambda d: d["checkpoints"][1].pop("file"), r"checkpoints\[1\] lacks the key .file."),
        (
            lambda d: d["checkpoints"][1].update(written=[[0, 2]]),
            re.escape("complete, but checkpoints[1].written records rows [[0, 2]] of n_rows=6 (missing [[2, 6]])"),
        ),
        (  # n_rows edited: named with what the files' rows are recorded as
            lambda d: d.update(n_rows=8),
            re.escape("complete, but checkpoints[0].written records rows [[0, 6]] of n_rows=8 (missing [[6, 8]])"),
        ),
    ],
)
def test_malformed_manifests(store_dir, change, message):
    _edit_manifest(store_dir, change)
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.open(store_dir)


def test_no_store_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tracin.GradientStore.open(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        tracin.GradientStore.open(tmp_path)


def test_resuming_into_a_damaged_store_says_so(store_dir):
    _edit_manifest(
        store_dir,
        lambda d: d.update(complete=False, checkpoints=[{**c, "written": [[0, 3]]} for c in d["checkpoints"]]),
    )
    f = store_dir / "checkpoint_000.npy"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(StoreFormatError, match="truncated.*pass overwrite=True"):
        tracin.GradientStore.create(store_dir, 6, [4, 3], dtype="float16", ids=list(range(6)))
