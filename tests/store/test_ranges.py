"""Range writers (GradientStore.create(..., rows=(start, stop))): several writers on disjoint rows of
one store at once, in separate processes, each resuming after SIGKILL; the finished store is
byte-identical to one written by a single writer. Overlaps, missing ranges and hostile range files
are refused with errors naming them."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import tracin
from store_files import assert_same_store_files
from tracin.store import GradientStoreRangeWriter, StoreFormatError
from tracin.store import _locks as locks
from tracin.store._format import add_range, insert_range, merge_ranges
from tracin.store._writer import add_written

from .ranges_task import BLOCK, DIMS, N_ROWS, SPEC, WEIGHTS, range_task, rows, write_missing


def _single_writer_store(path: Path) -> tracin.GradientStore:
    w = tracin.GradientStore.create(path, **SPEC)
    write_missing(w, 0, N_ROWS)
    return w.finalize()


def _create(path: Path) -> None:
    """What the client does before the tasks: create the store, and let go of it."""
    tracin.GradientStore.create(path, **SPEC).close()


def _finalize(path: Path) -> tracin.GradientStore:
    """What the client does after the tasks."""
    return tracin.GradientStore.create(path, **SPEC).finalize()


def _assert_byte_identical(got: Path, expected: Path) -> None:
    """The same files holding the same bytes, a complete store; the manifests differ only in the random id."""
    ours, _ = assert_same_store_files(got, expected)
    assert ours["complete"]


def test_two_processes_writing_halves_at_once_make_the_single_writer_store(tmp_path):
    _create(tmp_path / "ranges")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)  # both writers are open before either writes: they run at the same time
    tasks = [
        ctx.Process(target=range_task, args=(str(tmp_path / "ranges"), a, b, barrier))
        for a, b in [(0, 280), (280, N_ROWS)]
    ]
    for t in tasks:
        t.start()
    for t in tasks:
        t.join(timeout=300)
    assert [t.exitcode for t in tasks] == [0, 0]
    finished = _finalize(tmp_path / "ranges")
    expected = _single_writer_store(tmp_path / "single")
    _assert_byte_identical(tmp_path / "ranges", tmp_path / "single")
    squares = [(rows(c).astype(ml_dtypes.bfloat16).astype(np.float64) ** 2).sum(1) for c in range(2)]
    np.testing.assert_allclose(
        tracin.self_influence(finished), WEIGHTS[0] * squares[0] + WEIGHTS[1] * squares[1], rtol=1e-5
    )
    assert finished.ids.tolist() == expected.ids.tolist()


def _range_process(path: Path, start: int, stop: int) -> subprocess.Popen:
    """A range writer in its own process, printing "wrote C ROW" after each block."""
    return subprocess.Popen(
        [sys.executable, "-m", "store.ranges_task", str(path), str(start), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_range_writer_killed_mid_write_resumes_and_the_store_is_byte_identical(tmp_path):
    path, (start, stop) = tmp_path / "ranges", (200, N_ROWS)
    _create(path)
    victim = _range_process(path, start, stop)
    for _ in range(13):  # into checkpoint 1 (10 blocks per checkpoint), then killed while it writes
        assert victim.stdout.readline().startswith("wrote")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stdout.close()

    progress = json.loads((path / f"rows-{start}-{stop}.json").read_text())
    assert progress["rows"] == [start, stop] and progress["written"][0] == [[start, stop]]
    done = progress["written"][1][0][1]
    assert (done - start) % BLOCK == 0 and start + 3 * BLOCK <= done < stop
    # A write cut short leaves garbage after the recorded rows: simulate the worst case.
    data_file = path / "checkpoint_001.npy"
    header = data_file.stat().st_size - N_ROWS * DIMS[1] * 2
    with open(data_file, "r+b") as f:
        f.seek(header + done * DIMS[1] * 2)
        f.write(os.urandom(BLOCK * DIMS[1] * 2 + 5))

    with tracin.GradientStore.create(path, **SPEC, rows=(0, start)) as other:  # the other task, meanwhile
        write_missing(other, 0, start)
    resumed = _range_process(path, start, stop)  # Dask's retry of the killed task
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    lines = out.splitlines()
    assert lines[0] == f"wrote 1 {done}" and len(lines) == (stop - done) // BLOCK  # nothing done is redone
    _finalize(path)
    _single_writer_store(tmp_path / "single")
    _assert_byte_identical(path, tmp_path / "single")


def test_overlapping_ranges_are_refused_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "s"
    _create(path)
    first = tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    before = sorted(os.listdir(path))
    for a, b in [(299, 400), (0, 600), (100, 200)]:
        with pytest.raises(
            ValueError,
            match=rf"rows \[{a}, {b}\) overlap rows \[0, 300\) of another "
            r"range writer .*\(files rows-0-300\.\*\)",
        ):
            tracin.GradientStore.create(path, **SPEC, rows=(a, b))
    assert sorted(os.listdir(path)) == before  # a refused claim would otherwise block a correct range
    with pytest.raises(RuntimeError, match=r"rows \[0, 300\) .* being written by another range writer"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    with pytest.raises(RuntimeError, match="being written by another writer"):
        tracin.GradientStore.create(path, **SPEC)  # no writer of the whole store beside range writers
    second = tracin.GradientStore.create(path, **SPEC, rows=(300, 600))  # disjoint: fine
    first.close()
    second.close()
    # A range that a writer left unfinished still claims its rows: another partition is refused.
    with pytest.raises(ValueError, match=r"overlap rows \[0, 300\), \[300, 600\) of other range writers"):
        tracin.GradientStore.create(path, **SPEC, rows=(200, 400))
    whole = tracin.GradientStore.create(path, **SPEC)
    with pytest.raises(RuntimeError, match="being written by a writer of the whole store"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    whole.close()


def test_the_overlap_refusal_says_how_to_clear_what_a_killed_range_writer_left(tmp_path):
    """review150 F4: a partition re-chunked after a range writer was killed was refused with no way out
    but the old range; the refusal names the merge that clears it (and at most 20 of the other ranges)."""
    path = tmp_path / "s"
    _create(path)
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 300)) as w:
        w.write(0, 0, np.ones((BLOCK, DIMS[0]), np.float32))  # then left unfinished, as if killed
    for i in range(24):
        (path / f"rows-{300 + i}-{301 + i}.lock").touch()  # killed before their first block
    advice = (
        r"if no writer of those rows is running \(one was killed, or finished unmerged\), open a writer of the "
        r"whole store once \(GradientStore.create with the same arguments, without rows=\): it merges"
    )
    named = ", ".join(f"rows-{300 + i}-{301 + i}\\.\\*" for i in range(19))
    with pytest.raises(ValueError, match=rf"\(files rows-0-300\.\*, {named}, \.\.\. and 5 more\).*{advice}"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 400))
    tracin.GradientStore.create(path, **SPEC).close()  # the advice: merge
    assert not [n for n in os.listdir(path) if n.startswith("rows-")]
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 400)) as w:
        assert w.rows_done(0) == BLOCK


def test_finalize_names_the_rows_a_range_writer_left_unwritten(tmp_path):
    path = tmp_path / "s"
    _create(path)
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 300)) as w:
        write_missing(w, 0, 300)
    with tracin.GradientStore.create(path, **SPEC, rows=(300, 600)) as w:
        w.write(0, 300, rows(0)[300:440])
        with pytest.raises(ValueError, match="does not finalize the store"):
            w.finalize()
    whole = tracin.GradientStore.create(path, **SPEC)
    assert [whole.missing(c) for c in range(2)] == [[[440, 600]], [[300, 600]]]
    with pytest.raises(
        ValueError,
        match=r"rows not written yet \(checkpoint 0: rows \[440, 600\); "
        r"checkpoint 1: rows \[300, 600\)\)",
    ):
        whole.finalize()
    whole.close()
    assert not [n for n in os.listdir(path) if n.startswith("rows-")]  # merged into the manifest
    manifest = json.loads((path / "manifest.json").read_text())
    assert [e["written"] for e in manifest["checkpoints"]] == [[[0, 440]], [[0, 300]]]
    with tracin.GradientStore.create(path, **SPEC, rows=(300, 600)) as w:
        assert [w.rows_done(c) for c in range(2)] == [440, 300]  # resumes from the merged manifest
        write_missing(w, 300, 600)
    _finalize(path)
    _single_writer_store(tmp_path / "single")
    _assert_byte_identical(path, tmp_path / "single")


def test_a_range_writer_sees_rows_the_whole_store_writer_recorded(tmp_path):
    path = tmp_path / "s"
    w = tracin.GradientStore.create(path, **SPEC)
    w.write(0, 0, rows(0)[:100])
    w.close()
    with tracin.GradientStore.create(path, **SPEC, rows=(50, 200)) as r:
        assert isinstance(r, GradientStoreRangeWriter) and r.rows == (50, 200)
        assert [r.rows_done(c) for c in range(2)] == [100, 50] and r.missing(0) == [[100, 200]]
        with pytest.raises(ValueError, match=r"rows \[40, 60\) are outside this writer's rows \[50, 200\)"):
            r.write(0, 40, rows(0)[40:60])
        r.write(0, 190, rows(0)[190:200])
        assert r.missing(0) == [[100, 190]] and not r.complete


def test_a_claim_left_without_progress_is_resumed(tmp_path):
    path = tmp_path / "s"
    _create(path)
    tracin.GradientStore.create(path, **SPEC, rows=(0, 300)).close()  # opened, killed before any write
    assert sorted(n for n in os.listdir(path) if n.startswith("rows-")) == ["rows-0-300.lock"]
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 300)) as w:
        assert w.rows_done(0) == 0
        write_missing(w, 0, 300)


def test_a_finished_store_gives_a_complete_range_writer_and_cleans_leftovers(tmp_path):
    path = tmp_path / "s"
    _single_writer_store(path)
    with tracin.GradientStore.create(path, **SPEC, rows=(100, 300)) as w:
        assert w.complete and [w.rows_done(c) for c in range(2)] == [300, 300]
        with pytest.raises(ValueError, match="is finalized"):
            w.write(0, 100, rows(0)[100:110])
    assert not [n for n in os.listdir(path) if n.startswith("rows-")]
    (path / "rows-0-300.lock").write_bytes(b"")  # left by a finalize killed before it removed them
    (path / "rows-0-300.json").write_text("{}")
    assert _finalize(path).complete
    assert not [n for n in os.listdir(path) if n.startswith("rows-")]
    tracin.GradientStore.create(path, **{**SPEC, "dims": [4, 4]}, overwrite=True).close()
    (path / "rows-0-300.json.tmp").write_text("{")
    tracin.GradientStore.create(path, **SPEC, overwrite=True).close()  # range files count as the store's own
    assert sorted(os.listdir(path)) == ["checkpoint_000.npy", "checkpoint_001.npy", "ids.npy", "manifest.json"]


@pytest.mark.parametrize(
    "span, error, message",
    [
        (
            (5, 5),
            ValueError,
            r"rows must be a \(start, stop\) pair of integers with 0 <= start < stop <= n_rows \(600\)",
        ),
        ((-1, 5), ValueError, "rows must be a"),
        ((0, 601), ValueError, "rows must be a"),
        ((True, 5), ValueError, "rows must be a"),
        ("0:5", ValueError, "rows must be a"),
        ((0, 5, 9), ValueError, "rows must be a"),
    ],
)
def test_bad_rows_are_refused(tmp_path, span, error, message):
    _create(tmp_path / "s")
    with pytest.raises(error, match=message):
        tracin.GradientStore.create(tmp_path / "s", **SPEC, rows=span)


def test_range_writers_need_the_store_with_the_same_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="create it first with GradientStore.create.* without rows="):
        tracin.GradientStore.create(tmp_path / "none", **SPEC, rows=(0, 10))
    assert not (tmp_path / "none").exists()
    _create(tmp_path / "s")
    with pytest.raises(ValueError, match="overwrite=True cannot be combined with rows="):
        tracin.GradientStore.create(tmp_path / "s", **SPEC, rows=(0, 10), overwrite=True)
    with pytest.raises(
        ValueError,
        match=r"different spec \(dtype 'bfloat16' there vs 'float16' here\); create the "
        "store again without rows=",
    ):
        tracin.GradientStore.create(tmp_path / "s", **{**SPEC, "dtype": "float16"}, rows=(0, 10))
    assert sorted(os.listdir(tmp_path / "s")) == [
        "checkpoint_000.npy",
        "checkpoint_001.npy",
        "ids.npy",
        "manifest.json",
    ]


# -- hostile range files -------------------------------------------------------------------------


def _progress(path: Path, **changes) -> str:
    """The text of a valid progress file of rows [0, 300) of the store at `path` (rows [0, 40) of
    checkpoint 0 written), with `changes` applied."""
    store_id = json.loads((path / "manifest.json").read_text())["id"]
    doc = {
        "format": "tracin-gradient-store-range",
        "version": 1,
        "id": store_id,
        "rows": [0, 300],
        "written": [[[0, 40]], []],
        **changes,
    }
    return json.dumps(doc)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "other"}, "not a range writer's progress file"),
        ({"version": 2}, "version must be an integer from 1 to 1"),
        ({"id": "0" * 32}, "written for another store"),
        ({"rows": [0, 301]}, r"rows must be \[0, 300\] as the file's name says"),
        ({"written": [[[0, 40]]]}, "written must be a list of 2 range lists"),
        (
            {"written": [[[0, 400]], []]},
            r"written\[0\] must be sorted, disjoint \[start, stop\) ranges within \[0, 300\]",
        ),
        ({"written": [[[20, 40], [0, 10]], []]}, r"written\[0\] must be sorted"),
        ({"written": [[[10, 10]], []]}, r"written\[0\] must be sorted, disjoint"),  # r270 S3: an empty range
        ({"written": [[[0, "BIG"]], []]}, "beyond the float64 range"),
        (None, "corrupt progress file, not valid JSON"),
    ],
)
def test_a_malformed_progress_file_is_refused_naming_it(tmp_path, changes, message):
    path = tmp_path / "s"
    _create(path)
    text = '{"format": ' if changes is None else _progress(path, **changes).replace('"BIG"', "1e400")
    (path / "rows-0-300.json").write_text(text)
    pattern = rf"rows-0-300\.json: .*{message}.*; remove it to write rows \[0, 300\) again"
    with pytest.raises(StoreFormatError, match=pattern):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    with pytest.raises(StoreFormatError, match=pattern):  # nor merged by the writer of the whole store (and the
        # refused range writer let go of its locks, else this would be "being written by another writer")
        tracin.GradientStore.create(path, **SPEC)
    assert json.loads((path / "manifest.json").read_text())["checkpoints"][0]["written"] == []
    (path / "rows-0-300.json").write_text(_progress(path))  # a valid one is taken
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 300)) as w:
        assert w.rows_done(0) == 40


@pytest.mark.parametrize(
    "start, stop, written",
    [(500, 700, [[[500, 700]], []]), (600, 601, [[], []]), (300, 300, [[], []]), (400, 300, [[], []])],
)
def test_a_progress_file_for_rows_outside_the_store_is_refused_and_the_store_stays_usable(
    tmp_path, start, stop, written
):
    path = tmp_path / "s"
    _create(path)
    name = f"rows-{start}-{stop}.json"
    (path / name).write_text(_progress(path, rows=[start, stop], written=written))
    pattern = (
        rf"{name}: rows \[{start}, {stop}\) are not a non-empty range within the store's {N_ROWS} rows; "
        rf"remove it to write rows \[{start}, {stop}\) again"
    )
    with pytest.raises(StoreFormatError, match=pattern):  # not merged: that would mark rows past the end written
        tracin.GradientStore.create(path, **SPEC)
    assert json.loads((path / "manifest.json").read_text())["checkpoints"][0]["written"] == []
    assert tracin.GradientStore.open(path, allow_partial=True).n_rows == 0
    (path / name).unlink()  # as the error advises
    _single_writer_store(path)


@pytest.mark.parametrize("name", ["rows-0-300.json", "rows-0-300.lock"])
def test_a_link_planted_as_a_range_file_is_refused_and_never_followed(tmp_path, name):
    path = tmp_path / "s"
    _create(path)
    victim = tmp_path / "victim.json"
    victim.write_text(_progress(path))
    os.symlink(victim, path / name)
    with pytest.raises(StoreFormatError, match=f"{name} is a symbolic link"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    if name.endswith(".json"):
        with pytest.raises(StoreFormatError, match=f"{name} is a symbolic link"):
            tracin.GradientStore.create(path, **SPEC)
    assert victim.read_text() == _progress(path)


def test_a_link_planted_as_the_progress_temporary_is_never_written_through(tmp_path):
    path = tmp_path / "s"
    _create(path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, path / "rows-0-300.json.tmp")
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 300)) as w:
        w.write(0, 0, rows(0)[:40])
    assert victim.read_text() == "precious"
    assert json.loads((path / "rows-0-300.json").read_text())["written"] == [[[0, 40]], []]


def test_a_fifo_planted_as_a_progress_file_is_refused_without_hanging(tmp_path):
    path = tmp_path / "s"
    _create(path)
    os.mkfifo(path / "rows-0-300.json")
    with pytest.raises(StoreFormatError, match="rows-0-300.json is not a regular file"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))


@pytest.mark.skipif(locks.fcntl is None, reason="needs flock (POSIX)")
def test_a_file_system_without_flock_is_written_unlocked_and_other_lock_errors_are_raised(tmp_path, monkeypatch):
    def flock(fd, op, code=errno.ENOLCK):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    _create(tmp_path / "s")  # as on an NFS mount refusing locks on directories
    with tracin.GradientStore.create(tmp_path / "s", **SPEC, rows=(0, 300)) as w:
        write_missing(w, 0, 300)
    with pytest.raises(ValueError, match=r"overlap rows \[0, 300\)"):  # the overlap check still runs
        tracin.GradientStore.create(tmp_path / "s", **SPEC, rows=(200, 400))
    monkeypatch.setattr(locks.fcntl, "flock", lambda fd, op: flock(fd, op, errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        tracin.GradientStore.create(tmp_path / "s", **SPEC, rows=(300, 600))


def test_merge_ranges_covers_what_its_ranges_cover_in_one_sort():
    # merge_progress and the distributed poller merge a file's ranges at once (one sort, not one per range:
    # 8000 ranges took 20 s to resume); the rows covered are those of the ranges, as adding them one by one
    rng = np.random.default_rng(0)
    for _ in range(300):
        ranges = [sorted(rng.integers(0, 40, 2).tolist()) for _ in range(rng.integers(0, 12))]
        ranges = [r for r in ranges if r[0] < r[1]]
        covered = np.zeros(40, bool)
        for a, b in ranges:
            covered[a:b] = True
        merged = merge_ranges(ranges)
        assert np.flatnonzero(covered).tolist() == [i for a, b in merged for i in range(a, b)]
        assert all(b < c for (_, b), (c, _) in zip(merged, merged[1:], strict=False)), merged  # sorted, apart
        one_by_one: list = []
        for a, b in ranges:
            one_by_one = add_range(one_by_one, a, b)
        assert merged == one_by_one


def _runs(covered: np.ndarray) -> list[list[int]]:
    """The [start, stop) runs of True in `covered`: the naive reference of a sorted merge."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], covered.astype(np.int8), [0]])))
    return edges.reshape(-1, 2).tolist()


def test_ranges_added_out_of_order_equal_a_sorted_merge_and_undo_exactly():
    # writers add each written block with insert_range (bisect and splice; re-sorting every range per
    # write made shuffled writes quadratic, review196 F1): gaps filled, neighbours touched or overlapped
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(1, 80))
        covered = np.zeros(n, bool)
        ranges: list = []
        states, undos = [], []
        for _ in range(int(rng.integers(1, 30))):
            a = int(rng.integers(0, n))
            b = int(rng.integers(a + 1, min(n, a + 1 + (1 if trial % 2 else 9)) + 1))  # single rows: many gaps
            states.append([list(r) for r in ranges])
            kept = add_range(ranges, a, b)
            assert ranges == states[-1]  # add_range leaves its argument as it was
            undos.append(insert_range(ranges, a, b))
            assert ranges == kept
            covered[a:b] = True
            assert ranges == _runs(covered), (a, b)
        for state, undo in zip(reversed(states), reversed(undos), strict=True):
            undo()
            assert ranges == state


def test_adding_written_rows_reads_a_logarithmic_number_of_ranges():
    # operation count, not time: each add is two bisections and a splice of the ranges it merges
    class Counted(list):
        reads = 0

        def __getitem__(self, i):
            Counted.reads += 1 if isinstance(i, int) else len(range(*i.indices(len(self))))
            return super().__getitem__(i)

        def __iter__(self):
            raise AssertionError("the ranges were iterated (copied or sorted)")

    for n in (2**6, 2**16):
        ranges = Counted([2 * i, 2 * i + 1] for i in range(n))
        covered = np.arange(2 * n + 8) % 2 == 0
        covered[2 * n :] = False
        cost = []
        # past the end, filling a gap, joining two, spanning a gap to the one past the end, over 4, inside one
        for a, b in [(2 * n + 5, 2 * n + 6), (1, 2), (n + 1, n + 2), (2 * n - 1, 2 * n + 5), (7, 12), (0, 1)]:
            Counted.reads = 0
            add_written([[], ranges], [(1, a, b)])
            cost.append(Counted.reads)
            covered[a:b] = True
        bound = 2 * (n.bit_length() + 1) + 4  # two bisections of at most log2(n) + 1 steps, the ranges merged
        assert max(cost) <= bound, (n, cost)
        assert list.copy(ranges) == _runs(covered)


def test_a_range_writer_refuses_a_block_running_past_its_range_into_the_next(tmp_path):
    """r270 S8 (only the block's start checked against the range): a block starting inside the range but
    running past its stop would overwrite rows of the next range's writer, unrecorded by it."""
    path = tmp_path / "s"
    _create(path)
    with tracin.GradientStore.create(path, **SPEC, rows=(50, 200)) as r:
        with pytest.raises(ValueError, match=r"rows \[190, 210\) are outside this writer's rows \[50, 200\)"):
            r.write(0, 190, rows(0)[190:210])
        assert r.missing(0) == [[50, 200]]


def test_a_refused_resume_of_a_range_leaves_its_files_as_they_were(tmp_path):
    """Resuming a range whose rows another range's leftover files overlap is refused, and the files of the range
    resumed (its lock file included: this claim did not create it) stay (r291 M26: its lock file was removed)."""
    path = tmp_path / "s"
    _create(path)
    with tracin.GradientStore.create(path, **SPEC, rows=(0, 300)) as w:
        w.write(0, 0, np.ones((BLOCK, DIMS[0]), np.float32))
    (path / "rows-200-400.lock").touch()  # a range writer killed before its first block
    before = sorted(os.listdir(path))
    assert "rows-0-300.lock" in before
    with pytest.raises(ValueError, match=r"rows \[0, 300\) overlap rows \[200, 400\) of another range writer"):
        tracin.GradientStore.create(path, **SPEC, rows=(0, 300))
    assert sorted(os.listdir(path)) == before
