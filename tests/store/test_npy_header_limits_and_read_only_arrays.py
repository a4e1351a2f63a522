""".npy files of a store at the limits of what is accepted: a header as long as NumPy's own limit for
untrusted files (10000 bytes, in a version 1.0 or 2.0 file) reads as np.load reads it, and the arrays a
store hands out, even empty ones, are read-only."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from tracin.store import StoreFormatError, _npy

DATA = np.arange(6, dtype="<f4").reshape(3, 2)


def _padded_npy(path, version: int, header_len: int, data: np.ndarray = DATA) -> int:
    """Writes `data` as a .npy file whose header text is padded with spaces to `header_len` bytes
    (as the format allows); returns the data offset."""
    text = f"{{'descr': '{data.dtype.str}', 'fortran_order': False, 'shape': {data.shape}, }}"
    text = text.ljust(header_len - 1) + "\n"
    length = struct.pack("<H", header_len) if version == 1 else struct.pack("<I", header_len)
    head = b"\x93NUMPY" + bytes([version, 0]) + length + text.encode("latin1")
    path.write_bytes(head + data.tobytes())
    return len(head)


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_of_numpys_largest_accepted_length_is_read(tmp_path, version):
    path = tmp_path / "checkpoint_000.npy"
    offset = _padded_npy(path, version, 10000)
    np.testing.assert_array_equal(np.load(path), DATA)  # NumPy's own reader accepts it (its limit is 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _npy.read_header(fd, path) == (np.dtype("<f4"), (3, 2), False, offset)
        assert _npy.check_npy(fd, path, np.dtype("<f4"), (3, 2)) == offset
        np.testing.assert_array_equal(_npy.read_array(fd, np.dtype("<f4"), offset, (3, 2), path), DATA)
        np.testing.assert_array_equal(_npy.map_array(fd, np.dtype("<f4"), offset, (3, 2), path), DATA)
    finally:
        os.close(fd)


def test_a_header_one_byte_over_numpys_limit_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint_000.npy"
    _padded_npy(path, 1, 10001)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(StoreFormatError, match=r"checkpoint_000\.npy: corrupt \.npy header"):
            _npy.read_header(fd, path)
    finally:
        os.close(fd)


def test_arrays_read_or_mapped_from_a_store_file_are_read_only(tmp_path):
    path = tmp_path / "checkpoint_000.npy"
    offset = _padded_npy(path, 1, 128)
    fd = os.open(path, os.O_RDONLY)
    try:
        for array in (
            _npy.read_array(fd, np.dtype("<f4"), offset, (3, 2), path),
            _npy.map_array(fd, np.dtype("<f4"), offset, (3, 2), path),
            _npy.map_array(fd, np.dtype("<f4"), offset, (0, 2), path),
        ):
            assert not array.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                array[...] = 0
    finally:
        os.close(fd)
    np.testing.assert_array_equal(np.load(path), DATA)


@pytest.mark.parametrize("make", ["create_npy", "write_npy"])
def test_a_new_data_file_is_flushed_to_disk_at_its_full_size(tmp_path, monkeypatch, make):
    """A killed or powered-off machine must not leave a data file shorter than its header says: the file
    is fsynced once its size is set (create_npy) or its data written (write_npy)."""
    path = tmp_path / "checkpoint_000.npy"
    synced: list[tuple[int, int]] = []
    fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    if make == "create_npy":
        _npy.create_npy(path, np.dtype("<f4"), (3, 2))
    else:
        _npy.write_npy(path, DATA)
    st = os.stat(path)
    assert (st.st_ino, st.st_size) in synced
    assert st.st_size == _npy.npy_size(np.dtype("<f4"), (3, 2)) == 128 + DATA.nbytes
    expected = np.zeros((3, 2), "<f4") if make == "create_npy" else DATA
    np.testing.assert_array_equal(np.load(path), expected)


@pytest.mark.parametrize(
    "array",
    [
        np.asfortranarray(np.arange(12, dtype="<i8").reshape(3, 4)),
        np.arange(20, dtype="<i8")[::2],
        np.arange(24.0)[::-2],
    ],
    ids=["fortran", "strided", "reversed"],
)
def test_write_npy_writes_arrays_of_any_layout_in_c_order(tmp_path, array):
    path = tmp_path / "ids.npy"
    _npy.write_npy(path, array)
    loaded = np.load(path)
    assert not np.isfortran(loaded) and loaded.dtype == array.dtype
    np.testing.assert_array_equal(loaded, np.array(array.tolist(), array.dtype))
