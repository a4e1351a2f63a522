"""Stores tracin did not write, or that change under it: planted links and foreign files, hostile
manifests, OS errors (permission denied, too many open files, a full disk), stores re-created or
truncated under a reader. Nothing is written outside the store, nothing crashes or hangs, and every
error names the file and says what happened."""

from __future__ import annotations

import builtins
import errno
import gc
import inspect
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import tracin
from tracin.cli import main
from tracin.store import StoreChangedError, StoreFormatError

from .helpers import random_blocks, read_rows, write_store

HAS_PROC_FD = Path("/proc/self/fd").is_dir()


@pytest.fixture
def store(tmp_path):
    """A finished store of 6 rows, two checkpoints, with ids."""
    return write_store(tmp_path / "s", random_blocks(6, [4, 3], "float32", False), [0.5, 2.0], ids=list(range(6)))


def _unfinished(path: Path) -> np.ndarray:
    """An unfinished store at `path` (rows [0, 3) of 6 written); returns the rows written."""
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    w = tracin.GradientStore.create(path, 6, [4])
    w.write(0, 0, rows)
    w.close()
    return rows


def _deny(monkeypatch, name: str, code: int, builtin_open: bool = True) -> None:
    """Opening a file called `name` fails with OSError `code`, through os.open (and open())."""

    def check(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).name == name:
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *args, **kwargs):
        check(path)
        return real_os_open(path, *args, **kwargs)

    def open_(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    if builtin_open:
        monkeypatch.setattr(builtins, "open", open_)


def _fill_disk(monkeypatch, name: str, room: int = 496, code: int = errno.ENOSPC) -> None:
    """Writes into a file called `name` stop after `room` bytes with ENOSPC (a full disk; or `code`)."""
    real = os.pwrite
    written = [0]

    def pwrite(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/" + name):
            if written[0] >= room:
                raise OSError(code, os.strerror(code))
            n = real(fd, memoryview(data)[: room - written[0]], offset)
            written[0] += n
            return n
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def _one_line_cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"tracin {argv[0]}: error:"), captured.err
    return captured.err


# -- planted links -----------------------------------------------------------------------------------


def test_a_link_planted_as_the_manifest_temporary_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tracin.GradientStore.create(tmp_path / "s", 10, [4]).close()
    os.symlink(victim, tmp_path / "s" / "manifest.json.tmp")
    w = tracin.GradientStore.create(tmp_path / "s", 10, [4])
    w.write(0, 0, np.ones((2, 4), np.float32))
    w.close()
    assert victim.read_text() == "precious"
    assert not (tmp_path / "s" / "manifest.json").is_symlink()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["checkpoints"][0]["written"] == [[0, 2]]


def test_a_temporary_left_or_planted_while_the_writer_is_open_is_removed_not_written_through(tmp_path):
    # create() clears a stale manifest.json.tmp, but one can appear later: an interrupt between the temporary's
    # write and its rename (a notebook keeps the writer), or a link planted by another user; each record
    # removes it first, else O_EXCL fails every later record
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    w = tracin.GradientStore.create(tmp_path / "s", 10, [4])
    tmp = tmp_path / "s" / "manifest.json.tmp"
    tmp.write_bytes(b"{")
    w.write(0, 0, np.ones((2, 4), np.float32))
    os.symlink(victim, tmp)
    w.write(0, 2, np.ones((2, 4), np.float32))
    w.close()
    assert victim.read_text() == "precious" and not tmp.exists()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["checkpoints"][0]["written"] == [[0, 4]]


def test_a_data_file_replaced_by_a_link_is_refused_on_resume_and_on_open(tmp_path):
    _unfinished(tmp_path / "s")
    data = tmp_path / "s" / "checkpoint_000.npy"
    outside = tmp_path / "outside.npy"
    outside.write_bytes(data.read_bytes())  # a valid file of the very same shape
    before = outside.read_bytes()
    data.unlink()
    os.symlink(outside, data)
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy is a symbolic link"):
        tracin.GradientStore.create(tmp_path / "s", 6, [4])
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy is a symbolic link"):
        tracin.GradientStore.open(tmp_path / "s", allow_partial=True)
    assert outside.read_bytes() == before
    # overwrite=True removes the link, never its target
    w = tracin.GradientStore.create(tmp_path / "s", 6, [4], overwrite=True)
    w.write(0, 0, np.full((6, 4), 7, np.float32))
    np.testing.assert_array_equal(read_rows(w.finalize())[0], np.full((6, 4), 7))
    assert outside.read_bytes() == before and not data.is_symlink()


@pytest.mark.parametrize("name", ["manifest.json", "ids.npy", "checkpoint_001.npy"])
def test_links_in_a_finished_store_are_refused_on_open(store, tmp_path, name):
    target = tmp_path / f"copy-of-{name}"
    (store.path / name).rename(target)
    os.symlink(target, store.path / name)
    with pytest.raises(StoreFormatError, match=f"{name} is a symbolic link"):
        tracin.GradientStore.open(store.path)


def test_a_fifo_in_place_of_a_data_file_is_refused_without_hanging(store):
    (store.path / "checkpoint_000.npy").unlink()
    os.mkfifo(store.path / "checkpoint_000.npy")
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy is not a regular file"):
        tracin.GradientStore.open(store.path)


def test_a_fifo_or_directory_is_refused_before_it_is_opened(store, monkeypatch):
    # opening a device node can act on the device (rewind a tape): lstat first, open only regular files
    (store.path / "checkpoint_000.npy").unlink()
    os.mkfifo(store.path / "checkpoint_000.npy")
    (store.path / "ids.npy").unlink()
    (store.path / "ids.npy").mkdir()
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(os.fsdecode(path)).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy is not a regular file"):
        tracin.GradientStore.open(store.path)
    with pytest.raises(StoreFormatError, match="ids.npy is a directory"):
        tracin.store._files.open_file(store.path / "ids.npy")
    assert "manifest.json" in opened and "checkpoint_000.npy" not in opened and "ids.npy" not in opened


@pytest.mark.parametrize("name", ["rows-0-3.lock", "rows-0-3.json.tmp", "rows-0-3.json"])
def test_a_directory_in_place_of_a_range_file_is_refused_by_the_merge(tmp_path, name):
    tracin.GradientStore.create(tmp_path / "s", 6, [4]).close()
    (tmp_path / "s" / name).mkdir()
    with pytest.raises(StoreFormatError, match=f"{name} is (a directory|not a regular file)"):
        tracin.GradientStore.create(tmp_path / "s", 6, [4])
    (tmp_path / "s" / name).rmdir()
    w = tracin.GradientStore.create(tmp_path / "s", 6, [4])
    w.write(0, 0, np.ones((6, 4), np.float32))
    assert w.finalize().complete


def test_a_directory_in_place_of_the_manifest_temporary_is_refused_naming_it(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 6, [4])
    (tmp_path / "s" / "manifest.json.tmp").mkdir()
    message = r"manifest\.json\.tmp is a directory \(a gradient store holds regular files only\); remove it"
    with pytest.raises(StoreFormatError, match=message):
        w.write(0, 0, np.ones((6, 4), np.float32))
    w.close()


# -- foreign files --------------------------------------------------------------------------------


def test_a_folder_of_user_files_named_like_a_store_is_not_replaced_without_overwrite(tmp_path):
    mine = tmp_path / "work"
    mine.mkdir()
    np.save(mine / "checkpoint_000.npy", np.arange(8.0).reshape(2, 4))
    np.save(mine / "ids.npy", np.arange(2))
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    with pytest.raises(ValueError, match=r"holds checkpoint_000.npy, ids.npy but no manifest.json.*overwrite=True"):
        tracin.GradientStore.create(mine, 2, [4])
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    w = tracin.GradientStore.create(mine, 2, [4], overwrite=True)  # asked for: replaced
    assert w.rows_done(0) == 0
    w.close()  # its record, writer.info, goes with it
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoint_000.npy", "manifest.json"]


# -- OS errors are reported as what they are -----------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EACCES, errno.EMFILE])
def test_an_os_error_on_a_data_file_is_not_called_corruption(store, monkeypatch, code):
    _deny(monkeypatch, "checkpoint_001.npy", code)
    with pytest.raises(OSError) as failure:
        tracin.GradientStore.open(store.path)
    assert failure.value.errno == code and not isinstance(failure.value, StoreFormatError)
    text = str(failure.value)
    assert "checkpoint_001.npy" in text and os.strerror(code) in text
    assert "corrupt" not in text and "overwrite" not in text


def test_an_os_error_on_resume_gives_no_advice_to_overwrite(tmp_path, monkeypatch):
    _unfinished(tmp_path / "s")
    _deny(monkeypatch, "checkpoint_000.npy", errno.EACCES)
    with pytest.raises(PermissionError) as failure:
        tracin.GradientStore.create(tmp_path / "s", 6, [4])
    assert "checkpoint_000.npy" in str(failure.value) and "overwrite" not in str(failure.value)


def test_resuming_a_store_whose_data_file_is_missing_says_so_and_how_to_start_over(tmp_path):
    # review140 F3: the reader said "data file is missing"; create (same spec) and a range writer raised a bare
    # FileNotFoundError from lstat instead: no advice, and past code that catches StoreFormatError to start over
    path = tmp_path / "s"
    rows = _unfinished(path)
    os.remove(path / "checkpoint_000.npy")
    missing = re.escape(f"{path / 'checkpoint_000.npy'}: data file is missing")
    with pytest.raises(StoreFormatError, match=f"^{missing}$"):
        tracin.GradientStore.open(path, allow_partial=True)
    with pytest.raises(StoreFormatError, match=f"^{missing}; pass overwrite=True to replace it$"):
        tracin.GradientStore.create(path, 6, [4])
    with pytest.raises(
        StoreFormatError, match=f"^{missing}; create the store again without rows= \\(overwrite=True\\)"
    ):
        tracin.GradientStore.create(path, 6, [4], rows=(3, 6))
    w = tracin.GradientStore.create(path, 6, [4], overwrite=True)  # as advised
    w.write(0, 0, np.concatenate([rows, -rows]))
    assert np.array_equal(read_rows(w.finalize())[0], np.concatenate([rows, -rows]))


_EXPORT_BATCHES_LEFT: list[int] = []  # outside the loss's closure: a closure value is part of the export's identity


def _stopping_loss(out, t):
    if _EXPORT_BATCHES_LEFT and len(t) == 4:  # a batch of the export, not one of its checks on 1 or 2 rows
        _EXPORT_BATCHES_LEFT[0] -= 1
        if _EXPORT_BATCHES_LEFT[0] < 0:
            raise RuntimeError("stopped")
    return (out.squeeze(-1) - t) ** 2


def test_an_export_resuming_a_store_whose_data_file_is_missing_says_so_and_how_to_start_over(tmp_path):
    # review140 F3, through tracin.torch.export_gradients(store=): its own advice, as for the other damage
    torch = pytest.importorskip("torch")
    import tracin.torch as tt

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12)
    model = torch.nn.Linear(3, 1)
    states = [({k: v.detach() * s for k, v in model.state_dict().items()}, 0.1) for s in (1.0, 0.5)]
    _EXPORT_BATCHES_LEFT[:] = [4]
    try:
        with pytest.raises(RuntimeError, match="stopped"):
            tt.export_gradients(
                model, states, (x, y), _stopping_loss, store=tmp_path / "g", batch_size=4, progress=False
            )
    finally:
        _EXPORT_BATCHES_LEFT.clear()
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["checkpoints"][0]["written"]  # not replaced
    os.remove(tmp_path / "g" / "checkpoint_001.npy")
    said = re.escape(f"{tmp_path / 'g' / 'checkpoint_001.npy'}: data file is missing; export into another directory")
    with pytest.raises(StoreFormatError, match=f"^{said}"):
        tt.export_gradients(model, states, (x, y), _stopping_loss, store=tmp_path / "g", batch_size=4, progress=False)


def test_an_os_error_on_the_ids_file_is_not_called_unreadable_ids(store, monkeypatch):
    _deny(monkeypatch, "ids.npy", errno.EACCES)
    with pytest.raises(PermissionError, match="ids.npy"):
        tracin.GradientStore.open(store.path)


def test_the_cli_reports_an_os_error_as_one_line(store, monkeypatch, capsys):
    _deny(monkeypatch, "checkpoint_000.npy", errno.EACCES)
    err = _one_line_cli_error(capsys, ["info", str(store.path)])
    assert "Permission denied" in err and "checkpoint_000.npy" in err and "corrupt" not in err


def test_a_failed_create_closes_its_lock_descriptor_once(tmp_path, monkeypatch):
    _unfinished(tmp_path / "s")
    lock_fds = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if Path(os.fsdecode(path)) == tmp_path / "s":
            lock_fds.append(fd)
        return fd

    monkeypatch.setattr(os, "open", spy)
    _deny(monkeypatch, "checkpoint_000.npy", errno.EMFILE, builtin_open=False)  # fails opening to write
    with pytest.raises(OSError) as failure:
        tracin.GradientStore.create(tmp_path / "s", 6, [4])
    monkeypatch.undo()
    held = []  # the user opens files until one gets the lock's old descriptor number
    while not held or held[-1].fileno() != lock_fds[0]:
        assert len(held) < 64, "the lock's descriptor was not released"
        held.append(open(tmp_path / f"log{len(held)}.txt", "w"))  # noqa: SIM115
    log = held[-1]
    del failure
    gc.collect()  # whatever the failed create left behind goes now
    log.write("still mine")
    for f in held:
        f.close()
    assert log.name.endswith(".txt") and Path(log.name).read_text() == "still mine"


# -- a full disk --------------------------------------------------------------------------------------

needs_proc_fd = pytest.mark.skipif(not HAS_PROC_FD, reason="needs /proc/self/fd to see which file is written")


@needs_proc_fd
def test_a_full_disk_while_creating_names_the_file(tmp_path, monkeypatch):
    _fill_disk(monkeypatch, "ids.npy")
    with pytest.raises(OSError) as failure:
        tracin.GradientStore.create(tmp_path / "s", 20000, [2], ids=[f"example-{i}" for i in range(20000)])
    assert failure.value.errno == errno.ENOSPC
    assert "ids.npy" in str(failure.value) and "the disk is full" in str(failure.value)
    monkeypatch.undo()  # space freed: the same create starts again from scratch
    assert tracin.GradientStore.create(tmp_path / "s", 20000, [2], ids=[f"example-{i}" for i in range(20000)])


@needs_proc_fd
@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_while_writing_names_the_file_and_the_rows_can_be_redone(tmp_path, monkeypatch, code):
    w = tracin.GradientStore.create(tmp_path / "s", 300, [4, 8])
    block = np.ones((300, 8), np.float32)
    _fill_disk(monkeypatch, "checkpoint_001.npy", code=code)  # EDQUOT: the user's quota is full
    with pytest.raises(OSError) as failure:
        w.write(1, 0, block)
    assert failure.value.errno == code
    assert "checkpoint_001.npy" in str(failure.value) and "the disk is full" in str(failure.value)
    assert w.rows_done(1) == 0  # nothing recorded
    monkeypatch.undo()
    w.write(1, 0, block)
    w.write(0, 0, np.ones((300, 4), np.float32))
    np.testing.assert_array_equal(read_rows(w.finalize())[1], block)


@needs_proc_fd
def test_a_full_disk_while_recording_progress_names_the_manifest(tmp_path, monkeypatch):
    w = tracin.GradientStore.create(tmp_path / "s", 3, [4])
    _fill_disk(monkeypatch, "manifest.json.tmp", room=10)
    with pytest.raises(OSError, match=r"the disk is full.*manifest\.json\.tmp"):
        w.write(0, 0, np.ones((3, 4), np.float32))
    assert not (tmp_path / "s" / "manifest.json.tmp").exists()


# -- hostile manifests ------------------------------------------------------------------------------


def _with_raw(store_path: Path, replace: str, by: str) -> None:
    text = (store_path / "manifest.json").read_text()
    assert replace in text
    (store_path / "manifest.json").write_text(text.replace(replace, by, 1))


@pytest.mark.parametrize(
    "replace, by, message",
    [
        ('"weight": 0.5', '"weight": 1' + "0" * 400, "weight must be a finite number"),
        ('"weight": 0.5', '"weight": 1e400', "beyond the float64 range"),
        ('"weight": 0.5', '"weight": true', "weight must be a finite number, got True"),  # not read as 1.0
        # review150 F2: read as 0.0 (the checkpoint counted for nothing), where create refuses the same value
        ('"weight": 0.5', '"weight": -1.5e-400', r"checkpoints\[0\]\.weight is -1.5e-400, which is not 0 but rounds"),
        ('"metadata": {}', '"metadata": {"a b": [0.0, 2E-999]}', r"metadata\['a b'\]\[1\] is 2E-999, which is not 0"),
        ('"metadata": {}', '"metadata": {"' + "k" * 1000 + '": 1e-400}', r"metadata\['k{79}\.\.\.\] is 1e-400"),
        ('"weight": 0.5', '"weight": NaN', "NaN is not a JSON number"),
        ('"n_rows": 6', '"n_rows": 1' + "0" * 5000, "not valid JSON"),
        ('"n_rows": 6', '"n_rows": 100000000000000000000', "n_rows must be a positive integer below 2"),
        ('"n_rows": 6', '"n_rows": 0', "n_rows must be a positive integer below 2"),
        ('"dim": 3', '"dim": 0', r"checkpoints\[1\] dims must be positive integers"),
        ('"metadata": {}', '"metadata": ' + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('"complete": true', '"complete": "yes"', "complete and weights_given must be true or false"),
        ('"checkpoint_001.npy"', '"checkpoint_000.npy"', "names a data file already used"),
        ('"checkpoint_001.npy"', '"ids.npy"', "names unexpected data files"),
        ('"id": "', '"id": "zz', "id must be 32 lowercase hex digits"),
        ('"id": "', '"id": "0', "id must be 32 lowercase hex digits"),  # 33 digits, its first 32 an id
        ('"version": 1', '"version": 0', "format version must be a positive integer, got 0"),
        ('"checkpoint_001.npy"', '"checkpoint_' + "1" * 300 + '.npy"', "names unexpected data files"),
        ('"checkpoint_001.npy"', '"checkpoint_\u0663.npy"', "names unexpected data files"),  # an Arabic-Indic 3
        ('"n_rows": 6', '"n_rows": 6, "n_rows": 5', "key 'n_rows' appears twice in one object"),
        ('"weights_given": true', '"weights_given": false', r"weight is 0.5 but weights_given is false"),
        (
            '"metadata": {}',
            '"metadata": {"mode": "full", "preconditioner": "sgd"}',
            r"metadata\['preconditioner'\] must be null or an object with a string 'kind'.*got 'sgd'",
        ),
        ('"metadata": {}', '"metadata": {"framework": "jax", "params": [1, 2]}', r"\['params'\]\[0\] must be an obj"),
        ('"metadata": {}', '"metadata": {"framework": "jax", "params": [{"rows": 4}]}', r"\['params'\]\[0\] must be"),
        ('"metadata": {}', '"metadata": {"framework": "jax", "params": "fc.weight"}', r"\['params'\] must be a list"),
        ('"metadata": {}', '"metadata": {"deep": ' + "[" * 70 + "]" * 70 + "}", r"nested too deeply \(72 levels"),
        # 3 MiB of empty arrays: hundreds of MiB once parsed, so refused unparsed (as are 2**20 written ranges)
        (
            '"metadata": {}',
            '"metadata": {"x": [' + "[]," * 2**20 + "[]]}",
            r"JSON arrays and objects \(at most 1048576,",
        ),
    ],
)
def test_every_malformed_manifest_is_a_store_format_error(store, capsys, replace, by, message):
    _with_raw(store.path, replace, by)
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.open(store.path)
    with pytest.raises(StoreFormatError, match=message):
        tracin.GradientStore.create(store.path, 6, [4, 3], [0.5, 2.0], ids=list(range(6)))
    assert "malformed gradient store" in _one_line_cli_error(capsys, ["info", str(store.path)])


def test_a_factored_manifest_naming_one_file_as_both_factors_is_refused(tmp_path):
    # left and right of equal width in one file pass every shape check: the writer's right factors would
    # overwrite its left ones, and a reader would read the right factors as both
    path = tmp_path / "s"
    tracin.GradientStore.create(path, 4, [(2, 2)], factored=True).close()
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"checkpoint_000_right.npy"', '"checkpoint_000_left.npy"', 1))
    with pytest.raises(StoreFormatError, match=r"checkpoints\[0\] names a data file already used"):
        tracin.GradientStore.open(path)
    with pytest.raises(StoreFormatError, match=r"checkpoints\[0\] names a data file already used"):
        tracin.GradientStore.create(path, 4, [(2, 2)], factored=True)


def test_a_data_file_name_of_ten_megabytes_is_refused_in_a_short_message(store, capsys):
    _with_raw(store.path, '"checkpoint_001.npy"', '"checkpoint_' + "7" * 10_000_000 + '.npy"')
    with pytest.raises(StoreFormatError, match="names unexpected data files") as e:
        tracin.GradientStore.open(store.path)
    assert len(str(e.value)) < 500
    assert len(_one_line_cli_error(capsys, ["info", str(store.path)])) < 600


def test_a_projection_spec_of_a_megabyte_in_the_metadata_is_quoted_short(tmp_path, capsys):
    # review140 F4: metadata['projection'] with a 1e6-character kind: `tracin score` wrote a 1 MB error line
    blocks = random_blocks(3, [4], "float32", False)
    hostile = {**tracin.Projection(4, 1).to_dict(), "kind": "x" * 1_000_000}
    test = write_store(tmp_path / "t", blocks, [1.0], metadata={"projection": hostile})
    train = write_store(tmp_path / "x", blocks, [1.0], metadata={"projection": tracin.Projection(4, 1).to_dict()})
    with pytest.raises(ValueError, match=r"metadata\['projection'\] is not a projection spec .*kind must be") as e:
        tracin.top_k(test, train, k=1)
    assert len(str(e.value)) < 800
    argv = ["score", "--test", str(test.path), "--train", str(train.path), "-o", str(tmp_path / "s.csv")]
    assert "kind must be one of" in (err := _one_line_cli_error(capsys, argv)) and len(err) < 800


@pytest.mark.parametrize(
    "encode, message",
    [
        (lambda text: b"\xef\xbb\xbf" + text.encode(), "starts with a byte-order mark"),
        (lambda text: text.encode("utf-16"), "not UTF-8"),
        (lambda text: text.encode("utf-16-le"), "not valid JSON"),
        (lambda text: text.replace('"format"', '"f\xf6rmat"', 1).encode("latin-1"), "not UTF-8"),
    ],
)
def test_a_manifest_must_be_utf8_without_a_byte_order_mark(store, encode, message):
    path = store.path / "manifest.json"
    path.write_bytes(encode(path.read_text()))
    with pytest.raises(StoreFormatError, match=f"manifest.json: corrupt manifest, {message}"):
        tracin.GradientStore.open(store.path)


def _nested(levels: int) -> list:
    """A list nested `levels` deep ([] is one level)."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _at_stack_depth(frames: int, call):
    return call() if frames == 0 else _at_stack_depth(frames - 1, call)


def test_the_nesting_bound_holds_whatever_the_callers_stack_depth(tmp_path):
    # metadata of 63 levels makes a manifest of 64 (the bound): accepted, also when opened deep in a stack
    w = tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata={"deep": _nested(62)})
    w.write(0, 0, np.ones((2, 3), np.float32))
    w.finalize()
    frames = sys.getrecursionlimit() - len(inspect.stack()) - 80
    assert _at_stack_depth(frames, lambda: tracin.GradientStore.open(tmp_path / "s")).metadata["deep"] == _nested(62)
    with pytest.raises(ValueError, match="metadata nests 64 levels deep, but a store's manifest allows 63"):
        tracin.GradientStore.create(tmp_path / "t", 2, [3], metadata={"deep": _nested(63)})
    with pytest.raises(ValueError, match="metadata nests too deeply: a store's manifest allows 63 levels"):
        tracin.GradientStore.create(tmp_path / "t", 2, [3], metadata={"deep": _nested(5000)})
    assert not (tmp_path / "t").exists()
    # a deeper manifest is refused by open and by create's resume, from a shallow stack too
    _with_raw(tmp_path / "s", '"deep": ' + "[" * 62 + "]" * 62, '"deep": ' + "[" * 362 + "]" * 362)
    with pytest.raises(StoreFormatError, match=r"nested too deeply \(364 levels; at most 64\)"):
        tracin.GradientStore.open(tmp_path / "s")
    with pytest.raises(StoreFormatError, match="nested too deeply"):
        tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata={"deep": _nested(62)})


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"mode": "full", "preconditioner": "sgd"}, r"metadata\['preconditioner'\] must be null or an object"),
        ({"mode": "full", "preconditioner": {"lr": 0.1}}, r"metadata\['preconditioner'\] must be null or an object"),
        ({"framework": "jax", "params": ["fc.weight"]}, r"metadata\['params'\]\[0\] must be an object with a string"),
        ({1: "a", "1": "b"}, "metadata: key '1' appears twice in one object once its keys are JSON strings"),
    ],
)
def test_create_refuses_metadata_that_open_would_refuse(tmp_path, metadata, message):
    with pytest.raises(ValueError, match=message):
        tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata=metadata)
    assert not (tmp_path / "s").exists()


def test_create_never_writes_a_manifest_of_more_arrays_and_objects_than_open_accepts(tmp_path):
    with pytest.raises(ValueError, match="JSON arrays and objects"):
        tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata={"x": [[] for _ in range(2**19 + 1)]})
    assert not (tmp_path / "s").exists()  # refused before it creates anything


def test_metadata_of_the_users_own_is_not_read_whatever_its_values(tmp_path):
    # "preconditioner" / "params" are the adapters' records only next to "mode" / "framework"; a store
    # written with free-form metadata (accepted before the records were checked) opens and scores
    metadata = {"params": {"lr": 0.1}, "preconditioner": "sgd"}
    w = tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata=metadata)
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    w.write(0, 0, rows)
    store = tracin.GradientStore.open(w.finalize().path)
    assert store.metadata == metadata
    np.testing.assert_allclose(tracin.self_influence(store), (rows.astype(np.float64) ** 2).sum(1), rtol=1e-6)


def test_a_string_full_of_escaped_quotes_that_never_ends_is_refused_at_once(store):
    # the depth scan tried a string pattern from every quote: quadratic, about an hour for this 800 kB
    _with_raw(store.path, '"metadata": {}', '"metadata": {"x": "' + '\\"' * 400_000)
    with pytest.raises(StoreFormatError, match="not valid JSON"):
        tracin.GradientStore.open(store.path)


def test_the_recorded_keys_in_their_documented_shapes_are_accepted(tmp_path):
    metadata = {"preconditioner": {"kind": "adam", "b1": 0.9}, "params": [{"name": "fc.weight", "shape": [3]}]}
    w = tracin.GradientStore.create(tmp_path / "s", 2, [3], metadata=metadata)
    w.write(0, 0, np.ones((2, 3), np.float32))
    assert w.finalize().metadata == metadata


def test_a_huge_manifest_is_refused_unread(store):
    with open(store.path / "manifest.json", "r+b") as f:
        f.truncate(65 * 2**20)
    with pytest.raises(StoreFormatError, match="larger than 67108864 bytes"):
        tracin.GradientStore.open(store.path)


# -- stores that change under a reader --------------------------------------------------------------


def test_a_store_re_created_under_a_reader_is_an_error_not_zeros(store, tmp_path):
    blocks = random_blocks(6, [4, 3], "float32", False)
    old = tracin.GradientStore.open(store.path)
    ids = old.ids
    new = tracin.GradientStore.create(store.path, 6, [4, 3], [0.5, 2.0], ids=list(range(6)), overwrite=True)
    with pytest.raises(StoreChangedError, match="re-created after it was opened"):
        tracin.top_k(blocks, old, k=2)
    for c, b in enumerate(blocks):
        new.write(c, 0, b)
    new.finalize()
    with pytest.raises(StoreChangedError, match="re-created after it was opened"):
        tracin.self_influence(old)
    with pytest.raises(StoreChangedError):
        old.ids  # noqa: B018
    assert ids.tolist() == list(range(6))  # what was mapped before stays valid
    again = tracin.GradientStore.open(store.path)
    exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip([0.5, 2.0], blocks, strict=True))
    np.testing.assert_allclose(tracin.self_influence(again), exact, rtol=1e-6)


def test_a_data_file_replaced_or_modified_under_a_reader_is_an_error(store):
    reader = tracin.GradientStore.open(store.path)
    data = store.path / "checkpoint_001.npy"
    other = data.with_name("other.npy")
    other.write_bytes(data.read_bytes())
    os.replace(other, data)  # another file (inode), same name, size and bytes
    with pytest.raises(StoreChangedError, match="checkpoint_001.npy was replaced or modified after"):
        reader.kernel_side(0, 6)
    reader = tracin.GradientStore.open(store.path)
    with open(data, "r+b") as f:  # modified in place (a finished store is never written again)
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff" * 4)
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clock tick later, surely
    with pytest.raises(StoreChangedError, match="checkpoint_001.npy was replaced or modified after"):
        reader.kernel_side(0, 6)


def test_a_reader_of_an_unfinished_store_keeps_working_while_the_writer_resumes(tmp_path):
    rows = _unfinished(tmp_path / "s")
    reader = tracin.GradientStore.open(tmp_path / "s", allow_partial=True)
    w = tracin.GradientStore.create(tmp_path / "s", 6, [4])
    w.write(0, 3, np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(tracin.self_influence(reader), (rows.astype(np.float64) ** 2).sum(1))
    w.close()


@pytest.mark.parametrize("new_size", [lambda size: size // 3, lambda size: size + 4096])
def test_a_data_file_resized_under_a_reader_is_refused_before_it_is_mapped(tmp_path, new_size):
    store = write_store(tmp_path / "s", [np.ones((4096, 256), np.float32)], step=4096)
    reader = tracin.GradientStore.open(store.path, chunk_bytes=64 * 256 * 4)
    path = store.path / "checkpoint_000.npy"
    os.truncate(path, new_size(path.stat().st_size))  # another process cuts the file short (or extends it)
    with pytest.raises(StoreChangedError, match=r"checkpoint_000.npy is \d+ bytes now but was \d+ .*SIGBUS"):
        tracin.self_influence(reader)
