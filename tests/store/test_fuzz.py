"""Fuzzing the parsers of untrusted store input (manifest.json, .npy headers) with Hypothesis: any
input either parses to something consistent or is a StoreFormatError, never another exception.
Bounded (200 examples each, about 10 s of CPU in all) so that it runs with every test run."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracin.store._format import Manifest, StoreFormatError, parse_manifest
from tracin.store._npy import parse_header

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _valid_doc(factored: bool) -> dict:
    dims = [(2, 3), (1, 4)] if factored else [(5,), (7,)]
    m = Manifest(
        n_rows=9,
        dtype="float16",
        factored=factored,
        dims=dims,
        weights=[0.5, -1.0],
        weights_given=True,
        metadata={"layers": ["fc"]},
        has_ids=True,
        written=[[[0, 9]], [[2, 4], [6, 9]]],
        store_id="0123456789abcdef0123456789abcdef",
    )
    return m.to_json()


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _replaced(doc, path, value, delete: bool):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _check_manifest(data: bytes) -> None:
    try:
        m = parse_manifest(data, "fuzzed")
    except StoreFormatError:
        return
    # What parses is consistent: it survives its own round trip unchanged and its ranges are sane.
    assert Manifest.from_json(json.loads(json.dumps(m.to_json())), "again") == m
    for c in range(len(m.dims)):
        assert all(0 <= a < b <= m.n_rows for a, b in m.written[c])
        assert len(m.files[c]) == len(m.dims[c]) == (2 if m.factored else 1)


@FUZZ
@given(factored=st.booleans(), data=st.data())
def test_manifests_with_one_value_changed_or_removed(factored, data):
    doc = _valid_doc(factored)
    path = data.draw(st.sampled_from(list(_paths(doc))))
    value = data.draw(json_values)
    delete = bool(path) and data.draw(st.booleans())
    _check_manifest(json.dumps(_replaced(doc, path, value, delete)).encode())


@FUZZ
@given(doc=json_values)
def test_arbitrary_json_documents(doc):
    _check_manifest(json.dumps(doc).encode())


@FUZZ
@given(factored=st.booleans(), edits=st.lists(st.tuples(st.integers(0, 2000), st.binary(max_size=3)), max_size=4))
def test_manifest_bytes_with_random_edits(factored, edits):
    data = bytearray(json.dumps(_valid_doc(factored), indent=2).encode())
    for at, new in edits:
        at %= len(data) + 1
        data[at : at + len(new)] = new
    _check_manifest(bytes(data))


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_manifest_bytes(data):
    _check_manifest(data)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


npy_dtypes = st.sampled_from([np.dtype(t) for t in ("<f4", "<f2", "<u2", "<i8", "<U7", ">f8")])
npy_shapes = st.lists(st.integers(0, 2**40), max_size=3).map(tuple)


@FUZZ
@given(dtype=npy_dtypes, shape=npy_shapes)
def test_valid_npy_headers_parse_as_numpy_reads_them(dtype, shape):
    head = _npy_header(dtype, shape)
    f = io.BytesIO(head)
    np.lib.format.read_magic(f)
    expected = np.lib.format.read_array_header_1_0(f)
    assert parse_header(head + b"\0" * 16, "x") == (expected[2], tuple(expected[0]), expected[1], len(head))
    assert len(head) % 64 == 0 and parse_header(head, "x")[:2] == (dtype, shape)


@FUZZ
@given(
    dtype=npy_dtypes,
    shape=npy_shapes,
    edits=st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=3)), min_size=1, max_size=4),
)
def test_npy_headers_with_random_edits(dtype, shape, edits):
    head = bytearray(_npy_header(dtype, shape))
    for at, new in edits:
        at %= len(head)
        head[at : at + len(new)] = new
    try:
        found_dtype, found_shape, fortran, offset = parse_header(bytes(head), "x")
    except StoreFormatError:
        return
    assert isinstance(found_dtype, np.dtype) and isinstance(fortran, bool) and 10 <= offset <= len(head)
    assert all(isinstance(n, int) for n in found_shape)


@FUZZ
@given(version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x09"]), text=st.text(max_size=200))
def test_npy_headers_with_arbitrary_dictionary_text(version, text):
    body = text.encode("utf-8")
    size = struct.pack("<H" if version == b"\x01\x00" else "<I", len(body))
    try:
        parse_header(b"\x93NUMPY" + version + size + body, "x")
    except StoreFormatError:
        pass
