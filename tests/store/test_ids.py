"""String ids UTF-8 cannot encode, in an ids.npy written by other code or changed after (review58 N3):
refused where the store's ids are read (opening, resuming, .ids), naming the file and the first such row.
Opening checks the whole file; .ids checks the file is the one opened, and only the view's rows (review66 N1)."""

import os
import re
import tracemalloc

import numpy as np
import pytest

import tracin
from tracin.store import StoreChangedError, StoreFormatError, _npy
from tracin.store._npy import unencodable_id

IDS = [f"row-{i}" for i in range(6)]


@pytest.fixture
def path(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 6, [2], ids=IDS)
    w.write(0, 0, np.ones((6, 2), np.float32))
    w.finalize()
    return tmp_path / "s"


def _plant(path, codes_by_row: dict, byteorder: str = "<") -> None:
    """Rewrites ids.npy as other code could: NumPy's own np.save of the ids with some rows' code points
    replaced (UTF-32, as NumPy keeps strings; code points a Python string cannot hold go in this way)."""
    width = max([5] + [len(c) for c in codes_by_row.values()])
    codes = np.zeros((6, width), np.uint32)
    for r, text in enumerate(IDS):
        codes[r, : len(text)] = [ord(c) for c in text]
    for r, c in codes_by_row.items():
        codes[r] = 0
        codes[r, : len(c)] = c
    np.save(path / "ids.npy", codes.astype(f"{byteorder}u4").view(f"{byteorder}U{width}").reshape(6))


def test_a_lone_surrogate_planted_in_ids_npy_is_refused_at_opening_and_resuming_naming_file_and_row(path):
    a = np.load(path / "ids.npy")
    a[3] = "x\ud800y"
    a[5] = "z\udfff"
    np.save(path / "ids.npy", a)
    said = rf"^{path / 'ids.npy'}: ids\[3\] = 'x\\ud800y' holds a lone surrogate \(U\+D800\), which UTF-8 cannot encode"
    with pytest.raises(StoreFormatError, match=said):
        tracin.GradientStore.open(path)
    with pytest.raises(StoreFormatError, match=said):
        tracin.GradientStore.open(path, allow_partial=True)
    with pytest.raises(StoreFormatError, match=said):  # resume: the spec check reads the ids
        tracin.GradientStore.create(path, 6, [2], ids=IDS)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_code_points_beyond_unicode_and_big_endian_files_are_read_as_numpy_reads_them(path, byteorder):
    # NumPy turns U+110000 into a Python string that encodes to invalid UTF-8 (b'\xf4\x90\x80\x80'), without error
    _plant(path, {4: [ord("a"), 0x110000]}, byteorder)
    with pytest.raises(StoreFormatError, match=r"ids\[4\] = 'a\\U00110000' holds the code point 0x110000, beyond"):
        tracin.GradientStore.open(path)
    _plant(path, {2: [0xFFFFFFFF]}, byteorder)
    with pytest.raises(StoreFormatError, match=r"ids\[2\] = .* holds the code point 0xffffffff, beyond"):
        tracin.GradientStore.open(path)
    # the edges of the valid ranges, in a file of either byte order, are ids like any other
    edges = [0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]
    _plant(path, {1: edges}, byteorder)
    expected = IDS[:1] + ["".join(map(chr, edges))] + IDS[2:]
    assert tracin.GradientStore.open(path).ids.tolist() == expected
    assert tracin.GradientStore.open(path)[1:4].ids.tolist() == expected[1:4]  # a view's rows, mapped alone


def test_ids_changed_to_a_lone_surrogate_after_opening_are_a_store_changed_error(path):
    reader = tracin.GradientStore.open(path)
    assert reader.ids.tolist() == IDS
    _plant(path, {0: [0xDC80]})
    with pytest.raises(StoreChangedError, match=r"ids\[0\] = '\\udc80' holds a lone surrogate.*valid when .* opened"):
        reader[2:4].ids  # noqa: B018


def _change_in_place(path, row: int, code: int) -> None:
    """Writes `code` as the first code point of ids[row] into ids.npy in place, keeping the file's inode, size
    and modification time (as a change within one file-system clock tick would, unnoticed by a stat)."""
    st = os.stat(path / "ids.npy")
    ids = np.load(path / "ids.npy", mmap_mode="r+")
    ids.view(np.uint32).reshape(len(ids), -1)[row, 0] = code
    ids.flush()
    del ids
    os.utime(path / "ids.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path / "ids.npy")
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_ids_of_a_view_check_only_its_rows_once_the_file_is_the_one_opened(path):
    # review66 N1: .ids of any view re-checked every row of the file (a 10-row slice of a million-row store: 4 ms)
    reader = tracin.GradientStore.open(path)
    _change_in_place(path, 0, 0xDC80)  # unnoticed by the file's identity: only a check of row 0 finds it
    views = {(2, 4): reader[2:4], (1, 6): reader[1:], (3, 3): reader[3:3], (4, 6): reader.shard(2, 3)}
    for (a, b), view in views.items():
        ids = view.ids
        assert ids.tolist() == IDS[a:b] and not ids.flags.writeable
    said = r"ids\[0\] = '\\udc80ow-0' holds a lone surrogate \(U\+DC80\).*valid when .* opened \(changed in place"
    for view in (reader, reader[0:1], reader.shard(0, 2)):
        with pytest.raises(StoreChangedError, match=said):
            view.ids  # noqa: B018
    _change_in_place(path, 4, 0x110000)
    with pytest.raises(StoreChangedError, match=r"ids\[4\] = 'r?\\U00110000ow-4' holds the code point 0x110000"):
        reader[3:6].ids  # noqa: B018  # the row in the store, not in the view (ids[1])
    assert reader[1:4].ids.tolist() == IDS[1:4]


def test_ids_npy_replaced_or_modified_after_opening_is_a_store_changed_error_even_with_valid_ids(path):
    reader = tracin.GradientStore.open(path)
    other = [f"ROW-{i}" for i in range(6)]
    np.save(path / "ids.npy", np.array(other))  # valid ids of the same size, other ones: .ids returned them
    for view in (reader, reader[1:3]):
        with pytest.raises(StoreChangedError, match=r"ids.npy was replaced or modified after .* opened; open it again"):
            view.ids  # noqa: B018
    assert tracin.GradientStore.open(path)[1:3].ids.tolist() == other[1:3]
    np.save(path / "ids.npy", np.array([f"longer-{i}" for i in range(6)]))
    with pytest.raises(StoreChangedError, match=r"ids.npy is 320 bytes now but was 248 when the gradient store was"):
        reader[1:3].ids  # noqa: B018
    os.unlink(path / "ids.npy")
    with pytest.raises(StoreChangedError, match=r"ids.npy: ids file is missing .*valid when .* opened: open it again"):
        reader[1:3].ids  # noqa: B018


def test_ids_of_an_unfinished_store_read_while_its_writer_resumes(tmp_path):
    # the ids file's modification time is part of its identity in an unfinished store too: only create writes it
    w = tracin.GradientStore.create(tmp_path / "s", 6, [2], ids=IDS)
    w.write(0, 0, np.ones((2, 2), np.float32))
    w.close()
    reader = tracin.GradientStore.open(tmp_path / "s", allow_partial=True)
    assert reader.ids.tolist() == IDS[:2]
    w = tracin.GradientStore.create(tmp_path / "s", 6, [2], ids=IDS)
    w.write(0, 2, np.ones((4, 2), np.float32))
    w.finalize()
    assert reader.ids.tolist() == IDS[:2] and reader[1:2].ids.tolist() == IDS[1:2]
    assert tracin.GradientStore.open(tmp_path / "s")[2:].ids.tolist() == IDS[2:]


@pytest.mark.parametrize(("checked", "width"), [(10, 3), (3, 7), (1, 4)])
def test_the_first_unencodable_row_is_named_across_chunks_as_a_per_string_check_finds_it(monkeypatch, checked, width):
    # the check runs a piece at a time, on code points: compared with a check per Python string. (10, 3): 3 rows of
    # 3 code points a piece; (3, 7) and (1, 4): ids wider than a piece, checked in parts of one row (review140 F1)
    rng = np.random.default_rng(7)
    monkeypatch.setattr(_npy, "_CHECKED_CODES", checked)
    pool = np.array([0x41, 0x4E2D, 0xD7FF, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 0xFFFF, 0x1F600, 0x10FFFF, 0x110000])
    invalid = {0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0x110000}
    found, pieces = set(), set()
    for _ in range(300):
        n = int(rng.integers(1, 12))
        codes = rng.choice(pool, size=(n, width), p=[0.3] + [0.7 / 11] * 11 if rng.random() < 0.5 else None)
        codes[rng.random((n, width)) < 0.6] = 0x41  # many rows of valid ids only
        codes[rng.random(n) < 0.4] = 0x41  # also when the ids are wide
        for order in "<>":
            ids = codes.astype(f"{order}u4").view(f"{order}U{width}").reshape(n)
            expected = next((r for r in range(n) if any(int(c) in invalid for c in codes[r])), None)
            said = unencodable_id(ids)
            if expected is None:
                assert said is None, (codes, said)
            else:
                col = next(j for j, c in enumerate(codes[expected]) if int(c) in invalid)
                first = int(codes[expected, col])  # the row's first bad code point
                pieces.add(col // checked)
                what = f"(U+{first:04X})" if first <= 0xDFFF else f"{first:#x}, beyond"
                assert said is not None and said.startswith(f"ids[{expected}] = "), (codes, said)
                assert what in said, (codes, said)
                found.add(expected)
    assert len(found) > 5  # first bad rows in several chunks were found
    assert len(pieces) > 1 or width <= checked  # and first bad code points in several pieces of one row
    assert unencodable_id(np.array([], "U3")) is None and unencodable_id(np.array(["", ""])) is None
    assert unencodable_id(np.array([1, 2])) is None
    assert unencodable_id(np.array(["ok", "no\ud800", "x"])[::2]) is None  # a strided view is checked as it is
    assert unencodable_id(np.array(["ok", "x", "no\ud800"])[::2]).startswith("ids[1] = 'no\\ud800'")
    assert unencodable_id(np.array(["ok", "no\ud800"]), first_row=40).startswith("ids[41] = 'no\\ud800'")


def _plant_header(path, descr: str, n: int, size: int, codes: dict | None = None) -> None:
    """Rewrites ids.npy with a crafted header of `descr` (one NumPy never writes, or of any width) for n ids,
    `size` bytes of data (a sparse file) and {(row, column): code point} written at those places."""
    head = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({n},), }}".encode()
    head += b" " * (63 - (10 + len(head)) % 64) + b"\n"
    head = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head
    width = size // (4 * n) if n else 0
    with open(path / "ids.npy", "wb") as f:
        f.write(head)
        for (r, c), code in (codes or {}).items():
            f.seek(len(head) + 4 * (r * width + c))
            f.write(code.to_bytes(4, "little"))
        f.truncate(len(head) + size)


def _peak_bytes(call) -> tuple[int, Exception | None]:
    """The peak of memory traced (NumPy's arrays included) while `call()` runs, and what it raised."""
    error = None
    tracemalloc.start()
    try:
        call()
    except Exception as e:  # noqa: BLE001
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


def test_ids_of_a_huge_width_are_checked_in_bounded_memory(path):
    # review140 F1: a crafted '<U16777216' header makes each id 64 MiB (sparse on disk); the check allocated a
    # whole id's width per piece (a '<U2000000000' one would ask for 8 GB): now at most _CHECKED_CODES code points
    width = 1 << 24
    assert width > 8 * _npy._CHECKED_CODES
    valid = {(r, c): 0xE000 for r in range(6) for c in (0, width - 1)}  # >= U+D800: each piece is checked closely
    _plant_header(path, f"<U{width}", 6, 6 * 4 * width, valid)
    peak, error = _peak_bytes(lambda: tracin.GradientStore.open(path)[2:4].ids)
    assert error is None and peak < 24 << 20, (peak, error)
    assert tracin.GradientStore.open(path).ids[5] == "\ue000" + "\0" * (width - 2) + "\ue000"
    _plant_header(path, f"<U{width}", 6, 6 * 4 * width, {**valid, (4, width - 2): 0xDC00})  # in row 4's last piece
    peak, error = _peak_bytes(lambda: tracin.GradientStore.open(path))
    said = rf"^{path / 'ids.npy'}: ids\[4\] = .* holds a lone surrogate \(U\+DC00\), which UTF-8 cannot encode"
    assert isinstance(error, StoreFormatError) and re.match(said, str(error)) and peak < 24 << 20, (peak, error)


def test_ids_of_width_zero_are_refused_naming_the_file(path):
    # review140 F2: a '<U0' header (NumPy never writes one) opened, since NumPy maps it as '<U1'; .ids then mapped
    # 4 bytes a row from a file holding none: a bare "mmap length is greater than file size"
    _plant_header(path, "<U0", 6, 0)
    said = rf"^{path / 'ids.npy'}: string ids of width 0 \(dtype <U0\)"
    for allow_partial in (False, True):
        with pytest.raises(StoreFormatError, match=said):
            tracin.GradientStore.open(path, allow_partial=allow_partial)
    with pytest.raises(StoreFormatError, match=said + ".*; pass overwrite=True"):  # resume: the spec check reads them
        tracin.GradientStore.create(path, 6, [2], ids=IDS)


def test_string_ids_ending_in_nul_are_refused_at_create_naming_the_row(tmp_path):
    """review150 F1: NumPy's fixed-width strings drop trailing NULs, so "a\\x00" was stored as "a" (equal to the
    next id) and "\\x00" as "". NULs elsewhere in an id are kept."""
    with pytest.raises(ValueError, match=r"ids\[2\] = 'b\\x00' ends with a NUL character.*without trailing NULs"):
        tracin.GradientStore.create(tmp_path / "s", 4, [2], ids=["a", "b", "b\x00", "\x00"])
    with pytest.raises(ValueError, match=r"ids\[1\] = 'b\\x00' ends with a NUL"):  # np.str_'s repr drops them
        tracin.GradientStore.create(tmp_path / "s", 2, [2], ids=[np.str_("a"), np.str_("b\x00")])
    assert not (tmp_path / "s" / "manifest.json").exists()
    ids = ["a\x00b", "\x00c", "d", "e\x00\x00f"]
    w = tracin.GradientStore.create(tmp_path / "kept", 4, [2], ids=ids)
    w.write(0, 0, np.ones((4, 2), np.float32))
    assert w.finalize().ids.tolist() == ids


@pytest.mark.parametrize(
    "ids, said",
    [
        ([10, "b", 12], r"not a mix: ids\[0\] = 10 is an int but ids\[1\] = 'b' is a str"),
        (["a", "b", np.int64(3)], r"not a mix: ids\[0\] = 'a' is a str but ids\[2\] = .*3.* is an int"),
        ([1.5, "b", True], r"ids\[0\] = 1\.5 is of type float"),
        (["a", "b", True], r"ids\[2\] = True is of type bool"),
        ([1, True, 3], r"ids\[1\] = True is of type bool"),  # NumPy makes it an int64 array
        ([1, 2, np.float32(3)], r"ids\[2\] = .*3.* is of type float32"),
        (["a", None, "c"], r"ids\[1\] = None is of type NoneType"),
        ([b"a", b"b", b"c"], r"ids\[0\] = b'a' is of type bytes"),
    ],
)
def test_ids_mixing_types_or_not_int_or_str_are_refused_naming_the_first_offender(tmp_path, ids, said):
    """review165 F1: NumPy made [10, "b", 12] strings, and floats and bools mixed with a str slipped through."""
    accepted = r"ids must be all integers \(int64, or uint64 if none is negative\) or all strings"
    with pytest.raises(TypeError, match=rf"^{accepted}.*{said}$"):
        tracin.GradientStore.create(tmp_path / "s", 3, [2], ids=ids)
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize(
    "ids, said",
    [
        ([2**64, 1, 2], r"ids\[0\] = 18446744073709551616 does not fit in uint64 \(at most 2\*\*64 - 1\)"),
        ([1, -(2**63) - 1, 2], r"ids\[1\] = -9223372036854775809 does not fit in int64$"),
        ([1, 2**63, -1], r"ids\[1\] = 9223372036854775808 does not fit in int64, and ids\[2\] = -1 rules out uint64"),
        ([1, 2, 10**2000], r"ids\[2\] = an integer of 6644 bits does not fit in uint64"),
    ],
)
def test_int_ids_beyond_int64_and_uint64_are_refused_naming_the_first(tmp_path, ids, said):
    """review165 F2: they were refused as "got dtype float64" (or object), though the user gave ints."""
    with pytest.raises(
        ValueError, match=rf"^ids must be all integers \(int64, or uint64 if none is negative\).*{said}"
    ):
        tracin.GradientStore.create(tmp_path / "s", 3, [2], ids=ids)


@pytest.mark.parametrize(
    "ids, dtype",
    [
        ([10, 11, 12], np.int64),
        ((-1, np.int32(5), np.uint8(7)), np.int64),
        (range(3), np.int64),
        ([2**63, 0, 2**64 - 1], np.uint64),  # beyond int64, none negative: NumPy gave float64
        ([np.array(4), np.array(5), np.array(6)], np.int64),  # 0-d arrays
        ([np.uint64(1), np.int64(-1), np.int64(2)], np.int64),  # all fit in int64: NumPy gave float64
        ([np.uint64(1), np.int64(2), np.int64(3)], np.int64),
        (["a", np.str_("b"), "c"], np.str_),
        (np.array([7, 8, 9], np.uint32), np.uint32),
        (np.array(["x", "y", "z"]), np.str_),
    ],
)
def test_homogeneous_int_or_str_ids_round_trip(tmp_path, ids, dtype):
    w = tracin.GradientStore.create(tmp_path / "s", 3, [2], ids=ids)
    w.write(0, 0, np.ones((3, 2), np.float32))
    got = w.finalize().ids
    assert got.dtype.type is dtype
    assert got.tolist() == [x.item() if isinstance(x, np.ndarray) else x for x in ids]


@pytest.mark.parametrize("ids", [np.arange(3, dtype=np.float64), np.array([True, False, True])], ids=["float", "bool"])
def test_an_id_array_of_floats_or_bools_is_refused_at_create_naming_its_dtype(tmp_path, ids):
    """An array's dtype decides (its elements are not looked at): float ids were taken, written, and
    then the store, every row written, could not be finalized or opened (ids.npy holds no ids)."""
    with pytest.raises(TypeError, match=rf"ids must be all integers or all strings, got dtype {ids.dtype}$"):
        tracin.GradientStore.create(tmp_path / "s", 3, [2], ids=ids)
    assert not (tmp_path / "s" / "manifest.json").exists()
