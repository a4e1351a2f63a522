"""GradientStore as a gradient set: scoring equals in memory, partial use, shards, readers, describe."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tracin
from reference import assert_close_to_exact, exact_scores, factored_to_full, score_bound
from tracin.store import describe

from .helpers import in_memory, random_blocks, write_store

W = [0.3, -0.7]


def _both(tmp_path, n, dims, factored, dtype="float32", seed=0, chunk_rows=None, name="s"):
    """(store, the same gradients in memory); chunk_rows forces small kernel calls."""
    blocks = random_blocks(n, dims, dtype, factored, seed)
    store = write_store(tmp_path / name, blocks, W, dtype, factored)
    if chunk_rows:
        store = tracin.GradientStore.open(store.path, chunk_bytes=chunk_rows * store.row_bytes)
        assert store.row_chunks() == chunk_rows
    return store, in_memory(blocks, W, factored), blocks


@pytest.mark.parametrize("factored, dims", [(False, [9, 5]), (True, [(3, 4), (2, 5)])])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scoring_a_store_equals_scoring_the_same_gradients_in_memory(tmp_path, factored, dims, dtype):
    test_s, test_m, test_b = _both(tmp_path, 11, dims, factored, dtype, seed=1, chunk_rows=4, name="t")
    train_s, train_m, train_b = _both(tmp_path, 37, dims, factored, dtype, seed=2, chunk_rows=5)
    for t, x in [(test_s, train_s), (test_m, train_s), (test_s, train_m)]:
        np.testing.assert_array_equal(tracin.scores(t, x), tracin.scores(test_m, train_m))
        ours, ref = tracin.top_k(t, x, k=6, side="both"), tracin.top_k(test_m, train_m, k=6, side="both")
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(tracin.self_influence(train_s), tracin.self_influence(train_m))
    for t, x in [(test_m, train_s), (test_s, train_m), (test_s, train_s)]:
        np.testing.assert_array_equal(tracin.aggregate(t, x), tracin.aggregate(test_m, train_m))
    # All agree with the float64 reference.
    as_full = (lambda b: factored_to_full([left for left, _ in b], [r for _, r in b])) if factored else list
    test_f, train_f = as_full(test_b), as_full(train_b)
    assert_close_to_exact(tracin.scores(test_s, train_s), test_f, train_f, W)
    err = np.abs(tracin.aggregate(test_s, train_s) - exact_scores(test_f, train_f, W).sum(0))
    assert np.all(err <= score_bound(test_f, train_f, W).sum(0))


def test_an_unfinished_store_is_refused_unless_partial_use_is_asked_for(tmp_path):
    blocks = random_blocks(10, [3, 2], "float32", False)
    w = tracin.GradientStore.create(tmp_path / "s", 10, [3, 2], W)
    w.write(0, 0, blocks[0][:7])
    w.write(1, 0, blocks[1][:4])
    w.write(1, 6, blocks[1][6:])
    store = tracin.GradientStore.open(tmp_path / "s")
    assert not store.complete and store.n_rows == 10
    unfinished = r"unfinished \(rows usable from row 0, per checkpoint: \[7, 4\] of 10\).*allow_partial=True"
    with pytest.raises(ValueError, match=unfinished):
        tracin.self_influence(store)
    with pytest.raises(ValueError, match="unfinished"):
        tracin.top_k(blocks, store)
    partial = tracin.GradientStore.open(tmp_path / "s", allow_partial=True)
    assert partial.n_rows == 4  # rows written for every checkpoint
    np.testing.assert_array_equal(
        tracin.self_influence(partial), tracin.self_influence(tracin.Gradients([b[:4] for b in blocks], W))
    )
    w.write(1, 4, blocks[1][4:6])  # a reader opened during writing sees the rows as of opening
    assert tracin.GradientStore.open(tmp_path / "s", allow_partial=True).n_rows == 7
    assert partial.n_rows == 4


def test_a_store_with_every_row_written_but_not_finalized_is_refused_naming_finalize(tmp_path):
    """review165 F3: leaving the writer's `with` block closes it without finalizing, and the error then said
    "[4] of 4 ... finish writing it", not what was left to do."""
    blocks = random_blocks(4, [3, 2], "float32", False)
    with tracin.GradientStore.create(tmp_path / "s", 4, [3, 2], W) as w:
        w.write(0, 0, blocks[0])
        w.write(1, 0, blocks[1])
        assert w.complete
    store = tracin.GradientStore.open(tmp_path / "s")
    assert not store.complete
    with pytest.raises(ValueError, match="unfinished") as refused:
        tracin.self_influence(store)
    said = str(refused.value)
    assert "every row is written (per checkpoint: [4, 4] of 4) but the store was never finalized" in said
    assert "GradientStore.create(<the same arguments>).finalize()" in said and "finish writing" not in said
    done = tracin.GradientStore.create(tmp_path / "s", 4, [3, 2], W).finalize()  # as the message says
    want = sum(w * (b.astype(np.float64) ** 2).sum(axis=1) for w, b in zip(W, blocks, strict=True))
    np.testing.assert_allclose(tracin.self_influence(done), want, rtol=1e-5)


def test_shards_cover_the_rows_and_merge_to_the_whole_ties_included(tmp_path):
    rng = np.random.default_rng(3)
    # Few distinct rows, so that many train rows score exactly the same (ties across shards).
    distinct = [rng.integers(-2, 3, (4, d)).astype(np.float32) for d in (6, 3)]
    picks = rng.integers(0, 4, 41)
    train = [d[picks] for d in distinct]
    test = [rng.integers(-2, 3, (5, d)).astype(np.float32) for d in (6, 3)]
    store = write_store(tmp_path / "s", train, W)
    for n in (1, 3, 7):
        shards = [store.shard(i, n) for i in range(n)]
        assert [s.shard_offset() for s in shards] == [i * 41 // n for i in range(n)]
        assert sum(s.n_rows for s in shards) == 41
        for side in ("proponents", "opponents"):
            whole = tracin.top_k(test, store, k=9, side=side)
            parts = [tracin.top_k(test, s, k=9, side=side) for s in shards]
            merged = tracin.merge_top_k(parts, [s.shard_offset() for s in shards], k=9, side=side)
            np.testing.assert_array_equal(merged.values, whole.values)
            np.testing.assert_array_equal(merged.indices, whole.indices)
            # ties really occur, and go to the smaller index
            tied = np.diff(whole.values, axis=1) == 0
            assert tied.any() and (np.diff(whole.indices, axis=1)[tied] > 0).all()
    nested = store.shard(1, 2).shard(0, 2)
    assert (nested.shard_offset(), nested.n_rows) == (20, 10)
    np.testing.assert_array_equal(
        tracin.self_influence(nested), tracin.self_influence(tracin.Gradients([t[20:30] for t in train], W))
    )


def test_shard_and_slice_arguments(tmp_path):
    store = write_store(tmp_path / "s", random_blocks(5, [2], "float32", False))
    assert [store.shard(i, 8).n_rows for i in range(8)] == [0, 1, 0, 1, 1, 0, 1, 1]
    empty = store.shard(0, 8)
    assert tracin.top_k(np.ones((2, 2), np.float32), empty, k=3).indices.shape == (2, 0)
    assert tracin.self_influence(empty).shape == (0,)
    assert store[1:3].n_rows == 2 and store[3:1].n_rows == 0 and store[-2:].shard_offset() == 3
    assert (store[1:4:1].shard_offset(), store[1:4:1].n_rows) == (1, 3)  # an explicit step 1 is contiguous too
    for i, n in [(2, 2), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError, match="0 <= i < n"):
            store.shard(i, n)
    with pytest.raises(ValueError, match="n must be an integer"):
        store.shard(0, 1.5)
    with pytest.raises(TypeError, match="contiguous row ranges"):
        store[::2]
    with pytest.raises(ValueError, match=r"row range \[0, 6\) is outside"):
        store.kernel_side(0, 6)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
        tracin.GradientStore.open(store.path, chunk_bytes=0)


def test_ids_and_metadata_follow_views(tmp_path):
    ids = [f"img_{i:02d}" for i in range(12)]
    store = write_store(
        tmp_path / "s",
        random_blocks(12, [2], "float32", False),
        ids=ids,
        metadata={"layers": ["fc.weight"], "projection": None},
    )
    assert store.ids.tolist() == ids and store.shard(2, 3).ids.tolist() == ids[8:]
    assert store.metadata == {"layers": ["fc.weight"], "projection": None}
    assert write_store(tmp_path / "n", random_blocks(3, [2], "float32", False)).ids is None


def test_chunk_mappings_are_released_after_use(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux) to see the process's mappings")
    store, _, blocks = _both(tmp_path, 30, [4, 3], False, chunk_rows=4)
    tracin.top_k(blocks, store, k=3)
    tracin.self_influence(store)
    assert str(store.path) not in maps.read_text()
    side = store.kernel_side(0, 4)
    assert str(store.path) in maps.read_text()  # mapped while held, for one kernel call
    del side
    assert str(store.path) not in maps.read_text()


def test_two_readers_at_once(tmp_path):
    store, memory, _ = _both(tmp_path, 40, [16, 8], False, chunk_rows=3)
    expected = tracin.self_influence(memory)
    script = textwrap.dedent(f"""
        import numpy as np, tracin
        s = tracin.GradientStore.open({str(store.path)!r}, chunk_bytes={3 * store.row_bytes})
        for _ in range(20):
            np.save({str(tmp_path / "other.npy")!r}, tracin.self_influence(s))
    """)
    other = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    here = tracin.GradientStore.open(store.path, chunk_bytes=3 * store.row_bytes)
    while other.poll() is None:
        np.testing.assert_array_equal(tracin.self_influence(here), expected)
        np.testing.assert_array_equal(tracin.self_influence(store), expected)
    assert other.returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "other.npy"), expected)


def test_describe_reports_the_facts(tmp_path):
    store = write_store(
        tmp_path / "s",
        random_blocks(20, [(3, 4), (2, 5)], "float16", True),
        W,
        "float16",
        True,
        metadata={"layers": ["fc"]},
    )
    text = describe(store.path)
    for line in [
        "complete        yes",
        "rows            20",
        "checkpoints     2  (weights 0.3, -0.7)",
        "mode            factored",
        "dims            [3, 4], [2, 5]",
        "dtype           float16",
        "metadata        layers",
    ]:
        assert line in text, text
    info = store.info()
    on_disk = sum(p.stat().st_size for p in store.path.iterdir())
    assert info["file_bytes"] == on_disk and info["disk_bytes"] > 0
    # the blocks the files take (st_blocks counts 512-byte units), not a count of blocks
    assert info["disk_bytes"] == sum(p.stat().st_blocks * 512 for p in store.path.iterdir())
    assert store.nbytes == 20 * (3 + 4 + 2 + 5) * 2 == store.shard(0, 1).nbytes
    w = tracin.GradientStore.create(tmp_path / "u", 9, [2, 2], dtype="bfloat16")
    w.write(1, 0, np.ones((5, 2), np.float32))
    text = describe(tmp_path / "u")
    assert "complete        no (rows recorded per checkpoint: 0, 5)" in text
    assert "checkpoints     2  (weights 1, 1, the default)" in text


def test_the_store_id_stays_over_a_resume_and_changes_with_a_new_store(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [2])
    w.write(0, 0, np.ones((2, 2), np.float32))
    w.close()
    opened = tracin.GradientStore.open(tmp_path / "s", allow_partial=True, chunk_bytes=24)
    assert len(opened.store_id) == 32 and int(opened.store_id, 16) >= 0
    assert (opened.allow_partial, opened.chunk_bytes) == (True, 24)
    assert opened[1:3].store_id == opened.store_id and opened.shard(1, 2).chunk_bytes == 24
    w = tracin.GradientStore.create(tmp_path / "s", 4, [2])
    w.write(0, 2, np.ones((2, 2), np.float32))
    assert w.finalize().store_id == opened.store_id
    again = write_store(tmp_path / "s", random_blocks(4, [2], "float32", False), overwrite=True)
    assert again.store_id != opened.store_id and not again.allow_partial


def test_a_store_opened_by_a_relative_path_is_still_read_after_a_chdir(tmp_path, monkeypatch):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    writer = tracin.GradientStore.create(tmp_path / "s", n_rows=6, dims=[4], weights=[0.5])
    writer.write(0, 0, rows)
    writer.finalize()
    monkeypatch.chdir(tmp_path)
    store = tracin.GradientStore.open("s")
    monkeypatch.chdir("/")  # each call opens the files again: by the path the store was opened at
    assert store.path == tmp_path / "s"
    np.testing.assert_allclose(tracin.self_influence(store), 0.5 * (rows.astype(np.float64) ** 2).sum(1))


def test_a_store_created_by_a_relative_path_is_still_written_after_a_chdir(tmp_path, monkeypatch):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    monkeypatch.chdir(tmp_path)
    writer = tracin.GradientStore.create("s", n_rows=6, dims=[4], weights=[0.5])
    writer.write(0, 0, rows[:3])
    monkeypatch.chdir("/")  # each write rewrites the manifest: by the path the store was created at
    writer.write(0, 3, rows[3:])
    store = writer.finalize()
    assert store.path == tmp_path / "s" and store.complete
    np.testing.assert_allclose(tracin.self_influence(store), 0.5 * (rows.astype(np.float64) ** 2).sum(1))


def test_the_read_ahead_hint_stays_within_the_view(tmp_path, monkeypatch):
    """Reading a slice's last rows asks the OS to read ahead no further than the slice's end (the
    next shard's rows are its own reader's), and a chunk before the end one chunk further."""
    from tracin.store import _store

    store = write_store(tmp_path / "s", random_blocks(1000, [4], "float32", False))
    hints = []
    monkeypatch.setattr(_store, "_read_ahead", lambda fd, offset, nbytes: hints.append((offset, nbytes)))
    view, row = store[500:600], 4 * 4  # bytes per row
    view.kernel_side(50, 100)
    view.kernel_side(0, 50)
    base = hints[0][0] - 550 * row  # the data's offset in its file
    assert [((offset - base) // row, nbytes // row) for offset, nbytes in hints] == [(550, 50), (500, 100)]


def test_opening_the_folder_of_an_interrupted_create_says_so_and_how_to_redo_it(tmp_path, monkeypatch):
    """Opening what a create that failed part-way left (its create-in-progress marker, no manifest.json)
    said only 'no manifest.json'; it names the interrupted create and what to do, as `tracin info` does."""

    def refuse(fd, length):
        raise OSError(27, "File too large")

    with monkeypatch.context() as m:
        m.setattr(os, "ftruncate", refuse)
        with pytest.raises(OSError, match="File too large"):
            tracin.GradientStore.create(tmp_path / "s", n_rows=6, dims=[4])
    assert "create-in-progress" in os.listdir(tmp_path / "s") and "manifest.json" not in os.listdir(tmp_path / "s")
    for allow_partial in (False, True):
        with pytest.raises(FileNotFoundError) as caught:
            tracin.GradientStore.open(tmp_path / "s", allow_partial=allow_partial)
        text = str(caught.value)
        assert text.startswith(f"no gradient store at {tmp_path / 's'} yet: ")
        assert "interrupted GradientStore.create" in text and "create-in-progress marker, no manifest.json" in text
        assert "same arguments" in text and "rerun the export" in text and "delete the folder" in text
    (tmp_path / "e").mkdir()  # no marker: the message stays the plain one
    with pytest.raises(FileNotFoundError, match=r"^no gradient store at .*e \(no manifest\.json\)$"):
        tracin.GradientStore.open(tmp_path / "e")
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    writer = tracin.GradientStore.create(tmp_path / "s", n_rows=6, dims=[4])  # redone, as the message says
    writer.write(0, 0, rows)
    writer.finalize()
    (tmp_path / "s" / "create-in-progress").touch()  # a marker beside a manifest: a store, not an interrupted create
    np.testing.assert_allclose(
        tracin.self_influence(tracin.GradientStore.open(tmp_path / "s")), (rows.astype(np.float64) ** 2).sum(1)
    )


def test_the_default_chunk_and_the_largest_default_shard_are_the_one_tunable():
    import inspect

    from tracin import _tunables
    from tracin.distributed import _shards

    # the same object, not an equal literal written again: changing _tunables.STORE_CHUNK_BYTES changes both
    default = inspect.signature(tracin.GradientStore.open).parameters["chunk_bytes"].default
    assert default is _tunables.STORE_CHUNK_BYTES
    assert _shards.MAX_SHARD_BYTES is _tunables.STORE_CHUNK_BYTES


@pytest.mark.parametrize("bad", [1.5, 4.0, "4", None, True, np.float64(4)])
def test_a_wrong_type_of_row_count_or_chunk_size_is_a_type_error(tmp_path, bad):
    # as every positive-integer argument (tracin._validate.positive_int): a wrong type is a TypeError
    with pytest.raises(TypeError, match="n_rows must be a positive integer"):
        tracin.GradientStore.create(tmp_path / "new", bad, [3], [1.0])
    assert not (tmp_path / "new").exists()
    store = write_store(tmp_path / "s", random_blocks(4, [3], "float32", False), [1.0])
    with pytest.raises(TypeError, match="chunk_bytes must be a positive integer"):
        tracin.GradientStore.open(store.path, chunk_bytes=bad)
    for value in (0, -1):
        with pytest.raises(ValueError, match="n_rows must be a positive integer"):
            tracin.GradientStore.create(tmp_path / "new", value, [3], [1.0])
        with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
            tracin.GradientStore.open(store.path, chunk_bytes=value)
    assert tracin.GradientStore.open(store.path, chunk_bytes=np.int64(64)).chunk_bytes == 64


def test_true_or_false_arguments_take_numpys_bools_and_refuse_anything_else(tmp_path):
    # as normalize= and progress= do (tracin._validate.flag); allow_partial="no" used to open an unfinished store
    blocks = random_blocks(4, [3], "float32", False)
    for i, numpy_false in enumerate((np.False_, np.bool_(False))):
        writer = tracin.GradientStore.create(tmp_path / f"n{i}", 4, [3], None, factored=numpy_false, overwrite=np.True_)
        with writer:
            writer.write(0, 0, blocks[0][:2])  # 2 of 4 rows: unfinished
        assert not tracin.GradientStore.open(tmp_path / f"n{i}", allow_partial=numpy_false).allow_partial
        partial = tracin.GradientStore.open(tmp_path / f"n{i}", allow_partial=np.True_)
        assert partial.allow_partial is True and partial.n_rows == 2
    for bad in ("no", 0, 1, None, np.array([True])):
        with pytest.raises(TypeError, match="allow_partial must be True or False"):
            tracin.GradientStore.open(tmp_path / "n0", allow_partial=bad)
        with pytest.raises(TypeError, match="factored must be True or False"):
            tracin.GradientStore.create(tmp_path / "bad", 4, [3], None, factored=bad)
        with pytest.raises(TypeError, match="overwrite must be True or False"):
            tracin.GradientStore.create(tmp_path / "bad", 4, [3], None, overwrite=bad)
    assert not (tmp_path / "bad").exists()


def test_partial_use_of_rows_written_out_of_order_starts_at_row_0(tmp_path):
    """r270 S4 (Manifest.rows_done counting a first written range that does not start at row 0): rows [3, 10)
    written, rows [0, 3) not: allow_partial has no usable rows, and the refusal counts 0 usable, not 10."""
    blocks = random_blocks(10, [3], "float32", False)
    with tracin.GradientStore.create(tmp_path / "s", 10, [3], [1.0]) as w:
        w.write(0, 3, blocks[0][3:])
    assert tracin.GradientStore.open(tmp_path / "s", allow_partial=True).n_rows == 0
    with pytest.raises(ValueError, match=r"rows usable from row 0, per checkpoint: \[0\] of 10"):
        tracin.self_influence(tracin.GradientStore.open(tmp_path / "s"))


def test_opening_a_folder_of_npy_files_says_how_to_make_a_store_of_them(tmp_path):
    """A folder of np.save'd gradients (no manifest) said only '(no manifest.json)'; it names the .npy files and
    the GradientStore.create / write / finalize calls, and the advised calls make a store that reads them back."""
    grads = np.arange(12, dtype=np.float32).reshape(3, 4)
    for name in ("ckpt_0.npy", "ckpt_1.npy", "ckpt_2.npy", "ckpt_3.npy"):
        np.save(tmp_path / name, grads)
    with pytest.raises(FileNotFoundError) as caught:
        tracin.GradientStore.open(tmp_path)
    text = str(caught.value)
    assert "(no manifest.json; it holds .npy files (ckpt_0.npy, ckpt_1.npy, ckpt_2.npy, ...)" in text, text
    assert "GradientStore.create(path, n_rows=n, dims=[d, ...]" in text and "w.finalize()" in text, text
    w = tracin.GradientStore.create(tmp_path / "store", n_rows=3, dims=[4], weights=[0.1])
    w.write(0, 0, np.load(tmp_path / "ckpt_0.npy"))
    w.finalize()
    want = 0.1 * (grads.astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(tracin.self_influence(tracin.GradientStore.open(tmp_path / "store")), want, rtol=1e-6)
