"""What the torch backend derives from a test chunk lives for one public call: each test chunk goes
to the device once per call however many train pieces it meets (and is freed at the end); train
tiles are staged one ahead through two buffers. Counted on CPU tensors ("torch:cpu", the code path
of "cuda")."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import tracin
from reference import exact_scores, factored_to_full, score_bound, to_float64
from tracin import _tunables
from tracin.backends import ChunkCache, _torch_rows
from tracin.gradients import KernelSide

from .numpy_reference import normalized

torch = pytest.importorskip("torch")


def to_float64_list(blocks: list[np.ndarray]) -> list[np.ndarray]:
    return [to_float64(b) for b in blocks]


def store(tmp_path, name: str, blocks: list[np.ndarray], w: list[float], chunk_bytes: int) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(tmp_path / name, len(blocks[0]), [b.shape[1] for b in blocks], w)
    for c, block in enumerate(blocks):
        writer.write(c, 0, block)
    writer.finalize()
    return tracin.GradientStore.open(tmp_path / name, chunk_bytes=chunk_bytes)


@pytest.fixture
def uploads(monkeypatch):
    """Every test side the torch backend uploads: (rows, weak references to the device blocks)."""
    seen: list[tuple[int, list[weakref.ref]]] = []
    whole = _torch_rows.whole

    def counting(side: KernelSide, device):
        blocks = whole(side, device)
        seen.append((side.blocks[0].shape[0], [weakref.ref(b) for b in blocks]))
        return blocks

    monkeypatch.setattr(_torch_rows, "whole", counting)
    return seen


@pytest.mark.parametrize("normalize", [False, True])
def test_each_test_chunk_is_uploaded_once_per_call(rng, tmp_path, monkeypatch, uploads, normalize):
    """A test store of 3 chunks against a train store of 9 pieces (several tiles each): 3 uploads per
    call, not 27, for scores, top_k (both sides) and aggregate; same results as the C++ kernel."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 600)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 600)
    w = [0.5, -2.0]
    test = [rng.standard_normal((30, 8)).astype(np.float32), rng.standard_normal((30, 4)).astype(np.float32)]
    train = [rng.standard_normal((300, 8)).astype(np.float32), rng.standard_normal((300, 4)).astype(np.float32)]
    t = store(tmp_path, "test", test, w, chunk_bytes=12 * 4 * 11)  # chunks of 11 rows: 3 chunks
    x = store(tmp_path, "train", train, w, chunk_bytes=12 * 4 * 34)  # 34 rows: 9 pieces
    assert (t.row_chunks(), x.row_chunks()) == (11, 34)
    kernel = tracin.top_k(t, x, k=20, side="both", device="cpu", normalize=normalize)
    calls = {
        "scores": lambda: tracin.scores(t, x, device="torch:cpu", normalize=normalize),
        "top_k": lambda: tracin.top_k(t, x, k=20, side="both", device="torch:cpu", normalize=normalize),
        "aggregate": lambda: tracin.aggregate(t, x, device="torch:cpu", normalize=normalize),
    }
    for name, call in calls.items():
        uploads.clear()
        result = call()
        assert [rows for rows, _ in uploads] == [11, 11, 8], name
        gc.collect()
        assert all(ref() is None for _, refs in uploads for ref in refs), f"{name}: a device copy outlived the call"
        if name == "top_k":
            for got, want in zip(result, kernel, strict=True):
                np.testing.assert_array_equal(got.indices, want.indices)
    if not normalize:
        exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
        assert np.all(np.abs(calls["scores"]() - exact) <= bound)
        assert np.all(np.abs(calls["aggregate"]() - exact.sum(0)) <= bound.sum(0))


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_a_large_in_memory_test_set_is_uploaded_in_chunks_of_the_byte_budget(
    rng, monkeypatch, uploads, factored, normalize
):
    """In-memory test rows (no row_chunks, also a np.memmap) reach the device DEVICE_TEST_BYTES of
    float32 rows at a time, not whole; results stay those of float64 NumPy and the C++ kernel."""
    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 4 * 12 * 10)  # 10 rows of 12 float32 columns
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 600)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 600)
    w = [0.5, -2.0]
    if factored:
        parts = [rng.standard_normal((27, d)).astype(np.float32) for d in (2, 4, 3, 3)]
        train_parts = [rng.standard_normal((90, d)).astype(np.float32) for d in (2, 4, 3, 3)]
        t = tracin.FactoredGradients(parts[0::2], parts[1::2], w)
        x = tracin.FactoredGradients(train_parts[0::2], train_parts[1::2], w)
        test, train = factored_to_full(parts[0::2], parts[1::2]), factored_to_full(train_parts[0::2], train_parts[1::2])
    else:
        test = [rng.standard_normal((27, 8)).astype(np.float32), rng.standard_normal((27, 4)).astype(np.float32)]
        train = [rng.standard_normal((90, 8)).astype(np.float32), rng.standard_normal((90, 4)).astype(np.float32)]
        t, x = tracin.Gradients(test, w), tracin.Gradients(train, w)
    exact = exact_scores(*(normalized(to_float64_list(s), 1 if normalize else 0) for s in (test, train)), w)
    bound = score_bound(*(normalized(to_float64_list(s), 1 if normalize else 0) for s in (test, train)), w)
    got = tracin.scores(t, x, device="torch:cpu", normalize=normalize)
    assert [rows for rows, _ in uploads] == [10, 10, 7]
    assert np.all(np.abs(got - exact) <= bound)
    uploads.clear()
    assert np.all(
        np.abs(tracin.aggregate(t, x, device="torch:cpu", normalize=normalize) - exact.sum(0)) <= bound.sum(0)
    )
    # top_k's budget also covers its running selection: 12 B x k x 2 sides per row
    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", (4 * 12 + 12 * 15 * 2) * 10)
    both = tracin.top_k(t, x, k=15, side="both", device="torch:cpu", normalize=normalize)
    kernel = tracin.top_k(t, x, k=15, side="both", device="cpu", normalize=normalize)
    assert [rows for rows, _ in uploads] == [10, 10, 7] * 2
    for ours, want in zip(both, kernel, strict=True):
        np.testing.assert_array_equal(ours.indices, want.indices)
        error = np.abs(ours.values - np.take_along_axis(exact, ours.indices, 1))
        assert np.all(error <= np.take_along_axis(bound, ours.indices, 1))


def test_the_backend_holds_only_float32_tensors_on_its_device(rng):
    from tracin.backends import torch_device

    backend = torch_device.TorchBackend(torch.device("cpu"))
    rows = rng.standard_normal((4, 3)).astype(np.float32)
    assert backend.holds(KernelSide(False, [torch.from_numpy(rows)] * 2, [0, 0]))
    assert not backend.holds(KernelSide(False, [torch.from_numpy(rows), rows], [0, 0]))  # NumPy: host rows
    assert not backend.holds(KernelSide(False, [torch.from_numpy(rows).half()], [1]))  # widened: a copy


@pytest.mark.parametrize("normalize", [False, True])
def test_a_test_set_on_the_device_is_scored_whole(rng, tmp_path, monkeypatch, normalize):
    """Plain scores of a test set the backend holds (float32 tensors on its device: used in place)
    read the train store once, not once per DEVICE_TEST_BYTES chunk (review7: 11 passes over the
    store for 11 chunks); cosine scores, which scale a copy of each chunk, still cut it."""
    from tracin.backends import torch_device

    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 4 * 6 * 10)  # 10 rows of 6 float32 columns
    monkeypatch.setattr(torch_device.TorchBackend, "holds", lambda self, side: True, raising=False)
    test, train = rng.standard_normal((35, 6)).astype(np.float32), rng.standard_normal((50, 6)).astype(np.float32)
    x, reads = _counted_store(tmp_path, train, monkeypatch)
    got = tracin.scores(test, x, device="torch:cpu", normalize=normalize, progress=False)
    assert sum(reads) == 50 * (4 if normalize else 1)
    t64, x64 = (
        normalized([to_float64(test)], 1 if normalize else 0),
        normalized([to_float64(train)], 1 if normalize else 0),
    )
    assert np.all(np.abs(got - exact_scores(t64, x64, [1.0])) <= score_bound(t64, x64, [1.0]))


def test_top_k_chunks_of_a_test_set_on_the_device_bound_the_running_selection(rng, tmp_path, monkeypatch):
    """A test set used in place costs no upload, but top_k keeps 12 B x k per row and side on the
    device while a chunk is scored: chunks of DEVICE_TEST_BYTES of that (review10: all 8,000 rows'
    selection at once, 91.6 MiB at k=500, where chunks of host rows bounded it)."""
    from tracin.backends import _torch_topk, torch_device

    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 12 * 5 * 2 * 7)  # 7 rows' selection, k=5, both sides
    monkeypatch.setattr(torch_device.TorchBackend, "holds", lambda self, side: True, raising=False)
    selections = []
    monkeypatch.setattr(
        torch_device,
        "RunningTopK",
        lambda k, side, rows, device: selections.append(rows) or _torch_topk.RunningTopK(k, side, rows, device),
    )
    test, train = rng.standard_normal((35, 6)).astype(np.float32), rng.standard_normal((50, 6)).astype(np.float32)
    x, reads = _counted_store(tmp_path, train, monkeypatch)
    got = tracin.top_k(test, x, k=5, side="both", device="torch:cpu", progress=False)
    assert sum(reads) == 50 * 5 and selections and max(selections) <= 7
    want = tracin.top_k(test, train, k=5, side="both", device="cpu")
    exact, bound = (
        exact_scores([to_float64(test)], [to_float64(train)], [1.0]),
        score_bound([to_float64(test)], [to_float64(train)], [1.0]),
    )
    for ours, kernel in zip(got, want, strict=True):
        np.testing.assert_array_equal(ours.indices, kernel.indices)
        error = np.abs(ours.values - np.take_along_axis(exact, ours.indices, 1))
        assert np.all(error <= np.take_along_axis(bound, ours.indices, 1))


def _counted_store(tmp_path, train, monkeypatch):
    """`train` as a store of one row chunk, and the list of rows its kernel_side calls read."""
    x = store(tmp_path, "train", [train], [1.0], chunk_bytes=4 * train.shape[1] * len(train))
    reads = []
    kernel_side = type(x).kernel_side
    monkeypatch.setattr(
        type(x),
        "kernel_side",
        lambda self, a=0, b=None: reads.append((self.n_rows if b is None else b) - a) or kernel_side(self, a, b),
    )
    return x, reads


def test_a_memmapped_test_matrix_is_uploaded_in_chunks(rng, tmp_path, monkeypatch, uploads):
    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 4 * 6 * 8)  # 8 rows of 6 float32 columns
    rows = rng.standard_normal((20, 6)).astype(np.float32)
    mapped = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float32, shape=(20, 6))
    mapped[:] = rows
    train = rng.standard_normal((40, 6)).astype(np.float32)
    got = tracin.scores(mapped, train, device="torch:cpu")
    assert [n for n, _ in uploads] == [8, 8, 4]
    assert np.all(np.abs(got - exact_scores([rows], [train], [1.0])) <= score_bound([rows], [train], [1.0]))


def test_rows_selected_exactly_use_the_chunk_uploaded_once(rng, monkeypatch, uploads):
    """Every row selected exactly from its whole tile (as rows cut inside a tie are): still one upload."""
    from tracin.backends import _torch_topk

    monkeypatch.setattr(
        _torch_topk, "_cut_in_tie", lambda values, side: torch.ones(len(values), dtype=torch.bool, device=values.device)
    )
    test = np.round(rng.standard_normal((5, 4))).astype(np.float32)
    train = np.round(rng.standard_normal((80, 4))).astype(np.float32)
    got = tracin.top_k(test, train, k=13, device="torch:cpu")
    exact = exact_scores([test], [train], [1.0])
    np.testing.assert_array_equal(got.indices, np.argsort(-exact, axis=1, kind="stable")[:, :13])
    assert [rows for rows, _ in uploads] == [5]


def test_a_backend_call_without_a_cache_uploads_its_test_side(rng, uploads):
    """Called directly (cache=None, as tracin.distributed's tasks call backends), nothing is kept."""
    from tracin import backends

    side = tracin.Gradients(rng.standard_normal((4, 6)).astype(np.float32)).kernel_side()
    backend = backends.get("torch:cpu")
    for _ in range(2):
        backend.top_k(side, side, [1.0], 2, "both", num_threads=1)
    assert [rows for rows, _ in uploads] == [4, 4]


def test_the_chunk_cache_keeps_items_of_the_current_chunk_only():
    cache = ChunkCache()
    made: list[str] = []
    make = lambda name: lambda: made.append(name) or name.upper()  # noqa: E731
    cache.use((0, 10))
    assert cache.get("a", make("a")) == "A" and cache.get("a", make("again")) == "A"
    cache.use((0, 10))  # the same chunk: kept
    assert cache.get("a", make("again")) == "A" and made == ["a"]
    cache.use((10, 20))  # another chunk: made again
    assert cache.get("a", make("b")) == "B" and made == ["a", "b"]
    cache.clear()
    cache.use((10, 20))
    assert cache.get("a", make("c")) == "C" and made == ["a", "b", "c"]


def test_train_tiles_are_staged_one_ahead_in_two_slots(rng, monkeypatch):
    """Tile j + 1 is in its staging slot before tile j is handed out (its upload overlaps the work on
    tile j), and a slot is refilled only once the tile it held has been released."""
    events: list[tuple[str, int]] = []
    fill, release = _torch_rows._Staging.fill, _torch_rows._Staging.release

    def recording_fill(self, slot, pieces):
        events.append(("fill", slot))
        fill(self, slot, pieces)

    def recording_release(self, slot):
        events.append(("release", slot))
        release(self, slot)

    monkeypatch.setattr(_torch_rows._Staging, "fill", recording_fill)
    monkeypatch.setattr(_torch_rows._Staging, "release", recording_release)
    block = rng.standard_normal((10, 3)).astype(np.float32)
    side = KernelSide(False, [block], [0])
    seen = []
    for i0, _, x in _torch_rows.TrainStream(torch.device("cpu")).tiles(side, 3):
        events.append(("use", i0 // 3))
        seen.append(x[0].clone())
    np.testing.assert_array_equal(torch.cat(seen).numpy(), block)
    assert events == [
        ("fill", 0),
        ("fill", 1),
        ("use", 0),
        ("release", 0),
        ("fill", 0),
        ("use", 1),
        ("release", 1),
        ("fill", 1),
        ("use", 2),
        ("release", 0),
        ("use", 3),
        ("release", 1),
    ]


def test_clear_drops_the_items_kept_for_the_whole_call():
    """keep()'s items (a device backend's staging buffers) last for one public call: clear() at its end
    frees them, so the next call makes its own (and no device memory outlives the call)."""
    cache = ChunkCache()
    cache.use((0, 3))
    first = cache.keep("staging", lambda: ["buffer 1"])
    assert cache.get("rows", lambda: "chunk") == "chunk"
    cache.use((3, 6))
    assert cache.keep("staging", lambda: ["buffer 2"]) is first  # kept across test chunks
    assert cache.get("rows", lambda: "other chunk") == "other chunk"
    cache.next_train = object()
    cache.clear()
    assert cache.keep("staging", lambda: ["buffer 2"]) == ["buffer 2"] and cache.next_train is None
