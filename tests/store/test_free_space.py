"""Room on the disk for a store: GradientStore.create (and an export starting or resuming one) warns once when
the file system has fewer bytes free than the rows still to be written take (its data files are sparse, so
nothing else would say so before the disk fills); a disk filling during an export says that rerunning the
same call resumes; an EFBIG from the process's file size limit (ulimit -f) says to raise it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tracin
from tracin.store import _create

SHORT = "file system has"


def _fake_statvfs(monkeypatch, free: int, frsize: int = 4096) -> list:
    """os.statvfs reporting `free` bytes available (rounded down to `frsize` blocks); the paths asked."""
    asked = []

    def statvfs(path):
        asked.append(Path(path))
        return SimpleNamespace(f_bavail=free // frsize, f_frsize=frsize, f_blocks=10**9, f_bsize=frsize)

    monkeypatch.setattr(_create.os, "statvfs", statvfs)
    return asked


def _short_warnings(record) -> list[str]:
    return [str(w.message) for w in record if SHORT in str(w.message)]


def _data_bytes_per_row(path: Path) -> list[int]:
    """Per checkpoint, the bytes one row takes in its data files, from the files themselves (size less the
    .npy header, over the rows)."""
    manifest = json.loads((path / "manifest.json").read_text())
    n_rows = manifest["n_rows"]
    per_row = []
    for c in range(len(manifest["checkpoints"])):
        total = 0
        for name in sorted(os.listdir(path)):
            if name.startswith(f"checkpoint_{c:03d}") and name.endswith(".npy"):
                with open(path / name, "rb") as f:
                    head = f.read(12)
                assert head[:6] == b"\x93NUMPY"
                # .npy: magic, version, then the header's length (2 bytes in version 1, else 4) and the header
                offset = (
                    10 + int.from_bytes(head[8:10], "little")
                    if head[6] == 1
                    else 12 + int.from_bytes(head[8:12], "little")
                )
                total += os.path.getsize(path / name) - offset
        assert total % n_rows == 0
        per_row.append(total // n_rows)
    return per_row


def _bytes_left(path: Path) -> int:
    """The bytes of the rows the store's manifest does not record as written, from its files' sizes."""
    manifest = json.loads((path / "manifest.json").read_text())
    left = 0
    for per_row, checkpoint in zip(_data_bytes_per_row(path), manifest["checkpoints"], strict=True):
        done = sum(stop - start for start, stop in checkpoint["written"])
        left += (manifest["n_rows"] - done) * per_row
    return left


def _numbers(message: str) -> tuple[int, int]:
    """(bytes needed, bytes free) as the warning states them."""
    need = int(message.split(" bytes, but")[0].rsplit(" ", 1)[1])
    free = int(message.split(f"{SHORT} ")[1].split(" ")[0])
    return need, free


@pytest.mark.parametrize(
    ("dims", "dtype", "factored"),
    [([7, 3], "float32", False), ([5], "float16", False), ([(3, 4), (2, 6)], "bfloat16", True)],
)
def test_create_warns_once_when_the_rows_need_more_than_the_free_space(tmp_path, monkeypatch, dims, dtype, factored):
    asked = _fake_statvfs(monkeypatch, free=4096)
    path = tmp_path / "g"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        writer = tracin.GradientStore.create(path, 1000, dims, dtype=dtype, factored=factored)
    writer.close()
    [message] = _short_warnings(record)
    [warning] = [w for w in record if SHORT in str(w.message)]
    assert warning.category is UserWarning and warning.filename == __file__  # points at the caller's line
    need, free = _numbers(message)
    assert need == _bytes_left(path) == 1000 * sum(_data_bytes_per_row(path))
    assert free == 4096
    assert str(path) in message and "rerunning the same call" in message and "resumes" in message
    assert asked == [path]


def test_no_warning_when_the_free_space_is_enough(tmp_path, monkeypatch):
    _fake_statvfs(monkeypatch, free=10**6, frsize=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tracin.GradientStore.create(tmp_path / "g", 100, [7], dtype="float32").close()
    assert _short_warnings(record) == []
    assert _bytes_left(tmp_path / "g") == 2800
    _fake_statvfs(monkeypatch, free=2800, frsize=1)  # exactly enough
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tracin.GradientStore.create(tmp_path / "g", 100, [7], dtype="float32").close()
    assert _short_warnings(record) == []
    _fake_statvfs(monkeypatch, free=2799, frsize=1)  # a byte short
    with pytest.warns(UserWarning, match=r"take 2800 bytes, but its file system has 2799 bytes free"):
        tracin.GradientStore.create(tmp_path / "g", 100, [7], dtype="float32").close()


def test_a_resumed_store_counts_only_the_rows_not_yet_written(tmp_path, monkeypatch):
    path = tmp_path / "g"
    rng = np.random.default_rng(0)
    with tracin.GradientStore.create(path, 50, [4, 6]) as writer:
        writer.write(0, 0, rng.standard_normal((50, 4)).astype(np.float32))
        writer.write(1, 10, rng.standard_normal((15, 6)).astype(np.float32))
        writer.write(1, 30, rng.standard_normal((5, 6)).astype(np.float32))
    _fake_statvfs(monkeypatch, free=0)
    with pytest.warns(UserWarning, match=SHORT) as record:
        writer = tracin.GradientStore.create(path, 50, [4, 6])
    [message] = _short_warnings(record)
    assert _numbers(message) == (_bytes_left(path), 0)
    assert _bytes_left(path) == (50 - 20) * 6 * 4
    writer.write(1, 0, np.zeros((50, 6), np.float32))
    writer.finalize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.GradientStore.create(path, 50, [4, 6]).close()  # finished: nothing left to write, no warning


def test_no_statvfs_no_warning(tmp_path, monkeypatch):
    """Windows has no os.statvfs: the store is made as before, without a warning (nor one when it fails, or
    reports a file system of no blocks)."""
    monkeypatch.delattr(_create.os, "statvfs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.GradientStore.create(tmp_path / "a", 1000, [100]).close()

    def failing(path):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(_create.os, "statvfs", failing, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.GradientStore.create(tmp_path / "b", 1000, [100]).close()

    def sizeless(path):  # fr243: some FUSE and network file systems report no blocks at all
        return SimpleNamespace(f_bavail=0, f_frsize=4096, f_blocks=0, f_bsize=4096)

    monkeypatch.setattr(_create.os, "statvfs", sizeless, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.GradientStore.create(tmp_path / "c", 1000, [100]).close()


def test_an_export_warns_once_and_a_full_disk_says_a_rerun_resumes(tmp_path, monkeypatch):
    """A disk filling during an export: the OSError names the file, says the disk is full and that rerunning
    the same call resumes; the rerun warns once of the bytes still needed (the unwritten rows) and finishes,
    byte for byte the store of an uninterrupted export."""
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    states = []
    for scale in (1.0, 0.5):
        states.append({k: v * scale for k, v in model.state_dict().items()})
    data = (torch.randn(40, 4), torch.randint(0, 3, (40,)))
    checkpoints = [(states[0], 0.5), (states[1], 0.25)]

    def loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    def export(path):
        return export_gradients(model, checkpoints, data, loss, store=path, batch_size=4, progress=False)

    export(tmp_path / "fresh")
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(fd)
        if len(calls) > 12:  # the store's creation (3 files), then a few batches (data, then their record)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    path = tmp_path / "s"
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as err:
        export(path)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert err.value.errno == errno.ENOSPC and str(path) in err.value.filename
    text = str(err.value)
    assert "the disk is full" in text and "rerun the same export call, which resumes where it stopped" in text
    assert text.count("rerun the same export call") == 1
    left = _bytes_left(path)
    assert 0 < left < sum(_data_bytes_per_row(path)) * 40  # some rows were kept, some are left

    _fake_statvfs(monkeypatch, free=1000, frsize=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        store = export(path)
    [message] = _short_warnings(record)
    assert _numbers(message) == (left, 1000) and str(path) in message
    assert store.complete
    for name in ("checkpoint_000.npy", "checkpoint_001.npy"):
        assert (path / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


@pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_FSIZE")
def test_a_process_file_size_limit_is_named_with_how_to_raise_it(tmp_path):
    """EFBIG from this process's RLIMIT_FSIZE (ulimit -f, as batch schedulers set): the message names the limit
    and says to raise it, rather than blaming the file system."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        import tracin
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            tracin.GradientStore.create({str(tmp_path / "g")!r}, n_rows=400, dims=[1539], weights=[0.1])
        except OSError as e:
            print(e.errno, e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith(f"{errno.EFBIG} ")
    assert "a data file of 2462528 bytes" in out.stdout
    assert "file size limit (RLIMIT_FSIZE, ulimit -f) is 2048000 bytes: raise it" in out.stdout
    assert "the file system refuses" not in out.stdout


def test_the_warning_made_an_error_leaves_the_store_unlocked(tmp_path, monkeypatch):
    """Under -W error the warning raises from create: the store's lock is released, so the same call, once
    space is found (or the warning let through), opens it again instead of a RuntimeError."""
    _fake_statvfs(monkeypatch, free=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=SHORT):
            tracin.GradientStore.create(tmp_path / "g", 100, [7])
    _fake_statvfs(monkeypatch, free=10**6, frsize=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracin.GradientStore.create(tmp_path / "g", 100, [7]).close()
