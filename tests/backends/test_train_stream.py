"""Train rows stream to the device across the generic loop's train pieces: the next piece's first tile
is uploaded before the current piece's last tile is computed (ChunkCache.next_train), through staging
slots made once per public call. Counted on CPU tensors ("torch:cpu", the code path of "cuda") by
recording every upload (the row id in column 0 of the tile's first row) and every tile's compute."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from reference import exact_scores
from store_files import write_with_nonfinite
from tracin import _tunables, backends
from tracin.backends import ChunkCache, _torch_rows, _torch_topk, torch_device
from tracin.gradients import KernelSide

torch = pytest.importorskip("torch")

TILE = 8  # train rows per tile: DEVICE_TILE_BYTES below over 12 float32 columns


def store(tmp_path, name: str, blocks: list[np.ndarray], w: list[float], rows: int, dtype: str = "float32"):
    """A store of `blocks` read `rows` rows per chunk (one train piece of the loop each)."""
    writer = tracin.GradientStore.create(tmp_path / name, len(blocks[0]), [b.shape[1] for b in blocks], w, dtype)
    for c, block in enumerate(blocks):
        write_with_nonfinite(writer, c, 0, block)  # NaN rows: writers refuse them, planted for the reader tests
    writer.finalize()
    row_bytes = sum(b.shape[1] for b in blocks) * (4 if dtype == "float32" else 2)
    opened = tracin.GradientStore.open(tmp_path / name, chunk_bytes=rows * row_bytes)
    assert opened.row_chunks() == rows
    return opened


def with_ids(rng, n: int, dims: list[int]) -> list[np.ndarray]:
    """Random rows whose first column of checkpoint 0 is the row's index (exact in float32)."""
    blocks = [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
    blocks[0][:, 0] = np.arange(n)
    return blocks


@pytest.fixture
def events(monkeypatch):
    """("upload", first row id) per staged tile, ("compute", first row id) per score tile, ("staging",
    -1) per pair of staging slots made, ("call", -1) per backend call; tiles of TILE rows, one test
    block per tile."""
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", TILE * 12 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", TILE * 12 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", 2**20)
    fill, init, product = _torch_rows._Staging.fill, _torch_rows._Staging.__init__, torch_device._product
    call = torch_device._Call.__init__

    def recording_call(self, *args, **kwargs):
        seen.append(("call", -1))
        call(self, *args, **kwargs)

    def recording_fill(self, slot, pieces):
        seen.append(("upload", int(pieces[0][0, 0])))
        fill(self, slot, pieces)

    def recording_init(self, *args):
        seen.append(("staging", -1))
        init(self, *args)

    def recording_product(test, train, *args):
        seen.append(("compute", int(train[0][0, 0])))
        return product(test, train, *args)

    monkeypatch.setattr(_torch_rows._Staging, "fill", recording_fill)
    monkeypatch.setattr(_torch_rows._Staging, "__init__", recording_init)
    monkeypatch.setattr(torch_device, "_product", recording_product)
    monkeypatch.setattr(torch_device._Call, "__init__", recording_call)
    return seen


def one_stream(tiles: list[int], pieces: set[int], reads_back: bool = False) -> list[tuple[str, int]]:
    """The events of one stream over the tiles starting at `tiles`, pieces (one backend call each)
    starting at the rows `pieces`: one pair of slots, tile j + 1 uploaded before tile j is computed
    within a piece; the next piece's first tile (of whatever test chunk) uploaded during the call
    before, after its last tile is computed (before, for a caller that reads each block back)."""
    out = [("call", -1), ("staging", -1), ("upload", tiles[0])]
    for j, start in enumerate(tiles):
        upload = [("upload", tiles[j + 1])] if j + 1 < len(tiles) else []
        later = upload and tiles[j + 1] in pieces and not reads_back
        out += [("compute", start), *upload] if later else [*upload, ("compute", start)]
        out += [("call", -1)] if upload and tiles[j + 1] in pieces else []
    return out


@pytest.mark.parametrize("call", ["top_k", "scores"])
def test_uploads_run_one_tile_ahead_across_pieces_and_test_chunks(rng, tmp_path, events, call):
    """A train store of 4 pieces of 20 rows (the last 15: tiles of 8, 8, 4 rows and 8, 7) against a
    test store of 2 chunks: every tile is uploaded once per test chunk, in order, always one tile
    ahead of the compute, also from one piece to the next and from one test chunk to the next."""
    w = [0.5, -2.0]
    x = store(tmp_path, "train", with_ids(rng, 75, [8, 4]), w, rows=20)
    t = store(tmp_path, "test", [rng.standard_normal((9, d)).astype(np.float32) for d in (8, 4)], w, rows=5)
    tiles = [s for p0 in range(0, 75, 20) for s in range(p0, min(p0 + 20, 75), TILE)]
    assert tiles == [0, 8, 16, 20, 28, 36, 40, 48, 56, 60, 68]
    if call == "top_k":
        got = tracin.top_k(t, x, k=30, side="both", device="torch:cpu")
        for ours, kernel in zip(got, tracin.top_k(t, x, k=30, side="both", device="cpu"), strict=True):
            np.testing.assert_array_equal(ours.indices, kernel.indices)
    else:
        got = tracin.scores(t, x, device="torch:cpu")
        np.testing.assert_allclose(got, tracin.scores(t, x, device="cpu"), rtol=1e-5, atol=1e-5)
    assert events == one_stream(tiles * 2, {0, 20, 40, 60}, reads_back=call == "scores")


def test_self_influence_uploads_each_tile_once_through_one_pair_of_slots(rng, tmp_path, events):
    w = [0.5, 3.0]
    blocks = with_ids(rng, 75, [8, 4])
    x = store(tmp_path, "train", blocks, w, rows=20)
    own = sum(c * (b.astype(np.float64) ** 2).sum(1) for c, b in zip(w, blocks, strict=True))
    np.testing.assert_allclose(tracin.self_influence(x, device="torch:cpu"), own, rtol=1e-5)
    tiles = [s for p0 in range(0, 75, 20) for s in range(p0, min(p0 + 20, 75), TILE)]
    assert events == [event for event in one_stream(tiles, {0, 20, 40, 60}) if event[0] != "compute"]


def test_the_upload_made_ahead_serves_only_the_piece_it_was_made_for(rng, events):
    """The seam itself: a piece named as the cache's next_train has its first tile uploaded during
    the call before and is not uploaded again; the same rows passed as another object are."""
    backend = backends.get("torch:cpu")
    train = with_ids(rng, 30, [8, 4])
    first, second = (KernelSide(False, [b[i0:i1] for b in train], [0, 0]) for i0, i1 in ((0, 12), (12, 30)))
    test = KernelSide(False, [rng.standard_normal((3, d)).astype(np.float32) for d in (8, 4)], [0, 0])
    cache = ChunkCache()
    cache.use((0, 3))
    cache.next_train = second
    backend.top_k(test, first, [1.0, 1.0], 5, "both", num_threads=1, cache=cache)
    cache.next_train = None
    backend.top_k(test, second, [1.0, 1.0], 5, "both", num_threads=1, cache=cache)
    # piece-local row ids: 0, 8 | 12 (ahead), 20, 28
    assert events == one_stream([0, 8, 12, 20, 28], {0, 12})
    events.clear()
    again = KernelSide(False, list(second.blocks), [0, 0])  # equal rows, not the piece named ahead
    cache.next_train = second
    backend.top_k(test, first, [1.0, 1.0], 5, "both", num_threads=1, cache=cache)
    cache.next_train = None
    backend.top_k(test, again, [1.0, 1.0], 5, "both", num_threads=1, cache=cache)
    assert [e for e in events if e[0] == "upload"] == [("upload", r) for r in (0, 8, 12, 12, 20, 28)]
    assert ("staging", -1) not in events  # the call's slots, kept in the cache


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
@pytest.mark.parametrize("k", [3, 50, 500])
@pytest.mark.parametrize("train_as", ["store float32", "store float16", "memory, pieces cut for the bar"])
def test_several_pieces_give_the_cpu_kernel_results_ties_included(rng, tmp_path, monkeypatch, side, k, train_as):
    """Small integers (exact scores in any summation order, many ties) in 34-row store pieces, or in
    memory cut into 10-row pieces for the progress bar: the same values and indices as the C++ kernel
    and as a stable sort of the exact scores, for k below and above the piece size and above n."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 7 * 12 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 7 * 12 * 4)
    monkeypatch.setattr(tracin.scoring, "_MIN_PIECE_ROWS", 10)
    w = [0.5, -2.0]
    train = [np.round(3 * rng.standard_normal((300, d))).astype(np.float32) for d in (8, 4)]
    test = tracin.Gradients([np.round(3 * rng.standard_normal((13, d))).astype(np.float32) for d in (8, 4)], w)
    if train_as.startswith("store"):
        x, progress = store(tmp_path, "train", train, w, rows=34, dtype=train_as.split()[1]), False
    else:
        x, progress = tracin.Gradients(train, w), True
    exact = exact_scores(test.matrices, train, w)
    got = tracin.top_k(test, x, k=k, side=side, device="torch:cpu", progress=progress)
    kernel = tracin.top_k(test, x, k=k, side=side, device="cpu", progress=False)
    got, kernel = (got, kernel) if side == "both" else ([got], [kernel])
    names = ["proponents", "opponents"] if side == "both" else [side]
    for ours, want, name in zip(got, kernel, names, strict=True):
        order = np.argsort((-1 if name == "proponents" else 1) * exact, axis=1, kind="stable")[:, :k]
        assert ours.indices.shape == (13, min(k, 300))
        np.testing.assert_array_equal(ours.indices, order)
        np.testing.assert_array_equal(ours.indices, want.indices)
        np.testing.assert_array_equal(ours.values, want.values)
        np.testing.assert_array_equal(ours.values, np.take_along_axis(exact, order, 1))


def test_rows_selected_exactly_across_pieces_follow_the_tie_rule(rng, tmp_path, monkeypatch):
    """Every row selected exactly from its whole tile (as rows cut inside a tie are), over store
    pieces whose first tiles are uploaded ahead: a stable sort of the exact scores."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 6 * 4 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 6 * 4 * 4)
    monkeypatch.setattr(
        _torch_topk, "_cut_in_tie", lambda values, side: torch.ones(len(values), dtype=torch.bool, device=values.device)
    )
    train = np.round(rng.standard_normal((100, 4))).astype(np.float32)
    test = np.round(rng.standard_normal((6, 4))).astype(np.float32)
    exact = exact_scores([test], [train], [1.0])
    got = tracin.top_k(test, store(tmp_path, "train", [train], [1.0], rows=17), k=5, side="both", device="torch:cpu")
    for part, sign in ((got.proponents, -1), (got.opponents, 1)):
        np.testing.assert_array_equal(part.indices, np.argsort(sign * exact, axis=1, kind="stable")[:, :5])


def test_non_finite_rows_in_a_later_piece_name_their_rows(rng, tmp_path):
    """The NaN check covers the first tile uploaded ahead: rows named relative to their piece's chunk
    as the C++ kernel names them."""
    train = [rng.standard_normal((60, 4)).astype(np.float32), rng.standard_normal((60, 3)).astype(np.float32)]
    train[1][20, 1] = np.nan  # the first row of the second 20-row piece
    x = store(tmp_path, "train", train, [1.0, 1.0], rows=20)
    test = [rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)]
    messages = []
    for device in ("cpu", "torch:cpu"):
        with pytest.raises(ValueError, match=r"train checkpoint 1 contains NaN or Inf values, first in rows") as e:
            tracin.top_k(test, x, k=3, device=device)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_a_following_piece_wider_than_the_staging_slots_is_not_staged_ahead(rng):
    """A piece of 3 rows (slots of 3 rows) followed by one of 8, tiles of 10 rows: the next piece's first
    tile does not fit the slots, so it is not uploaded ahead; its own call makes larger slots."""
    small, big = (KernelSide(False, [rng.standard_normal((n, 4)).astype(np.float32)], [0]) for n in (3, 8))
    stream = _torch_rows.TrainStream(torch.device("cpu"))
    for side, following in ((small, big), (big, None)):
        tiles = list(stream.tiles(side, 10, following))
        assert [(i0, i1) for i0, i1, _ in tiles] == [(0, side.blocks[0].shape[0])]
        np.testing.assert_array_equal(tiles[0][2][0].numpy(), side.blocks[0])
    assert stream.staging.rows == 8
