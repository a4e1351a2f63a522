"""Progress is recorded once for many blocks (writer.recording_once), after their data is synced."""

import json
import os

import numpy as np
import pytest

import tracin
from tracin.store import _files


@pytest.fixture
def events(monkeypatch):
    """(what, file name) of every fsync and rename the store makes, in order."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the files synced")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def _blocks(rng, dims):
    return [(rng.standard_normal((4, p), np.float32), rng.standard_normal((4, q), np.float32)) for p, q in dims]


def test_many_writes_are_recorded_once_after_all_their_data_is_synced(tmp_path, events):
    rng = np.random.default_rng(0)
    dims = [(2, 3), (1, 2), (3, 1)]
    w = tracin.GradientStore.create(tmp_path / "s", 8, dims, factored=True)
    first, second = _blocks(rng, dims), _blocks(rng, dims)
    events.clear()
    with w.recording_once():
        for c, block in enumerate(first):
            w.write(c, 0, block)
            assert w.rows_done(c) == 0  # not recorded yet
    assert [e for e in events if e[0] == "replace"] == [("replace", "manifest.json")]
    synced = [name for what, name in events[: events.index(("replace", "manifest.json"))] if what == "fsync"]
    assert {f"checkpoint_{c:03d}_{side}.npy" for c in range(3) for side in ("left", "right")} <= set(synced)
    assert [w.rows_done(c) for c in range(3)] == [4, 4, 4]
    with w.recording_once():
        for c, block in enumerate(second):
            w.write(c, 4, block)
    store = w.finalize()
    exact = [
        sum((a.astype(np.float64) ** 2).sum(1) * (b.astype(np.float64) ** 2).sum(1) for a, b in blocks)
        for blocks in (first, second)
    ]
    np.testing.assert_allclose(tracin.self_influence(store), np.concatenate(exact), rtol=1e-5)


def test_each_manifest_temporary_is_synced_before_it_replaces_the_manifest(tmp_path, events):
    # renamed before its fsync, a power cut can leave manifest.json empty (delayed allocation) where the
    # old one held the progress
    w = tracin.GradientStore.create(tmp_path / "s", 4, [2])
    events.clear()
    w.write(0, 0, np.ones((2, 2), np.float32))
    w.write(0, 2, np.ones((2, 2), np.float32))
    w.finalize()
    replaced = [i for i, e in enumerate(events) if e == ("replace", "manifest.json")]
    assert len(replaced) == 3  # two records and the finalize
    for before, at in zip([-1, *replaced[:-1]], replaced, strict=True):
        assert ("fsync", "manifest.json.tmp") in events[before + 1 : at]


def test_a_nested_block_leaves_the_record_to_the_outer_one(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [2, 3])
    with w.recording_once():
        w.write(0, 0, np.ones((4, 2), np.float32))
        with w.recording_once():
            w.write(1, 0, np.ones((4, 3), np.float32))
        assert [w.rows_done(0), w.rows_done(1)] == [0, 0]  # not recorded yet
    assert [w.rows_done(0), w.rows_done(1)] == [4, 4]
    assert w.finalize().complete


def test_an_error_inside_still_records_the_rows_written_before_it(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 6, [2, 3])
    with pytest.raises(ValueError, match="block has 2 columns but checkpoint 1 has 3"):
        with w.recording_once():
            w.write(0, 0, np.ones((6, 2), np.float32))
            w.write(1, 0, np.ones((6, 2), np.float32))
    assert [w.rows_done(0), w.rows_done(1)] == [6, 0]
    w.close()
    again = tracin.GradientStore.create(tmp_path / "s", 6, [2, 3])
    assert [again.rows_done(0), again.rows_done(1)] == [6, 0]  # on disk, not just in memory
    again.close()


def test_a_failed_record_after_an_error_does_not_hide_that_error(tmp_path, monkeypatch):
    w = tracin.GradientStore.create(tmp_path / "s", 6, [2, 3])

    def no_room(path, doc):
        raise OSError(28, "No space left on device", str(path))

    with pytest.raises(KeyboardInterrupt):
        with w.recording_once():
            w.write(0, 0, np.ones((6, 2), np.float32))
            monkeypatch.setattr("tracin.store._writer.write_json_atomic", no_room)
            raise KeyboardInterrupt
    with pytest.raises(OSError, match="No space left"):  # without an error of its own, the record's is raised
        with w.recording_once():
            w.write(1, 0, np.ones((6, 3), np.float32))
    w.close()


def test_range_writers_record_once_too(tmp_path, events):
    tracin.GradientStore.create(tmp_path / "s", 8, [2, 3]).close()
    r = tracin.GradientStore.create(tmp_path / "s", 8, [2, 3], rows=(2, 6))
    events.clear()
    with r.recording_once():
        r.write(0, 2, np.ones((4, 2), np.float32))
        r.write(1, 2, np.ones((4, 3), np.float32))
    assert [e for e in events if e[0] == "replace"] == [("replace", "rows-2-6.json")]
    assert json.loads((tmp_path / "s" / "rows-2-6.json").read_text())["written"] == [[[2, 6]], [[2, 6]]]
    r.close()


def test_the_manifest_is_one_line(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 2, [2])
    w.write(0, 0, np.ones((2, 2), np.float32))
    text = (tmp_path / "s" / "manifest.json").read_text()
    assert text.count("\n") == 1 and text.endswith("}\n")
    assert json.loads(text)["checkpoints"][0]["written"] == [[0, 2]]
    assert _files.read_manifest(tmp_path / "s").written == [[[0, 2]]]
    w.close()


def test_a_writer_closed_inside_the_block_records_nothing_on_leaving(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 10, [4])
    with w.recording_once():
        w.write(0, 0, np.ones((10, 4), np.float32))
        w.close()  # the lock is released: another writer re-creates the store meanwhile
        tracin.GradientStore.create(tmp_path / "s", 10, [4], overwrite=True).close()
    new = tracin.GradientStore.create(tmp_path / "s", 10, [4])
    assert new.rows_done(0) == 0  # the new store's manifest was not given the old writer's rows
    with pytest.raises(ValueError, match=r"rows not written yet \(checkpoint 0: rows \[0, 10\)\)"):
        new.finalize()
    new.close()


def test_finalize_inside_the_block_records_the_rows_written_first(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 6, [2, 3])
    data = [np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(18, dtype=np.float32).reshape(6, 3)]
    with w.recording_once():
        for c, block in enumerate(data):
            w.write(c, 0, block)
        store = w.finalize()
    assert store.complete
    for got, expected in zip(tracin.GradientStore.open(tmp_path / "s").kernel_side().blocks, data, strict=True):
        np.testing.assert_array_equal(got, expected)
