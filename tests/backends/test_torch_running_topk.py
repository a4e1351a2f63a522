"""top_k on a torch device keeps each test chunk's best k on the device across the generic loop's train
pieces (TorchBackend.top_k_running, base.KeepsTopK): no host merge per piece (scoring._select), one
readback per test chunk, the same bits as the host merge of every piece and as the C++ kernel on exact
scores, ties to the smaller global train index whatever the cut. On CPU tensors ("torch:cpu", the
code path of "cuda")."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import tracin
from tracin import _tunables, backends, scoring
from tracin.backends import ChunkCache, _torch_topk, torch_device
from tracin.gradients import KernelSide

torch = pytest.importorskip("torch")

W = [0.5, -2.0]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 256 bytes of train rows and at most 60 scores: several tiles per piece and several
    test blocks per test chunk."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 256)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 256)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 60)


def tied(rng, rows: int, dims: list[int], zero_rows: int = 2) -> list[np.ndarray]:
    """Values in {-1, -0.0, 0, 1}: integer scores (exact in float32 under weights 0.5 and -2), many equal,
    -0.0 beside 0.0; the first `zero_rows` rows all signed zeros (their scores are +-0)."""
    blocks = []
    for d in dims:
        block = rng.integers(-1, 2, (rows, d)).astype(np.float32)
        block[block == 0] = np.where(rng.random(int((block == 0).sum())) < 0.5, -0.0, 0.0)
        block[:zero_rows] = np.where(rng.random((zero_rows, d)) < 0.5, -0.0, 0.0)
        blocks.append(block)
    return blocks


def unit_signs(rng, rows: int, dims: list[int]) -> list[np.ndarray]:
    """Entries +-1 times a power of two per row (and checkpoint): each checkpoint's row norm is a power
    of two (4 columns), so cosine scores are exact in float32 and mostly tied; the first row is zero
    (it scores 0)."""
    blocks = []
    for d in dims:
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), (rows, d))
        block = (signs * np.float32(2.0) ** rng.integers(-3, 4, (rows, 1))).astype(np.float32)
        block[0] = 0
        blocks.append(block)
    return blocks


def store(tmp_path, name: str, blocks: list[np.ndarray], rows: int) -> tracin.GradientStore:
    """A store of `blocks` mapped `rows` rows per chunk (a train piece of the loop each)."""
    writer = tracin.GradientStore.create(tmp_path / name, len(blocks[0]), [b.shape[1] for b in blocks], W)
    for c, block in enumerate(blocks):
        writer.write(c, 0, block)
    writer.finalize()
    opened = tracin.GradientStore.open(tmp_path / name, chunk_bytes=rows * 4 * sum(b.shape[1] for b in blocks))
    assert opened.row_chunks() == rows
    return opened


def exact(test: list[np.ndarray], train: list[np.ndarray], cosine: bool = False) -> np.ndarray:
    """float64 scores sum_c w_c <t_c, x_c> (cosine: over the rows' norms per checkpoint, 0 for a zero row)."""
    total = np.zeros((len(test[0]), len(train[0])))
    for w, t, x in zip(W, test, train, strict=True):
        t, x = t.astype(np.float64), x.astype(np.float64)
        if cosine:
            t, x = (np.divide(a, n, out=np.zeros_like(a), where=n > 0) for a in (t, x) for n in [_norms(a)])
        total += w * (t @ x.T)
    return total


def _norms(a: np.ndarray) -> np.ndarray:
    return np.sqrt((a**2).sum(1, keepdims=True))


def reference(scores: np.ndarray, k: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of the k best per row, ties to the smaller index (a stable sort; -0.0 == 0.0)."""
    order = np.argsort(-scores if side == "proponents" else scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def results(got) -> dict[str, tracin.TopK]:
    return dict(zip(("proponents", "opponents"), got, strict=True)) if isinstance(got, tracin.BothSides) else got


def assert_same_bits(got, want) -> None:
    """Equal indices and values of the same bits (also the signs of zeros)."""
    for a, b in zip(got, want, strict=True):
        assert a.values.dtype == np.float32 and a.indices.dtype == np.int64
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values.view(np.int32), b.values.view(np.int32))


def sides_of(side: str, got) -> list[tuple[str, tracin.TopK]]:
    if side == "both":
        return [("proponents", got.proponents), ("opponents", got.opponents)]
    return [(side, got)]


def as_list(side: str, got) -> list[tracin.TopK]:
    return [part for _, part in sides_of(side, got)]


@pytest.fixture
def counted(monkeypatch):
    """Counts host merges (scoring._select calls), the device path's pieces (top_k_running calls, with
    the test rows and train rows of each) and its readbacks (torch_device._read calls)."""
    seen = {"select": 0, "pieces": [], "reads": 0}
    select, running, read = scoring._select, torch_device.TorchBackend.top_k_running, torch_device._read

    def counting_select(*args, **kwargs):
        seen["select"] += 1
        return select(*args, **kwargs)

    def counting_running(self, test, train, *args, first, **kwargs):
        seen["pieces"].append((test.blocks[0].shape[0], first, first + train.blocks[0].shape[0]))
        return running(self, test, train, *args, first=first, **kwargs)

    def counting_read(*args):
        seen["reads"] += 1
        return read(*args)

    monkeypatch.setattr(scoring, "_select", counting_select)
    monkeypatch.setattr(torch_device.TorchBackend, "top_k_running", counting_running)
    monkeypatch.setattr(torch_device, "_read", counting_read)
    return seen


def host_merged(monkeypatch, call):
    """`call()` as before the device kept the selection: the backend without top_k_running, so that the
    loop merges each piece's result on the host."""
    with monkeypatch.context() as m:
        m.delattr(torch_device.TorchBackend, "top_k_running")
        return call()


@pytest.mark.parametrize("k", [1, 3, 7, 10, 64, 149, 150, 1000])
@pytest.mark.parametrize("side", ["both", "proponents", "opponents"])
def test_a_store_of_many_pieces_matches_the_cpu_kernel_bit_for_bit(
    rng, tmp_path, monkeypatch, small_tiles, counted, k, side
):
    """Train: a store of 150 rows in pieces of 7 (22 pieces, tiles of 4 rows), test rows in chunks of 6
    (DEVICE_TEST_BYTES shrunk); integer scores with many exact ties across piece boundaries, +-0.
    Equal to the C++ kernel and to a float64 stable sort, the same bits as the host merge, with no
    host merge and one readback per test chunk."""
    test, train = tied(rng, 23, [4, 3]), tied(rng, 150, [4, 3])
    x = store(tmp_path, "train", train, rows=7)
    sides = 2 if side == "both" else 1
    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 6 * (4 * 7 + 12 * min(k, 150) * sides))
    got = tracin.top_k(test, x, k=k, side=side, device="torch:cpu")
    chunks = [rows for rows, first, _ in counted["pieces"] if first == 0]
    assert chunks == [6, 6, 6, 5] and counted["reads"] == 4  # one readback per test chunk
    assert len(counted["pieces"]) == 4 * 22 and counted["select"] == 0  # no host merge
    kernel = tracin.top_k(test, x, k=k, side=side, device="cpu")
    assert counted["select"] > 0  # the C++ kernel's pieces are merged on the host
    scores = exact(test, train)
    for (name, part), want in zip(sides_of(side, got), as_list(side, kernel), strict=True):
        assert part.indices.shape == (23, min(k, 150))
        np.testing.assert_array_equal(part.indices, want.indices)
        np.testing.assert_array_equal(part.values, want.values)
        values, order = reference(scores, k, name)
        np.testing.assert_array_equal(part.indices, order)
        np.testing.assert_array_equal(part.values, values)
    before = host_merged(monkeypatch, lambda: tracin.top_k(test, x, k=k, side=side, device="torch:cpu"))
    assert_same_bits(as_list(side, got), as_list(side, before))


@pytest.mark.parametrize("kind", ["plain", "factored", "cosine", "factored cosine"])
@pytest.mark.parametrize("k", [1, 4, 9, 40, 500])
def test_progress_pieces_of_factored_and_cosine_sets(rng, monkeypatch, small_tiles, counted, kind, k):
    """In-memory sets cut by the progress bar into pieces of 5 rows (the bar advancing once per piece),
    test rows in chunks of 4: plain and factored integer scores, cosine scores of rows of power-of-two
    norms (exact in float32, mostly tied). Equal to the C++ kernel bit for bit and to a float64 stable
    sort; the same bits as the host merge; no host merge."""
    monkeypatch.setattr(scoring, "_MIN_PIECE_ROWS", 5)
    monkeypatch.setattr(scoring, "_bar_steps", lambda seconds, extra: 100)
    updates: list[int] = []

    class Bar:
        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(scoring, "progress_bar", lambda *args, **kwargs: Bar())
    cosine, factored = "cosine" in kind, "factored" in kind
    make = unit_signs if cosine else tied
    if factored:
        dims = [2, 4] if not cosine else [4, 4]
        parts = [make(rng, rows, dims) for rows in (10, 10, 61, 61)]  # test L, R; train L, R
        test, train = tracin.FactoredGradients(parts[0], parts[1], W), tracin.FactoredGradients(parts[2], parts[3], W)
        flat = lambda lf, rt: np.einsum("np,nq->npq", lf, rt).reshape(len(lf), -1)  # noqa: E731
        test_rows = [flat(parts[0][c], parts[1][c]) for c in range(2)]
        train_rows = [flat(parts[2][c], parts[3][c]) for c in range(2)]
        width = 4 * sum(b.shape[1] for b in parts[0] + parts[1])
    else:
        test_rows, train_rows = make(rng, 10, [4, 4]), make(rng, 61, [4, 4])
        test, train = tracin.Gradients(test_rows, W), tracin.Gradients(train_rows, W)
        width = 4 * 8
    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 4 * (width + 12 * min(k, 61) * 2))
    got = tracin.top_k(test, train, k=k, side="both", device="torch:cpu", normalize=cosine, progress=True)
    pieces = [(first, end) for _, first, end in counted["pieces"]]
    assert len(pieces) == 3 * 13 and pieces[:13] == [(f, min(f + 5, 61)) for f in range(0, 61, 5)]
    assert updates == [end - first for first, end in pieces] and counted["select"] == 0 and counted["reads"] == 3
    kernel = tracin.top_k(test, train, k=k, side="both", device="cpu", normalize=cosine)
    scores = exact(test_rows, train_rows, cosine)
    for name, part, want in zip(("proponents", "opponents"), got, kernel, strict=True):
        np.testing.assert_array_equal(part.indices, want.indices)
        np.testing.assert_array_equal(part.values, want.values)
        values, order = reference(scores, k, name)
        np.testing.assert_array_equal(part.indices, order)
        np.testing.assert_array_equal(part.values, values)
    before = host_merged(
        monkeypatch, lambda: tracin.top_k(test, train, k=k, side="both", device="torch:cpu", normalize=cosine)
    )
    assert_same_bits(got, before)


def test_the_backend_keeps_the_selection_in_the_cache_until_the_last_piece(rng, small_tiles):
    """top_k_running directly: None before the last piece, then the whole set's best k with global
    indices (k larger than every piece), the cache's item dropped; a piece at row 0 starts anew."""
    backend = backends.get("torch:cpu")
    assert hasattr(backend, "top_k_running") and not hasattr(backends.get("cpu"), "top_k_running")
    test, train = tied(rng, 9, [3]), tied(rng, 40, [3])
    side = lambda rows: KernelSide._make(tracin.Gradients([rows], [1.0]).kernel_side())  # noqa: E731
    cache = ChunkCache()
    cache.use((0, 9))
    for attempt in range(2):  # the second pass starts anew at row 0: nothing of the first carries over
        for first in range(0, 40, 6):
            last = first + 6 >= 40
            piece = train[0][first : first + 6] if attempt else -train[0][first : first + 6]
            out = backend.top_k_running(
                side(test[0]), side(piece), [1.0], 15, "both", first=first, last=last, num_threads=1, cache=cache
            )
            assert (out is None) != last
            kept = [key for key in cache._items if "top_k" in key]
            assert bool(kept) != last  # the selection lives in the cache until the last piece
    whole = backend.top_k(side(test[0]), side(train[0]), [1.0], 15, "both", num_threads=1)
    with pytest.raises(TypeError, match="ChunkCache"):
        backend.top_k_running(
            side(test[0]), side(train[0]), [1.0], 3, "both", first=0, last=True, num_threads=1, cache=None
        )
    assert_same_bits(out, whole)
    assert out[0].indices.max() >= 6  # global indices


def test_an_interrupt_mid_way_leaves_nothing_behind(rng, tmp_path, monkeypatch, small_tiles):
    """KeyboardInterrupt in the fifth piece's merge: the loop's cache is emptied and every device tensor
    of the running selection is freed."""
    caches: list[ChunkCache] = []
    tensors: list[weakref.ref] = []
    merge, init = _torch_topk.RunningTopK.merge, _torch_topk.RunningTopK.__init__
    merges = {"n": 0}

    class Recorded(ChunkCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

    def recording_init(self, *args):
        init(self, *args)
        tensors.append(weakref.ref(self))

    def interrupted(self, found):
        merges["n"] += 1
        if merges["n"] == 40:
            raise KeyboardInterrupt
        merge(self, found)
        tensors.extend([weakref.ref(self.values), weakref.ref(self.indices)])

    monkeypatch.setattr(scoring, "ChunkCache", Recorded)
    monkeypatch.setattr(_torch_topk.RunningTopK, "__init__", recording_init)
    monkeypatch.setattr(_torch_topk.RunningTopK, "merge", interrupted)
    x = store(tmp_path, "train", tied(rng, 100, [4, 3]), rows=10)
    with pytest.raises(KeyboardInterrupt):
        tracin.top_k(tied(rng, 12, [4, 3]), x, k=20, side="both", device="torch:cpu")
    gc.collect()
    assert len(caches) == 1 and not caches[0]._items and not caches[0]._kept
    assert tensors and all(ref() is None for ref in tensors)


@pytest.mark.parametrize("normalize", [False, True])
def test_no_host_merge_on_the_device_but_one_per_piece_for_the_cpu_kernel(rng, tmp_path, monkeypatch, normalize):
    """scoring._select (the host merge) is not called for a torch device across 10 train pieces and 2
    test chunks; the C++ kernel's pieces are still merged on the host, one merge per later piece and side.
    Fails where the device's pieces are merged on the host (the loop before top_k_running)."""
    calls = []
    select = scoring._select
    monkeypatch.setattr(scoring, "_select", lambda *args: calls.append(1) or select(*args))
    monkeypatch.setattr(_tunables, "DEVICE_TEST_BYTES", 8 * (4 * 7 + 12 * 5 * 2))
    test, train = tied(rng, 16, [4, 3]), tied(rng, 100, [4, 3])
    x = store(tmp_path, "train", train, rows=10)
    got = tracin.top_k(test, x, k=5, side="both", device="torch:cpu", normalize=normalize)
    assert calls == []
    want = tracin.top_k(test, x, k=5, side="both", device="cpu", normalize=normalize)
    assert len(calls) == 9 * 2  # one test chunk (the kernel's passes are its own), 9 later pieces, 2 sides
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)


def test_a_pass_left_unfinished_does_not_carry_into_the_next_one_at_row_0(rng, small_tiles):
    """A first pass stopped before its last piece (an error in the loop) leaves its selection in the
    cache; the next pass, starting at row 0, drops it: its result is that of its own rows alone."""
    backend = backends.get("torch:cpu")
    test, train = tied(rng, 9, [3]), tied(rng, 40, [3])
    side = lambda rows: KernelSide._make(tracin.Gradients([rows], [1.0]).kernel_side())  # noqa: E731
    cache = ChunkCache()
    cache.use((0, 9))
    for first in (0, 6):  # better (10x) rows than the next pass's, never finished
        piece = 10 * train[0][first : first + 6]
        assert (
            backend.top_k_running(
                side(test[0]), side(piece), [1.0], 5, "both", first=first, last=False, num_threads=1, cache=cache
            )
            is None
        )
    out = backend.top_k_running(
        side(test[0]), side(train[0]), [1.0], 5, "both", first=0, last=True, num_threads=1, cache=cache
    )
    assert_same_bits(out, backend.top_k(side(test[0]), side(train[0]), [1.0], 5, "both", num_threads=1))


def test_a_piece_whose_global_rows_pass_the_keys_low_half_is_refused(rng, monkeypatch):
    """review333 (mutant: the piece's own row count checked): top_k_running's train indices are global
    (first + local), so the limit of the keys' low half holds for first + the piece's rows, whatever
    the piece's size (here the limit lowered to 50 for a piece of rows [40, 60))."""
    monkeypatch.setattr(torch_device, "_LOW", 51)
    backend = backends.get("torch:cpu")
    test, train = tied(rng, 4, [3]), tied(rng, 60, [3])
    side = lambda rows: KernelSide._make(tracin.Gradients([rows], [1.0]).kernel_side())  # noqa: E731
    cache = ChunkCache()
    cache.use((0, 4))
    kwargs = {"last": False, "num_threads": 1, "cache": cache}
    assert backend.top_k_running(side(test[0]), side(train[0][:40]), [1.0], 3, "both", first=0, **kwargs) is None
    with pytest.raises(ValueError, match="at most 50 train rows, got 60"):
        backend.top_k_running(side(test[0]), side(train[0][40:]), [1.0], 3, "both", first=40, **kwargs)
    with pytest.raises(ValueError, match="at most 50 train rows, got 51"):  # indices below 51 - 1 only
        backend.top_k(side(test[0]), side(train[0][:51]), [1.0], 3, "both", num_threads=1)
    assert backend.top_k(side(test[0]), side(train[0][:50]), [1.0], 3, "both", num_threads=1)[0].indices.shape == (4, 3)
