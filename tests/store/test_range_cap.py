"""The bound on JSON arrays and objects in a manifest or progress file (MAX_JSON_CONTAINERS, each
written [start, stop) range one): readers refuse a document past it before parsing it, and writers
refuse to record rows that would take their document past it, writing nothing."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError, _format
from tracin.store._files import read_all

from .helpers import read_rows

CAP = 2**20


def _containers(doc: Any) -> int:
    """Arrays and objects in a parsed JSON document, counted by walking it (the reference)."""
    if isinstance(doc, list):
        return 1 + sum(_containers(x) for x in doc)
    if isinstance(doc, dict):
        return 1 + sum(_containers(x) for x in doc.values())
    return 0


def _depth(doc: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON document (the reference)."""
    if isinstance(doc, (list, dict)):
        return 1 + max(map(_depth, doc.values() if isinstance(doc, dict) else doc), default=0)
    return 0


def _gappy_rows(w: tracin.GradientStoreWriter, c: int, rows: list[int], dim: int = 2) -> None:
    """Writes each row of `rows` alone (value: the row's number), so rows that are not adjacent stay apart."""
    for r in rows:
        w.write(c, r, np.full((1, dim), r, np.float32))


def _no_parsing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the document was parsed")

    monkeypatch.setattr(_format.json, "loads", refuse)


def test_a_manifest_of_more_ranges_than_the_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    # otherwise valid: 2**20 - 4 disjoint ranges [2i, 2i + 1) within n_rows (opened in seconds, hundreds of MiB, before)
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 2**21, [1], dtype="float16").close()  # a sparse 4 MiB data file
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    ranges = ",".join(f"[{2 * i},{2 * i + 1}]" for i in range(CAP - 4))
    manifest.write_text(json.dumps(doc).replace('"written": []', f'"written": [{ranges}]', 1))
    count = _containers(doc) + CAP - 4
    assert count == CAP + 1
    _no_parsing(monkeypatch)
    message = (
        rf"{re.escape(str(manifest))}: corrupt manifest, {count} JSON arrays and objects \(at most {CAP}, each written"
    )
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.open(path, allow_partial=True)
    with pytest.raises(StoreFormatError, match=message):  # resuming it too
        tracin.GradientStore.create(path, 2**21, [1], dtype="float16")
    manifest.unlink()


@pytest.mark.parametrize("spare", [0, -1])
def test_the_cap_counts_every_array_and_object_of_a_manifest(tmp_path, monkeypatch, spare):
    # brackets and escaped quotes inside strings are not counted; the cap itself is accepted, one more refused
    metadata = {"note": 'a "[{" string', "layers": [["a", "]"], {"b": []}], "x\\": "{\\"}
    w = tracin.GradientStore.create(tmp_path / "s", 8, [2, 3], metadata=metadata)
    _gappy_rows(w, 0, [0, 2, 4])
    w.close()
    manifest = tmp_path / "s" / "manifest.json"
    count = _containers(json.loads(manifest.read_text()))
    monkeypatch.setattr(_format, "MAX_JSON_CONTAINERS", count + spare)
    if spare == 0:
        store = tracin.GradientStore.open(tmp_path / "s", allow_partial=True)
        assert store.metadata == metadata
        return
    with pytest.raises(StoreFormatError, match=rf"{count} JSON arrays and objects \(at most {count - 1},"):
        tracin.GradientStore.open(tmp_path / "s", allow_partial=True)


def test_a_progress_file_of_more_ranges_than_the_cap_is_refused_naming_it(tmp_path, monkeypatch):
    spec = dict(n_rows=20, dims=[2])
    tracin.GradientStore.create(tmp_path / "s", **spec).close()
    with tracin.GradientStore.create(tmp_path / "s", **spec, rows=(4, 16)) as r:
        _gappy_rows(r, 0, [4, 6, 8, 10])
    progress = tmp_path / "s" / "rows-4-16.json"
    count = _containers(json.loads(progress.read_text()))
    assert count == 4 + 4  # the document, "rows", "written", the checkpoint's list; 4 ranges
    monkeypatch.setattr(_format, "MAX_JSON_CONTAINERS", count - 1)  # the manifest, of 5, is within it
    message = (
        rf"{re.escape(str(progress))}: corrupt progress file, {count} JSON arrays and objects \(at most {count - 1},"
    )
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.create(tmp_path / "s", **spec, rows=(4, 16))
    with pytest.raises(StoreFormatError, match=message):  # the merge of a writer of the whole store
        tracin.GradientStore.create(tmp_path / "s", **spec)


def test_a_writer_refuses_to_record_rows_past_the_cap_and_writing_the_gaps_gets_past_it(tmp_path, monkeypatch):
    w = tracin.GradientStore.create(tmp_path / "s", 12, [2, 2])
    manifest = tmp_path / "s" / "manifest.json"
    base = _containers(json.loads(manifest.read_text()))  # no range yet
    monkeypatch.setattr(_format, "MAX_JSON_CONTAINERS", base + 4)  # room for 4 ranges in all
    _gappy_rows(w, 0, [0, 2, 4])
    _gappy_rows(w, 1, [0])
    before = manifest.read_bytes()
    message = (
        rf"{re.escape(str(manifest))} would hold {base + 5} JSON arrays and objects, more than the {base + 4} a "
        r"reader accepts .*\(5 disjoint written row ranges over all checkpoints\).*checkpoint 1: rows \[6, 7\)"
    )
    with pytest.raises(ValueError, match=message):
        _gappy_rows(w, 1, [6])
    assert manifest.read_bytes() == before  # nothing written
    assert w.missing(1) == [[1, 12]]  # nor recorded in memory
    _gappy_rows(w, 0, [1, 3])  # [0, 5): one range for checkpoint 0
    _gappy_rows(w, 1, [6])
    assert [json.loads(manifest.read_text())["checkpoints"][c]["written"] for c in (0, 1)] == [
        [[0, 5]],
        [[0, 1], [6, 7]],
    ]
    before = manifest.read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint 1: rows \[8, 9\); checkpoint 1: rows \[10, 11\)"):
        with w.recording_once():  # one record of several rows: refused as a whole, naming them
            _gappy_rows(w, 1, [8, 10])
    assert manifest.read_bytes() == before and w.missing(1) == [[1, 6], [7, 12]]
    w.write(0, 5, np.zeros((7, 2), np.float32))
    w.write(1, 0, np.zeros((12, 2), np.float32))
    first = np.repeat(np.minimum(np.arange(12.0), 5) % 5, 2).reshape(12, 2)  # rows 0..4 hold their number
    left, right = read_rows(w.finalize())
    np.testing.assert_array_equal(left, first)
    np.testing.assert_array_equal(right, np.zeros((12, 2)))


def test_a_range_writer_refuses_to_record_rows_past_the_cap(tmp_path, monkeypatch):
    spec = dict(n_rows=20, dims=[2])
    tracin.GradientStore.create(tmp_path / "s", **spec).close()
    r = tracin.GradientStore.create(tmp_path / "s", **spec, rows=(4, 16))
    _gappy_rows(r, 0, [4])
    progress = tmp_path / "s" / "rows-4-16.json"
    monkeypatch.setattr(_format, "MAX_JSON_CONTAINERS", _containers(json.loads(progress.read_text())) + 1)
    _gappy_rows(r, 0, [6])
    before = progress.read_bytes()
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(progress))} would hold .*\(3 disjoint written row ranges.*rows \[8, 9\)"
    ):
        _gappy_rows(r, 0, [8])
    assert progress.read_bytes() == before and r.missing(0) == [[5, 6], [7, 16]]
    _gappy_rows(r, 0, [5])
    assert json.loads(progress.read_text())["written"] == [[[4, 7]]]
    r.close()


def test_a_merge_past_the_cap_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    # each progress file within the cap, their merge into the manifest not
    spec = dict(n_rows=20, dims=[2])
    tracin.GradientStore.create(tmp_path / "s", **spec).close()
    for start, stop in [(0, 10), (10, 20)]:
        with tracin.GradientStore.create(tmp_path / "s", **spec, rows=(start, stop)) as r:
            _gappy_rows(r, 0, [start, start + 2, start + 4])
    manifest = tmp_path / "s" / "manifest.json"
    monkeypatch.setattr(_format, "MAX_JSON_CONTAINERS", _containers(json.loads(manifest.read_text())) + 5)
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    before = manifest.read_bytes()
    with pytest.raises(ValueError, match=r"would record 6 disjoint written row ranges .*Finish those ranges first"):
        tracin.GradientStore.create(tmp_path / "s", **spec)
    assert manifest.read_bytes() == before and sorted(p.name for p in (tmp_path / "s").iterdir()) == files
    with tracin.GradientStore.create(tmp_path / "s", **spec, rows=(0, 10)) as r:
        _gappy_rows(r, 0, [1, 3])
    w = tracin.GradientStore.create(tmp_path / "s", **spec)  # [0, 5), [10, 11), [12, 13), [14, 15): within it
    assert w.missing(0) == [[5, 10], [11, 12], [13, 14], [15, 20]]
    w.close()


def test_json_shape_counts_as_a_walk_of_the_parsed_document():
    docs: list[Any] = [
        {},
        [],
        {"a": [1, [2, {"b": "[[[{{"}], {}], "c\\": '\\"]', "d": ["\u00e9[", "\U0001f600{"]},
        [[i, i + 1] for i in range(1000)],
    ]
    for doc in docs:
        text = json.dumps(doc, ensure_ascii=False)
        assert _format.json_shape(text) == _format.json_shape(text.encode()) == (_depth(doc), _containers(doc))


@pytest.mark.parametrize("backslashes", range(4))
@pytest.mark.parametrize("quote", [False, True])
@pytest.mark.parametrize("shift", range(-3, 4))
def test_json_shape_is_exact_where_a_run_of_backslashes_meets_a_piece_boundary(backslashes, quote, shift):
    # json_shape looks at 2**20 bytes at a time: the escapes ending a string end at byte 2**20 + shift
    tail = "\\" * backslashes + ('"[' if quote else "")
    prefix, written_tail = '[{"k": ["', json.dumps(tail)[1:-1]
    pad = 2**20 + shift - len(prefix) - len(written_tail)
    doc = [{"k": ["x" * pad + tail, [[]]]}, "[\\", {}]
    text = json.dumps(doc)
    assert text.startswith(prefix + "x" * pad + written_tail + '", [[]]')
    assert _format.json_shape(text.encode()) == (_depth(doc), _containers(doc)) == (5, 6)


@pytest.mark.parametrize(
    "data",
    [b"\\" * 2**23, b'["' + b'\\"[' * 2**21 + b'"]', b'["' + b"\\\\" * 2**22 + b'", []]'],
    ids=["backslashes", "escaped-quotes", "escaped-backslashes"],
)
def test_json_shape_of_8_mib_of_escapes_costs_little_memory(data):
    # what read_all hands it (a bytearray); a pass removing each escape made an object of each (~0.3 GiB here)
    text = bytearray(data)
    tracemalloc.start()
    try:
        shape = _format.json_shape(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20
    if data != b"\\" * 2**23:  # (that one is not JSON)
        doc = json.loads(text)
        assert shape == (_depth(doc), _containers(doc))


@pytest.mark.parametrize("size", [0, 1, 5000, 5001])
def test_read_all_reads_a_file_whole_and_refuses_one_past_its_limit(tmp_path, size):
    path = tmp_path / "f"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        if size > 5000:
            with pytest.raises(StoreFormatError, match="larger than 5000 bytes, refused unread"):
                read_all(fd, 5000, path)
        else:
            assert read_all(fd, 5000, path) == data
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (its files have st_size 0)")
def test_read_all_reads_on_past_the_size_the_file_had_when_opened():
    with open("/proc/self/status", "rb") as f:
        expected = f.read()
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        got = read_all(fd, 1 << 20, Path("/proc/self/status"))
    finally:
        os.close(fd)
    assert got.split(b"\n")[0] == expected.split(b"\n")[0] and len(got) > 100  # (VmRSS... may differ)
