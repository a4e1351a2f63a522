"""GradientStoreWriter: round trips, progress, resume, spec checks, bad input."""

import errno
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import tracin
from tracin.store import GradientStoreWriter, StoreChangedError, _convert, describe
from tracin.store._convert import BeyondRangeError, NonFiniteError

from .helpers import random_blocks, read_rows, write_store

DTYPES = ["float32", "float16", "bfloat16"]
NAMES = ("the gradients", "the left factors", "the right factors")  # an owner's names (word_low_precision)


def _disk(x: np.ndarray, dtype: str) -> np.ndarray:
    """What `x` should look like on disk in `dtype` (reference cast via ml_dtypes)."""
    out = (
        np.asarray(x)
        .astype(np.float32)
        .astype({"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype])
    )
    return out.view(np.uint16) if dtype == "bfloat16" else out


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", DTYPES)
def test_round_trip_every_dtype_and_mode(tmp_path, dtype, source, factored):
    dims = [(3, 4), (2, 5)] if factored else [6, 9]
    blocks = random_blocks(23, dims, source, factored)
    store = write_store(tmp_path / "s", blocks, [0.5, 0.25], dtype, factored)
    flat = [a for b in blocks for a in (b if factored else [b])]
    got = read_rows(store)
    assert len(got) == len(flat)
    for ours, x in zip(got, flat, strict=True):
        np.testing.assert_array_equal(ours, _disk(x, dtype))
    assert store.n_rows == 23 and store.dtype == dtype and store.factored == factored
    assert store.dims == (((3, 4), (2, 5)) if factored else (6, 9))
    np.testing.assert_array_equal(store.weights, [0.5, 0.25])
    assert store.complete


def test_the_files_are_plain_npy_that_numpy_loads(tmp_path):
    blocks = random_blocks(10, [4, 3], "float16", False)
    write_store(tmp_path / "s", blocks, dtype="float16", ids=[f"ex{i}" for i in range(10)])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for entry, b in zip(manifest["checkpoints"], blocks, strict=True):
        np.testing.assert_array_equal(np.load(tmp_path / "s" / entry["file"]), b)
    assert np.load(tmp_path / "s" / "ids.npy").tolist() == [f"ex{i}" for i in range(10)]


def test_rows_done_tracks_the_written_prefix_and_out_of_order_writes(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 10, [2, 2])
    block = np.ones((3, 2), np.float32)
    w.write(0, 3, block)
    assert w.rows_done(0) == 0 and w.missing(0) == [[0, 3], [6, 10]]
    w.write(0, 0, block)
    assert w.rows_done(0) == 6
    w.write(0, 5, np.ones((5, 2), np.float32))  # overlaps what is written
    assert w.rows_done(0) == 10 and w.rows_done(1) == 0 and not w.complete
    with pytest.raises(ValueError, match=r"checkpoint 1: rows \[0, 10\)"):
        w.finalize()
    w.write(1, 0, np.ones((10, 2), np.float32))
    assert w.complete
    assert w.finalize().complete


def _runs(covered: np.ndarray) -> list[list[int]]:
    """The [start, stop) runs of True in `covered` (a naive sorted merge of the rows written)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], covered.astype(np.int8), [0]])))
    return edges.reshape(-1, 2).tolist()


def test_shuffled_writes_record_the_ranges_a_sorted_merge_gives(tmp_path):
    # blocks in random order (a shuffled DataLoader writing by dataset index), overlapping and rewriting
    # rows, some recorded together (recording_once): the manifest and missing() hold the merged ranges
    rng = np.random.default_rng(3)
    n, dims = 90, [3, 2]
    w = tracin.GradientStore.create(tmp_path / "s", n, dims)
    expected = [np.zeros((n, d), np.float32) for d in dims]
    covered = np.zeros((2, n), bool)

    def write(c: int, a: int, b: int) -> None:
        block = rng.standard_normal((b - a, dims[c])).astype(np.float32)
        w.write(c, a, block)
        expected[c][a:b], covered[c, a:b] = block, True

    for k in range(60):
        c, a = int(rng.integers(0, 2)), int(rng.integers(0, n))
        b = min(n, a + int(rng.integers(1, 4)))
        if k % 10 == 9:
            with w.recording_once():
                write(c, a, b)
                write(1 - c, n - b, n - a)
        else:
            write(c, a, b)
        written = json.loads((tmp_path / "s" / "manifest.json").read_text())["checkpoints"]
        assert [e["written"] for e in written] == [_runs(covered[c]) for c in range(2)]
        assert [w.missing(c) for c in range(2)] == [_runs(~covered[c]) for c in range(2)]
    assert max(len(_runs(covered[c])) for c in range(2)) > 10  # many disjoint ranges at once
    w.close()
    w = tracin.GradientStore.create(tmp_path / "s", n, dims)  # the manifest reads back as written
    assert [w.missing(c) for c in range(2)] == [_runs(~covered[c]) for c in range(2)]
    for c in range(2):
        gaps = _runs(~covered[c])
        for i in rng.permutation(len(gaps)):
            write(c, *gaps[i])
    for got, want in zip(read_rows(w.finalize()), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_reopening_an_unfinished_store_resumes_it(tmp_path):
    blocks = random_blocks(12, [3], "float32", False)
    w = tracin.GradientStore.create(tmp_path / "s", 12, [3], [0.1], metadata={"layers": ["fc"]})
    w.write(0, 0, blocks[0][:5])
    w.close()
    w = tracin.GradientStore.create(tmp_path / "s", 12, [3], [0.1], metadata={"layers": ["fc"]})
    assert w.rows_done(0) == 5 and not w.complete
    w.write(0, 5, blocks[0][5:])
    store = w.finalize()
    np.testing.assert_array_equal(read_rows(store)[0], blocks[0])
    assert store.metadata == {"layers": ["fc"]}


def test_reopening_a_finished_store_gives_a_complete_writer(tmp_path):
    write_store(tmp_path / "s", random_blocks(5, [2], "float32", False))
    w = tracin.GradientStore.create(tmp_path / "s", 5, [2])
    assert w.complete and w.rows_done(0) == 5
    with pytest.raises(ValueError, match="is finalized"):
        w.write(0, 0, np.zeros((1, 2), np.float32))
    assert w.finalize().n_rows == 5


@pytest.mark.parametrize("failing", ["write_json_atomic", "fsync_dir"])
def test_finalize_retried_after_its_manifest_write_failed_finishes_the_store(tmp_path, monkeypatch, failing):
    import tracin.store._writer as writer_module

    w = tracin.GradientStore.create(tmp_path / "s", 4, [2])
    w.write(0, 0, np.ones((4, 2), np.float32))
    real = getattr(writer_module, failing)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, failing, disk_full)
    with pytest.raises(OSError, match="No space left"):
        w.finalize()
    monkeypatch.setattr(writer_module, failing, real)
    w.write(0, 0, np.full((4, 2), 2, np.float32))  # still a writer: not finalized by the failed call
    store = w.finalize()
    assert store.complete and tracin.GradientStore.open(tmp_path / "s").complete
    np.testing.assert_array_equal(read_rows(store)[0], np.full((4, 2), 2))


def test_a_different_spec_names_what_differs(tmp_path):
    tracin.GradientStore.create(tmp_path / "s", 5, [2, 3], [1.0, 2.0], "float16").close()
    differs = r"dtype 'float16' there vs 'float32' here; dims \[2, 3\] there vs \[2, 4\] here"
    with pytest.raises(ValueError, match=differs) as e:
        tracin.GradientStore.create(tmp_path / "s", 5, [2, 4], [1.0, 2.0], "float32")
    assert "overwrite=True" in str(e.value)
    for kwargs, what in [
        ({"weights": [1.0, 3.0]}, "weights"),
        ({"weights": None}, "weights"),
        ({"n_rows": 6}, "n_rows"),
        ({"metadata": {"a": 1}}, "metadata"),
        ({"ids": list(range(5))}, "ids"),
    ]:
        args = {"n_rows": 5, "dims": [2, 3], "weights": [1.0, 2.0], "dtype": "float16", **kwargs}
        with pytest.raises(ValueError, match=what):
            tracin.GradientStore.create(tmp_path / "s", **args)
    with pytest.raises(ValueError, match="mode 'full' there vs 'factored' here"):
        tracin.GradientStore.create(tmp_path / "s", 5, [(1, 2), (1, 3)], [1.0, 2.0], "float16", factored=True)


def test_overwrite_replaces_the_old_store(tmp_path):
    write_store(tmp_path / "s", random_blocks(5, [2, 3], "float32", False), ids=list(range(5)))
    w = tracin.GradientStore.create(tmp_path / "s", 4, [7], dtype="bfloat16", overwrite=True)
    assert w.rows_done(0) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["checkpoint_000.npy", "manifest.json", "writer.info"]
    w.close()  # the writer's record (writer.info) goes with it
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["checkpoint_000.npy", "manifest.json"]


def test_refuses_a_directory_that_holds_other_things(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not empty and not a gradient store \(holds notes.txt\)"):
            tracin.GradientStore.create(tmp_path, 5, [2], overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        tracin.GradientStore.create(tmp_path / "file", 5, [2])


def test_leftovers_of_an_interrupted_create_are_replaced(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "create-in-progress").write_bytes(b"")  # the marker create() leaves first
    (tmp_path / "s" / "checkpoint_000.npy").write_bytes(b"half a header")
    (tmp_path / "s" / "manifest.json.tmp").write_bytes(b"{")
    w = tracin.GradientStore.create(tmp_path / "s", 3, [2])
    w.write(0, 0, np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(read_rows(w.finalize())[0], np.ones((3, 2)))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["checkpoint_000.npy", "manifest.json"]


def test_one_writer_at_a_time(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 3, [2])
    with pytest.raises(RuntimeError, match="being written by another writer"):
        tracin.GradientStore.create(tmp_path / "s", 3, [2])
    w.close()
    with tracin.GradientStore.create(tmp_path / "s", 3, [2]) as again:
        assert isinstance(again, GradientStoreWriter)
    with pytest.raises(ValueError, match="writer of .* is closed"):
        again.write(0, 0, np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="writer of .* is closed"):
        again.finalize()


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((0, [2]), {}, ValueError, "n_rows must be a positive integer"),
        ((3, []), {}, ValueError, "dims must be a non-empty list"),
        ((3, [0]), {}, ValueError, r"dims\[0\] must be a positive integer d_c"),
        ((3, [2]), {"factored": True}, ValueError, r"dims\[0\] must be a \(p_c, q_c\) pair"),
        ((3, [2, 3], [1.0]), {}, ValueError, "weights: expected one per checkpoint"),
        ((3, [2], None, "float64"), {}, ValueError, "dtype must be 'float32', 'float16' or 'bfloat16'"),
        ((3, [2]), {"ids": [1, 2]}, ValueError, "ids must be a 1-D sequence of 3 entries"),
        ((3, [2]), {"ids": [1.5, 2, 3]}, TypeError, r"ids must be all integers .* or all strings: ids\[0\] = 1\.5"),
        ((3, [2]), {"metadata": {"x": object()}}, TypeError, r"metadata: the value at \['x'\] is of type object"),
        ((3, [2]), {"metadata": [1]}, TypeError, "metadata must be a dict"),
    ],
)
def test_create_rejects_bad_arguments(tmp_path, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        tracin.GradientStore.create(tmp_path / "s", *args, **kwargs)


def test_create_takes_numpy_spellings_of_dtype_and_dims(tmp_path):
    """review300 F4: dtype=np.float16 or an array's dtype, and dims as an array, were refused ("dtype must be
    ... 'float16', got dtype('float16')"); np.int64 is still refused by its name."""
    for i, dtype in enumerate((np.float16, np.dtype("float16"), np.zeros(1, np.float16).dtype)):
        w = tracin.GradientStore.create(tmp_path / f"s{i}", 3, np.array([2, 4]), dtype=dtype)
        assert list(w.dims) == [2, 4] and w.dtype == "float16"
        w.close()
    with pytest.raises(ValueError, match="dtype must be 'float32', 'float16' or 'bfloat16', got 'int64'"):
        tracin.GradientStore.create(tmp_path / "i", 3, [2], dtype=np.int64)
    with pytest.raises(
        ValueError, match="dtype must be 'float32', 'float16' or 'bfloat16', got <class 'numpy.floating'>"
    ):
        tracin.GradientStore.create(tmp_path / "f", 3, [2], dtype=np.floating)  # abstract: no dtype of its own


def test_metadata_with_numpy_values_round_trips_as_json(tmp_path):
    meta = {"projection": {"dim": np.int64(8), "seed": 0}, "lr": np.array([0.1, 0.2])}
    w = tracin.GradientStore.create(tmp_path / "s", 1, [1], metadata=meta)
    w.write(0, 0, np.ones((1, 1), np.float32))
    assert w.finalize().metadata == {"projection": {"dim": 8, "seed": 0}, "lr": [0.1, 0.2]}
    # The same metadata resumes the same store.
    assert tracin.GradientStore.create(tmp_path / "s", 1, [1], metadata=meta).complete


def test_metadata_holding_itself_is_json_circular_reference_error(tmp_path):
    """The walk naming where metadata is not JSON followed the cycle into a RecursionError."""
    metadata: dict = {}
    metadata["a"] = metadata
    with pytest.raises(ValueError, match="^metadata: Circular reference detected$"):
        tracin.GradientStore.create(tmp_path / "s", 3, [2], metadata=metadata)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "metadata, error, message",
    [
        ({"x": float("nan")}, ValueError, r"the value at \['x'\] is nan; JSON holds finite numbers only"),
        ({"a": {"x": np.array([1.0, np.inf])}}, ValueError, r"the value at \['a'\]\['x'\] is array\(\[ 1., inf\]\)"),
        ({"a": [1, {"b": np.float32("-inf")}]}, ValueError, r"the value at \['a'\]\[1\]\['b'\] is np.float32\(-inf\)"),
        ({(1, 2): 3}, TypeError, r"key \(1, 2\) at the top level is of type tuple; JSON keys must be str"),
        ({"a": {np.int64(1): 3}}, TypeError, r"key np.int64\(1\) at \['a'\] is of type numpy.int64; JSON keys"),
        ({np.True_: 1}, TypeError, r"key np.True_ at the top level is of type numpy.bool; JSON keys must be str"),
        ({"a": {float("nan"): 3}}, ValueError, r"key nan at \['a'\] is not a finite number"),
        ({"a": [{1, 2}]}, TypeError, r"the value at \['a'\]\[0\] is of type set \(\{1, 2\}\), not JSON-serialisable"),
    ],
)
def test_metadata_json_cannot_hold_is_named_where_it_is(tmp_path, metadata, error, message):
    """json's own errors ('Out of range float values are not JSON compliant', 'keys must be str, ...')
    named neither metadata nor the key."""
    with pytest.raises(error, match="^metadata: " + message):
        tracin.GradientStore.create(tmp_path / "s", 3, [2], metadata=metadata)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "n_rows, dims, factored, shown",
    [
        (2**62, [1024], False, "dims\\[0\\]=1024"),
        (2**31, [2**31], False, f"dims\\[0\\]={2**31}"),
        (2**40, [4, 2**23], False, f"dims\\[1\\]={2**23}"),
        (2**31, [(1, 2**31)], True, f"dims\\[0\\]=\\(1, {2**31}\\)"),
    ],
)
def test_a_store_whose_files_would_exceed_the_largest_file_is_refused_before_any_file(
    tmp_path, n_rows, dims, factored, shown
):
    """n_rows x d x itemsize beyond 2**63 bytes was a bare OverflowError from ftruncate, after the first
    files were made."""
    with pytest.raises(
        ValueError, match=f"^n_rows={n_rows} with {shown} makes a float32 data file of .* bytes: beyond"
    ):
        tracin.GradientStore.create(tmp_path / "s", n_rows, dims, factored=factored)
    assert not (tmp_path / "s").exists()


def test_a_writer_left_open_at_exit_is_silent(tmp_path):
    """A writer never closed, collected at interpreter exit after the modules' globals are gone (with
    jax imported, as in a JAX export script), printed 'Exception ignored in GradientStoreWriter.__del__
    ... TypeError'; its rows stay recorded for a resume."""
    pytest.importorskip("jax")
    script = (
        "import numpy as np, jax, tracin\n"
        f"w = tracin.GradientStore.create({str(tmp_path / 's')!r}, 4, [2])\n"
        "w.write(0, 0, np.ones((2, 2), np.float32))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    with tracin.GradientStore.create(tmp_path / "s", 4, [2]) as again:
        assert again.rows_done(0) == 2


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda w: w.write(2, 0, np.ones((1, 3), np.float32)),
            ValueError,
            r"checkpoint must be an integer in \[0, 2\)",
        ),
        (lambda w: w.write(0, -1, np.ones((1, 3), np.float32)), ValueError, "start must be a non-negative integer"),
        (lambda w: w.write(0, 4, np.ones((2, 3), np.float32)), ValueError, r"rows \[4, 6\) exceed the store's 5 rows"),
        (lambda w: w.write(0, 9, np.ones((0, 3), np.float32)), ValueError, "start 9 is past the end of the store's 5"),
        (
            lambda w: w.write(1, 0, np.ones((1, 3), np.float32)),
            ValueError,
            "block has 3 columns but checkpoint 1 has 4",
        ),
        (lambda w: w.write(0, 0, np.ones((1, 3))), TypeError, "block has dtype float64"),
        (lambda w: w.write(0, 0, np.ones(3, np.float32)), ValueError, "block must be 2-D"),
        (lambda w: w.rows_done(-1), ValueError, "checkpoint must be an integer"),
    ],
)
def test_write_rejects_bad_blocks(tmp_path, call, error, message):
    w = tracin.GradientStore.create(tmp_path / "s", 5, [3, 4])
    with pytest.raises(error, match=message):
        call(w)
    assert w.rows_done(0) == 0


def test_factored_write_rejects_bad_pairs(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 5, [(2, 3)], factored=True)
    with pytest.raises(TypeError, match=r"\(left, right\) pair"):
        w.write(0, 0, np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="left has 2 rows but right has 1"):
        w.write(0, 0, (np.ones((2, 2), np.float32), np.ones((1, 3), np.float32)))
    with pytest.raises(ValueError, match="right has 4 columns but checkpoint 0 has 3"):
        w.write(0, 0, (np.ones((1, 2), np.float32), np.ones((1, 4), np.float32)))


def test_an_empty_path_is_refused_naming_the_argument_not_taken_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (
        lambda: tracin.GradientStore.create("", 2, [2]),
        lambda: tracin.GradientStore.create("", 2, [2], overwrite=True),
        lambda: tracin.GradientStore.create("", 2, [2], rows=(0, 1)),
    ):
        with pytest.raises(ValueError, match=r"^path must name a gradient store folder, got '' \(an empty path"):
            call()
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder
    write_store(tmp_path / "s", random_blocks(2, [2], "float32", False))
    monkeypatch.chdir(tmp_path / "s")  # a store is there: "" still does not open it
    for call in (lambda: tracin.GradientStore.open(""), lambda: describe("")):
        with pytest.raises(ValueError, match=r"^path must name a gradient store folder, got ''"):
            call()
    assert tracin.GradientStore.open(".").n_rows == 2  # the current folder, asked for


def test_string_ids_that_utf8_cannot_encode_are_refused_naming_the_row(tmp_path):
    """A lone surrogate could be stored but not written out by tracin score / self-influence."""
    with pytest.raises(ValueError, match=r"^ids\[2\] = 'b\\ud800' holds a lone surrogate"):
        tracin.GradientStore.create(tmp_path / "s", 3, [2], ids=["é", "中", "b\ud800"])
    assert not (tmp_path / "s" / "manifest.json").exists()
    w = tracin.GradientStore.create(tmp_path / "t", 2, [2], ids=["é", "👨\u200d👩\u200d👧"])
    w.write(0, 0, np.ones((2, 2), np.float32))
    assert w.finalize().ids.tolist() == ["é", "👨\u200d👩\u200d👧"]


@pytest.mark.parametrize("rows", [None, (0, 1200)], ids=["whole-store writer", "range writer"])
def test_one_writer_shared_by_threads_records_every_block(tmp_path, rows):
    """Four threads writing disjoint blocks through one writer all succeed, and the store equals one
    written block by block in one thread (review88 F2: most writes failed on manifest.json.tmp)."""
    import threading

    n, dims = 1200, [24, 16]
    rng = np.random.default_rng(0)
    blocks = {(c, s): rng.standard_normal((20, dims[c]), dtype=np.float32) for c in range(2) for s in range(0, n, 20)}
    spec = dict(n_rows=n, dims=dims, weights=[0.1, 0.05], dtype="float16")
    with tracin.GradientStore.create(tmp_path / "seq", **spec) as w:
        for (c, s), b in blocks.items():
            w.write(c, s, b)
        w.finalize()
    if rows is not None:
        tracin.GradientStore.create(tmp_path / "thr", **spec).close()
    shared = tracin.GradientStore.create(tmp_path / "thr", **spec, **({} if rows is None else {"rows": rows}))
    start, errors = threading.Barrier(4), []

    def work(t):
        start.wait()
        try:
            for (c, s), b in blocks.items():
                if s // 20 % 4 == t:
                    shared.write(c, s, b)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert shared.complete and [shared.missing(c) for c in range(2)] == [[], []]
    shared.close()
    with tracin.GradientStore.create(tmp_path / "thr", **spec) as w:  # merges a range writer's progress
        assert w.complete
        w.finalize()
    data = sorted(p.name for p in (tmp_path / "seq").glob("*.npy"))
    assert len(data) == 2 and data == sorted(p.name for p in (tmp_path / "thr").glob("*.npy"))
    for name in data:
        assert (tmp_path / "thr" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes()


@pytest.mark.parametrize("code", [errno.EFBIG], ids=["EFBIG"])
def test_a_data_file_the_file_system_refuses_is_named_with_its_size(tmp_path, monkeypatch, code):
    """EFBIG (a file system's largest file is smaller) while sizing a data file names the file and its size
    in bytes, and what to do (review88 F4: '[Errno 27] File too large, while setting its size'). A full
    disk (ENOSPC) has its own advice: test_a_full_disk_at_create_says_to_free_space."""
    import os

    def refuse(fd, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "ftruncate", refuse)
    size = 128 + 1000 * 300 * 2  # the .npy header and 1000 x 300 float16 values
    with pytest.raises(OSError) as info:
        tracin.GradientStore.create(tmp_path / "s", n_rows=1000, dims=[300], dtype="float16")
    assert info.value.errno == code and info.value.filename == str(tmp_path / "s" / "checkpoint_000.npy")
    assert f"a data file of {size} bytes: n_rows=1000 x 300 float16 values" in str(info.value)
    assert "split the rows between stores" in str(info.value)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "s")) == ["checkpoint_000.npy", "create-in-progress"]
    with tracin.GradientStore.create(tmp_path / "s", n_rows=1000, dims=[300], dtype="float16") as w:  # redone
        assert w.missing(0) == [[0, 1000]]


def _tiny_rows(rows: int, d: int, seed: int = 0) -> np.ndarray:
    """Normal-size rows, but for row 2 (all about 1e-6: float16 subnormals) and row 5 (all at most 2.5e-8:
    float16 zeros); row 7 is all zero (nothing to lose)."""
    x = np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)
    x[2] *= 1e-6
    x[5] = np.linspace(-2.5e-8, 2.5e-8, d)
    x[7] = 0.0
    return x


@pytest.mark.parametrize("factored", [False, True])
def test_a_float16_store_warns_once_per_writer_of_rows_left_below_its_normal_range(tmp_path, factored):
    """review94 F1: rows whose values all lie below float16's smallest normal (2**-14) were stored as
    subnormals or zeros without a word (gradients ~1e-8: every row zero, self-influence 0). The writer
    warns at its first such block, naming the store, the rows, how many became zero and bfloat16, at the
    caller's line; its other writes are silent, a writer of the store opened again warns again. Rows of
    normal size (and rows of zeros) are silent, and a bfloat16 store keeps such rows."""
    dims = [(3, 8)] * 2 if factored else [8, 8]
    normal = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    tiny = _tiny_rows(10, 8)
    below = np.abs(tiny.astype(np.float16)).max(1) < np.finfo(np.float16).smallest_normal  # the reference
    assert np.flatnonzero(below).tolist() == [2, 5, 7] and not tiny[5].astype(np.float16).any()
    pair = lambda x: (normal[:, :3], x) if factored else x  # noqa: E731  (the right factor holds the tiny rows)
    name = "block\\[1\\] \\(the right factor\\)" if factored else "block"
    w = tracin.GradientStore.create(tmp_path / "s", 20, dims, dtype="float16", factored=factored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.write(0, 0, pair(normal))
    message = (
        rf"^gradient store {tmp_path / 's'}: 2 of the 10 rows of {name} \(rows 10 to 19 of checkpoint 0\) hold only "
        rf"values below float16's smallest normal number, 6.1e-05, in magnitude \(the largest: "
        rf"{np.abs(tiny[2]).max():.3g}\), .*; 1 of them became all zero \(it scores 0\); use dtype=\"bfloat16\" "
        r"\(nearly float32's range, up to 3\.39e38, in 16 bits\) or dtype=\"float32\" for such gradients, in a new "
        r"store \(a store keeps the "
        r"dtype it was created with\); this writer warns once and does not check later rows$"
    )
    with pytest.warns(RuntimeWarning, match=message) as caught:
        w.write(0, 10, pair(tiny))
    assert len(caught) == 1 and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.write(1, 0, pair(tiny))
        w.write(1, 10, pair(tiny))
    w.close()
    w = tracin.GradientStore.create(tmp_path / "s", 20, dims, dtype="float16", factored=factored)
    with pytest.warns(RuntimeWarning, match="rows 0 to 9 of checkpoint 1"):
        w.write(1, 0, pair(tiny))
    stored = read_rows(w.finalize())
    np.testing.assert_array_equal(stored[-1][10:], tiny.astype(np.float16))  # written all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16 = tracin.GradientStore.create(tmp_path / "b", 10, dims[:1], dtype="bfloat16", factored=factored)
        bf16.write(0, 0, pair(tiny))
    kept = read_rows(bf16.finalize())[-1]
    np.testing.assert_array_equal(kept, _disk(tiny, "bfloat16"))
    assert kept[5].any()


class _MeetingNumpy:
    """numpy, except that flatnonzero (LowPrecisionRows.check's scan, between its look at `warned` and
    its warning) waits until `parties` threads are there: every thread has scanned before any warns."""

    def __init__(self, parties: int):
        self._barrier = threading.Barrier(parties, timeout=5)

    def __getattr__(self, name: str):
        return getattr(np, name)

    def flatnonzero(self, a):
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:  # a thread that never scans (warned already): go on
            pass
        return np.flatnonzero(a)


def test_threads_sharing_a_float16_writer_get_one_low_precision_warning(tmp_path, monkeypatch):
    """review102 F4: LowPrecisionRows looked at `warned`, scanned, then set it, so threads writing tiny
    float16 blocks through one writer (a supported use since 4af6a87) warned once each (up to 8 of 8).
    The threads now meet inside the scan (deterministic), and the writer still warns exactly once."""
    n_threads, rows, d = 8, 4, 16
    blocks = [np.full((rows, d), 1e-7 * (i + 1), np.float32) for i in range(n_threads)]
    for trial in range(3):
        monkeypatch.setattr(_convert, "np", _MeetingNumpy(n_threads))
        w = tracin.GradientStore.create(tmp_path / f"s{trial}", n_threads * rows, [d], dtype="float16")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ThreadPoolExecutor(n_threads) as pool:
                list(pool.map(w.write, [0] * n_threads, range(0, n_threads * rows, rows), blocks))
        monkeypatch.setattr(_convert, "np", np)
        low = [c for c in caught if "smallest normal number" in str(c.message)]
        assert len(low) == 1, [str(c.message)[:120] for c in low]
        assert issubclass(low[0].category, RuntimeWarning)
        stored = read_rows(w.finalize())[0]
        np.testing.assert_array_equal(stored, np.concatenate(blocks).astype(np.float16))  # all written


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("dtype, big", [("float16", 7e4), ("float16", -65520.0), ("bfloat16", 3.4e38)])
def test_values_beyond_the_store_dtype_are_refused_in_the_writer_s_words(tmp_path, dtype, big, factored):
    """review94 F2: the refusal said neither the store, nor that nothing was written, nor that the store's
    dtype is fixed ('store them as float32' needs a new store), as the NaN / Inf refusal does, and its
    cutoff '|x| > 65504' was not the one applied (65519 is kept, as 65504). Rows are numbered in the store."""
    dims = [(2, 3)] if factored else [3]
    w = tracin.GradientStore.create(tmp_path / "s", 9, dims, dtype=dtype, factored=factored)
    ok = np.ones((4, 3), np.float32)
    bad = ok.copy()
    bad[2, 1] = big
    block = (ok[:, :2], bad) if factored else bad
    name = r"block\[1\] \(the right factor\)" if factored else "block"
    cutoff = {"float16": "65520 rounds beyond 65504", "bfloat16": "3.3961775e\\+38 rounds beyond 3.3895314e\\+38"}
    wider = 'dtype="float32" or dtype="bfloat16"' if dtype == "float16" else 'dtype="float32"'
    message = (
        rf"^gradient store {tmp_path / 's'}: {name} holds float32 values beyond the {dtype} range \(\|x\| >= "
        rf"{cutoff[dtype]}\), first in row 7 of checkpoint 0; nothing of this write was stored, and a store keeps "
        rf"the dtype it was created with \({dtype}\): to store such values, create a new store with {wider} "
        r"\(at another path, or with overwrite=True\)$"
    )
    with pytest.raises(BeyondRangeError, match=message) as e:
        w.write(0, 5, block)
    assert (e.value.row, e.value.source, e.value.dtype) == (2, "float32", dtype)  # row in the block, as sinks read it
    assert w.rows_done(0) == 0 and w.missing(0) == [[0, 9]]
    assert all(not np.load(f).any() for f in (tmp_path / "s").glob("*.npy"))  # the data files are as created
    if dtype == "float16":  # just below the cutoff: kept, as the largest float16
        bad[2, 1] = np.copysign(np.nextafter(np.float32(65520), np.float32(0)), big)
        w.write(0, 5, block)
        w.write(0, 0, (np.ones((5, 2), np.float32), np.ones((5, 3), np.float32)) if factored else ok[:1].repeat(5, 0))
        np.testing.assert_array_equal(read_rows(w.finalize())[-1][7], [1, np.copysign(65504, big), 1])
    else:
        w.close()


def test_an_owner_s_words_name_the_checkpoint_and_block_of_both_refusals(tmp_path):
    """review102 F6: word_low_precision says the refusals name blocks and checkpoints in the owner's words,
    but values beyond the range were named "of checkpoint {c}" whatever checkpoint_text said; NaN / Inf
    used checkpoint_text. Both now use the owner's checkpoint_text and names."""
    w = tracin.GradientStore.create(tmp_path / "s", 8, [3, 3], dtype="float16")
    w.word_low_precision("dtype='float16'", "advice", lambda c: f"checkpoint {c // 2} (factor pair {c % 2})", NAMES)
    big = np.ones((2, 3), np.float32)
    big[1, 2] = 1e5
    with pytest.raises(
        BeyondRangeError,
        match=r": the gradients holds float32 .*, first in row 5 of checkpoint 0 "
        r"\(factor pair 1\); nothing",
    ):
        w.write(1, 4, big)
    nan = np.ones((2, 3), np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(
        NonFiniteError,
        match=r": the gradients holds NaN or Inf values in row 4 of checkpoint 0 "
        r"\(factor pair 1\); nothing",
    ):
        w.write(1, 4, nan)
    w.close()


@pytest.mark.parametrize("rows", [None, (0, 8)], ids=["whole store", "range writer"])
def test_an_interrupt_right_after_the_record_is_replaced_loses_no_recorded_rows(tmp_path, monkeypatch, rows):
    # KeyboardInterrupt between write_json_atomic's os.replace and the writer's own bookkeeping: the
    # rows are on disk and recorded, so the next record must keep them
    import tracin.store._files as files

    if rows is not None:
        tracin.GradientStore.create(tmp_path / "s", 8, [2]).close()
    writer = tracin.GradientStore.create(tmp_path / "s", 8, [2], **({} if rows is None else {"rows": rows}))
    writer.write(0, 0, np.ones((2, 2), np.float32))
    real = files.os.replace

    def replace_then_interrupt(a, b):
        real(a, b)
        monkeypatch.setattr(files.os, "replace", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        writer.write(0, 2, np.ones((2, 2), np.float32))
    writer.write(0, 6, np.ones((2, 2), np.float32))
    writer.close()
    assert writer.missing(0) == [[4, 6]]
    reopened = tracin.GradientStore.create(tmp_path / "s", 8, [2])  # merges a range writer's progress
    assert reopened.missing(0) == [[4, 6]]
    reopened.close()


class _FileSystem:
    """What os.statvfs returns, for a file system of `total` bytes of which `free` are free."""

    def __init__(self, total: int, free: int):
        self.f_frsize, self.f_blocks, self.f_bavail = 512, total // 512, free // 512


@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("total", [10**9, 512 * 1024], ids=["room", "too-small"])
def test_a_full_disk_at_create_says_to_free_space(tmp_path, monkeypatch, code, total):
    """ENOSPC while making a store's files says the disk is full, how many bytes the store's files take and
    how many are free, and to free space and create again; not the advice for a file too big for the file
    system (split the rows, project), unless the whole file system is smaller than the store (review117 F3).
    EDQUOT says the quota is exceeded, without the file system's free bytes (review122 F3)."""
    import os

    def refuse(fd, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "ftruncate", refuse)
    monkeypatch.setattr(os, "statvfs", lambda path: _FileSystem(total, 512 * 100))
    need = 2 * (128 + 1000 * 300 * 2)  # two data files: each a .npy header and 1000 x 300 float16 values
    with pytest.raises(OSError) as info:
        tracin.GradientStore.create(tmp_path / "s", n_rows=1000, dims=[300, 300], dtype="float16")
    text = str(info.value)
    assert info.value.errno == code and info.value.filename == str(tmp_path / "s" / "checkpoint_000.npy")
    assert f"the store's files take about {need} bytes" in text
    if code == errno.ENOSPC:
        assert "the disk is full" in text and "51200 bytes are free now" in text
        assert "free space on that disk (or quota), then create again" in text
        assert ("split the rows between stores" in text) == (total < need)
    else:  # the file system's free bytes say nothing of the user's quota
        assert "the disk quota is exceeded" in text and "free space within the quota" in text
        assert "bytes are free now" not in text and "split the rows" not in text
    assert "interrupted create, which the next create replaces" in text
    monkeypatch.undo()
    with tracin.GradientStore.create(tmp_path / "s", n_rows=1000, dims=[300, 300], dtype="float16") as w:  # redone
        assert w.missing(1) == [[0, 1000]]


def test_a_full_disk_while_writing_the_ids_at_create_says_to_free_space(tmp_path, monkeypatch):
    """ENOSPC on the ids file (after the data files were made) gets the same advice, the ids counted."""
    import os

    from tracin.store import _create

    def refuse(path, ids):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(_create, "write_npy", refuse)
    ids = np.arange(10, dtype=np.int64)
    with pytest.raises(OSError) as info:
        tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4], ids=ids)
    need = (128 + 10 * 4 * 4) + (128 + 10 * 8)
    assert f"the disk is full (No space left on device); the store's files take about {need} bytes" in str(info.value)
    assert "split the rows" not in str(info.value)


def test_a_full_disk_at_create_counts_the_space_the_interrupted_create_holds(tmp_path, monkeypatch):
    """The free bytes told at ENOSPC leave out nothing the next create frees: the ids file written in part
    (here 256 KiB of it) is counted as what this interrupted create holds."""
    import os
    import re

    from tracin.store import _create

    def part_then_full(path, ids):
        with open(path, "wb") as f:
            f.write(b"x" * (256 * 1024))
            f.flush()
            os.fsync(f.fileno())
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(_create, "write_npy", part_then_full)
    monkeypatch.setattr(os, "statvfs", lambda path: _FileSystem(10**9, 0))
    with pytest.raises(OSError) as info:
        tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4], ids=np.arange(10))
    text = str(info.value)
    held = re.search(r"0 bytes are free now \(and the (\d+) bytes this interrupted create's files hold", text)
    assert held is not None and int(held[1]) >= 256 * 1024, text


def test_write_all_continues_a_short_write_where_it_stopped(tmp_path, monkeypatch):
    """r270 S10 (each pwrite at the first offset): pwrite may write less than asked (Linux: at most 2 GiB - 4 KiB
    a call); the rest of the data goes right after what it wrote."""
    from tracin.store import _files

    pwrite = os.pwrite
    monkeypatch.setattr(_files.os, "pwrite", lambda fd, data, offset: pwrite(fd, data[:3], offset))
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        _files.write_all(fd, b"0123456789", 2, path)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0\0" + b"0123456789"


def test_read_all_reads_on_past_the_size_a_file_had_when_it_was_taken(tmp_path, monkeypatch):
    """r270 S11 (the buffer never grown): a file that grew after read_all took its size is read whole."""
    from tracin.store import _files

    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    monkeypatch.setattr(_files.os, "fstat", lambda fd: os.stat_result((0,) * 6 + (10,) + (0,) * 3))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert bytes(_files.read_all(fd, 1000, path)) == bytes(range(100))
    finally:
        os.close(fd)


def test_resuming_with_other_ids_of_the_same_length_is_refused(tmp_path):
    """ids are compared by value at a resume, not by count: rows written for reordered examples would sit under the
    stored ids (r291 M45: compared by shape, the other ids were taken and the stored ones kept)."""
    with tracin.GradientStore.create(tmp_path / "s", 5, [2], None, ids=[f"ex-{i}" for i in range(5)]) as w:
        w.write(0, 0, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"different spec \(ids given there vs different here\)"):
        tracin.GradientStore.create(tmp_path / "s", 5, [2], None, ids=[f"ex-{i}" for i in reversed(range(5))])
    with tracin.GradientStore.create(tmp_path / "s", 5, [2], None, ids=[f"ex-{i}" for i in range(5)]) as w:
        assert w.rows_done(0) == 2


@pytest.mark.parametrize("change", ["truncated", "replaced", "removed"])
def test_a_data_file_changed_under_an_open_writer_is_refused_and_its_rows_not_recorded(tmp_path, change):
    # another process truncates, replaces or removes a data file while the writer is open: the next write is
    # a StoreChangedError naming the file (a truncated file written up to its end again would read back zeros
    # in rows [0, 5), which the manifest calls written)
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, 10, [3])
    w.write(0, 0, np.arange(15, dtype=np.float32).reshape(5, 3) + 1)
    data = path / "checkpoint_000.npy"
    message = "was replaced or resized by another process"
    if change == "truncated":
        os.truncate(data, 128)  # the header only: rows [0, 5) gone
    elif change == "replaced":
        (tmp_path / "copy.npy").write_bytes(data.read_bytes())
        os.replace(tmp_path / "copy.npy", data)
    else:
        data.unlink()
        message = "was removed while the gradient store was being written"
    with pytest.raises(StoreChangedError, match=re.escape(str(data)) + " " + message):
        w.write(0, 5, np.ones((5, 3), np.float32))
    assert w.missing(0) == [[5, 10]]
    w.close()


def test_a_resumed_writer_writes_at_the_data_offset_of_each_files_own_header(tmp_path):
    # a data file whose 1.0 header is 192 bytes, not the 128 NumPy writes for a small 2-d shape (docs/format.md:
    # 1.0 headers, 64-byte aligned data): rows go where its header says the data starts, as readers read them
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 6, [4, 3]).close()
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 3), }".ljust(192 - 11) + "\n"
    head = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()
    (path / "checkpoint_001.npy").write_bytes(head + bytes(6 * 3 * 4))
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((6, d)).astype(np.float32) for d in (4, 3)]
    w = tracin.GradientStore.create(path, 6, [4, 3])
    for c, b in enumerate(blocks):
        w.write(c, 0, b[:2])
        w.write(c, 2, b[2:])
    for got, b in zip(read_rows(w.finalize()), blocks, strict=True):
        np.testing.assert_array_equal(got, b)
