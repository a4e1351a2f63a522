"""A store of many checkpoints (hundreds of data files) is written and read with few open files."""

import errno
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tracin
from tracin.store import StoreChangedError, _npy, _store

resource = pytest.importorskip("resource")

_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import tracin

    path, slots = sys.argv[1], int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    rng = np.random.default_rng(0)
    blocks = [(rng.standard_normal((6, 2), np.float32), rng.standard_normal((6, 3), np.float32)) for _ in range(slots)]
    w = tracin.GradientStore.create(path, 6, [(2, 3)] * slots, factored=True)
    for c, (left, right) in enumerate(blocks[: slots // 2]):
        w.write(c, 0, (left, right))
    w.close()
    w = tracin.GradientStore.create(path, 6, [(2, 3)] * slots, factored=True)  # resumed: checks every file
    for c, (left, right) in enumerate(blocks):
        w.write(c, 0, (left, right))
    store = w.finalize()
    reopened = tracin.GradientStore.open(path, chunk_bytes=store.row_bytes * 2)  # 3 chunks
    exact = sum((l.astype(np.float64) ** 2).sum(1) * (r.astype(np.float64) ** 2).sum(1) for l, r in blocks)
    np.testing.assert_allclose(tracin.self_influence(reopened), exact, rtol=1e-5)
    print("ok")
    """
)


def test_hundreds_of_factored_slots_under_a_limit_of_64_open_files(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "s"), "300"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok"]
    assert len([n for n in os.listdir(tmp_path / "s") if n.endswith(".npy")]) == 600


def test_a_data_file_replaced_under_a_writer_is_an_error(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [3, 2])
    data = tmp_path / "s" / "checkpoint_001.npy"
    other = data.with_name("other.npy")
    other.write_bytes(data.read_bytes())
    os.replace(other, data)  # another file (inode), same name, size and bytes
    with pytest.raises(StoreChangedError, match="checkpoint_001.npy was replaced or resized"):
        w.write(1, 0, np.ones((4, 2), np.float32))
    assert w.rows_done(1) == 0
    w.write(0, 0, np.ones((4, 3), np.float32))  # the other checkpoint's file is still the one checked
    data.unlink()
    with pytest.raises(StoreChangedError, match="checkpoint_001.npy was removed"):
        w.write(1, 0, np.ones((4, 2), np.float32))
    w.close()


@pytest.mark.parametrize("factored", [False, True])
def test_a_store_of_more_files_than_it_may_map_is_read_with_the_same_values(tmp_path, monkeypatch, factored):
    rng = np.random.default_rng(1)
    dims = [(3, 2), (1, 4)] if factored else [5, 2]
    shapes = [list(d) for d in dims] if factored else [[d] for d in dims]
    blocks = [[rng.standard_normal((9, w), np.float32) for w in widths] for widths in shapes]
    w = tracin.GradientStore.create(tmp_path / "s", 9, dims, dtype="float16", factored=factored)
    for c, arrays in enumerate(blocks):
        w.write(c, 0, tuple(arrays) if factored else arrays[0])
    store = w.finalize()
    mapped = store.kernel_side(2, 7)
    monkeypatch.setattr(_store, "_mappable_files", lambda: 0)
    read = store.kernel_side(2, 7)
    assert all(_mapped(b) and not b.flags.writeable for b in mapped.blocks)
    assert not any(_mapped(b) or b.flags.writeable for b in read.blocks)
    expected = [a[2:7].astype(np.float16) for arrays in blocks for a in arrays]
    for got in (mapped, read):
        assert len(got.blocks) == len(expected)
        for b, e in zip(got.blocks, expected, strict=True):
            np.testing.assert_array_equal(b, e)


def _mapped(array: np.ndarray) -> bool:
    """Whether the array's memory is a memory map."""
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return isinstance(base, mmap.mmap)


def test_a_file_shorter_than_the_rows_read_is_a_store_changed_error(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(np.arange(10, dtype="<f4").tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        np.testing.assert_array_equal(
            _npy.read_array(fd, np.dtype("<f4"), 8, (2, 4), path), np.arange(2, 10).reshape(2, 4)
        )
        with pytest.raises(StoreChangedError, match="x.bin became shorter while it was read"):
            _npy.read_array(fd, np.dtype("<f4"), 12, (2, 4), path)
    finally:
        os.close(fd)


def test_each_chunk_parses_the_manifest_only_when_its_bytes_changed(tmp_path, monkeypatch):
    from tracin.store import _files

    w = tracin.GradientStore.create(tmp_path / "s", 6, [2, 3])
    w.write(0, 0, np.ones((3, 2), np.float32))
    w.write(1, 0, np.ones((3, 3), np.float32))
    reader = tracin.GradientStore.open(tmp_path / "s", allow_partial=True)[1:]  # a view keeps what was seen
    parsed = []
    for module in (_store, _files):
        real = getattr(module, "parse_manifest", None)

        def counting(data, where, real=real):
            parsed.append(where)
            return real(data, where)

        monkeypatch.setattr(module, "parse_manifest", counting, raising=False)
    for _ in range(3):
        np.testing.assert_array_equal(reader.kernel_side(0, 2).blocks[1], np.ones((2, 3)))
    assert parsed == []
    w.write(0, 3, np.ones((3, 2), np.float32))  # the writer records rows: new bytes, the same store id
    reader.kernel_side(0, 2)
    reader.kernel_side(0, 2)
    assert len(parsed) == 1
    w.close()
    tracin.GradientStore.create(tmp_path / "s", 6, [2, 3], overwrite=True).close()
    with pytest.raises(StoreChangedError, match="re-created after it was opened"):
        reader.kernel_side(0, 2)


_TOP_K_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import tracin
    from tracin.store import _store

    path = sys.argv[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    files = _store._mappable_files()  # the most files a store may have and still be mapped
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((40, 2), np.float32) for _ in range(files)]
    w = tracin.GradientStore.create(path, 40, [2] * files, weights=rng.uniform(0.5, 2, files).tolist())
    for c, block in enumerate(blocks):
        w.write(c, 0, block)
    store = tracin.GradientStore.open(w.finalize().path, chunk_bytes=files * 2 * 4 * 6)  # 7 chunks
    got = tracin.top_k(store, store, k=4, progress=False)
    exact = sum(wc * b.astype(np.float64) @ b.astype(np.float64).T for wc, b in zip(store.weights, blocks))
    np.testing.assert_allclose(got.values, -np.sort(-exact, axis=1)[:, :4], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(exact, got.indices, 1), got.values, rtol=1e-5, atol=1e-4)
    print(files)
    """
)


def test_top_k_of_a_store_with_itself_maps_as_many_files_as_allowed_under_the_limit(tmp_path):
    # The scoring loop holds up to 5 chunks' maps at once (train: previous, current, next; test:
    # previous, current); with a quarter of the limit mappable this failed with EMFILE.
    result = subprocess.run(
        [sys.executable, "-c", _TOP_K_CHILD, str(tmp_path / "s")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) >= 32


def test_too_many_open_files_while_mapping_or_opening_names_the_file_and_the_limit(tmp_path, monkeypatch):
    w = tracin.GradientStore.create(tmp_path / "s", 4, [3, 2])
    w.write(0, 0, np.ones((4, 3), np.float32))
    w.write(1, 0, np.ones((4, 2), np.float32))
    store = w.finalize()

    def no_descriptor_left(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_npy.mmap, "mmap", no_descriptor_left)
    with pytest.raises(OSError, match=r"ulimit -n.*while mapping") as failure:
        store.kernel_side(0, 4)
    assert failure.value.errno == errno.EMFILE and failure.value.filename == str(tmp_path / "s" / "checkpoint_000.npy")
    monkeypatch.undo()
    real_open = os.open

    def open_fails_for_data(path, *args, **kwargs):
        if str(path).endswith(".npy"):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_fails_for_data)
    with pytest.raises(OSError, match=r"ulimit -n.*while opening") as failure:
        store.kernel_side(0, 4)
    assert failure.value.errno == errno.EMFILE and failure.value.filename.endswith("checkpoint_000.npy")
