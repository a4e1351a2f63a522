"""TrainStream.tiles hands out exactly the rows of the side asked for, whatever was staged before it: an
upload made ahead for another tile size is not taken for this one, and a side mixing blocks used in place
(CPU tensors on "torch:cpu") with blocks staged from the host (NumPy float32 / float16 / bfloat16 bits)
gives each block its own rows. Checked against the blocks themselves widened to float64 by NumPy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tracin.backends import _torch_rows
from tracin.gradients import KernelSide

torch = pytest.importorskip("torch")

CPU = torch.device("cpu")


def _side(rng, n: int, width: int = 4) -> KernelSide:
    return KernelSide(False, [rng.standard_normal((n, width)).astype(np.float32)], [0])


def _assert_tiles(tiles, blocks: list[np.ndarray], rows: int) -> None:
    n = blocks[0].shape[0]
    assert [(i0, i1) for i0, i1, _ in tiles] == [(i0, min(i0 + rows, n)) for i0 in range(0, n, rows)]
    for i0, i1, got in tiles:
        assert len(got) == len(blocks)
        for g, expected in zip(got, blocks, strict=True):
            assert g.dtype == torch.float32
            np.testing.assert_array_equal(g.numpy().astype(np.float64), expected[i0:i1])


def test_an_upload_made_ahead_for_smaller_tiles_is_not_taken_for_larger_ones(rng):
    """Slots of 10 rows; piece a in tiles of 5 stages the first 5 rows of b ahead; b then asked for in
    tiles of 10 must get its rows 0-9, not the 5 staged and 5 rows left in the slot from before."""
    big, a, b = _side(rng, 20), _side(rng, 20), _side(rng, 20)
    stream = _torch_rows.TrainStream(CPU)
    list(stream.tiles(big, 10))  # slots of 10 rows
    assert stream.staging.rows == 10
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(a, 5, following=b)]
    _assert_tiles(seen, [a.blocks[0].astype(np.float64)], 5)
    assert stream.ahead is not None and stream.ahead[0] is b  # staged ahead in tiles of 5
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(b, 10)]
    _assert_tiles(seen, [b.blocks[0].astype(np.float64)], 10)


def test_an_upload_made_ahead_serves_the_piece_in_the_tiles_it_was_made_for(rng):
    a, b = _side(rng, 12), _side(rng, 9)
    stream = _torch_rows.TrainStream(CPU)
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(a, 4, following=b)]
    _assert_tiles(seen, [a.blocks[0].astype(np.float64)], 4)
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(b, 4)]
    _assert_tiles(seen, [b.blocks[0].astype(np.float64)], 4)


@pytest.mark.parametrize("rows", [1, 3, 7, 50])
def test_blocks_in_place_and_staged_blocks_each_get_their_own_rows(rng, rows):
    n = 11
    in_place = rng.standard_normal((n, 3)).astype(np.float32)
    f32 = rng.standard_normal((n, 5)).astype(np.float32)
    f16 = rng.standard_normal((n, 2)).astype(np.float16)
    bf16 = rng.standard_normal((n, 6)).astype(ml_dtypes.bfloat16)
    side = KernelSide(
        False, [torch.from_numpy(in_place), f32, f16, bf16.view(np.uint16), torch.from_numpy(f32)], [0, 0, 1, 2, 0]
    )
    expected = [in_place, f32, f16, bf16, f32]
    stream = _torch_rows.TrainStream(CPU)
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(side, rows)]
    _assert_tiles(seen, [e.astype(np.float64) for e in expected], rows)
    assert _torch_rows.tile_rows(side, 10**6) == 10**6 // (3 * 4 + 5 * 4 + 2 * 2 + 6 * 2 + 5 * 4)


def test_a_shorter_last_piece_reuses_the_slots_and_the_upload_made_for_it(rng, monkeypatch):
    """The slots (pinned buffers on CUDA) are made once per call: a last piece shorter than a tile takes
    the slots made for the longer pieces before it, and its one tile, uploaded during the piece before,
    is not uploaded again."""
    uploads: list[int] = []
    fill = _torch_rows._Staging.fill
    monkeypatch.setattr(
        _torch_rows._Staging, "fill", lambda self, slot, p: uploads.append(len(p[0])) or fill(self, slot, p)
    )
    a, last = _side(rng, 20), _side(rng, 3)
    stream = _torch_rows.TrainStream(CPU)
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(a, 10, following=last)]
    _assert_tiles(seen, [a.blocks[0].astype(np.float64)], 10)
    slots = stream.staging
    seen = [(i0, i1, [t.clone() for t in x]) for i0, i1, x in stream.tiles(last, 10)]
    _assert_tiles(seen, [last.blocks[0].astype(np.float64)], 10)
    assert stream.staging is slots and slots.rows == 10
    assert uploads == [10, 10, 3]  # a's two tiles, then last's one (ahead), once


def test_a_backend_call_refuses_rows_on_another_device_naming_the_block(rng):
    """The backend's own check (the public functions check placement before): a block on another device
    (meta here, the one torch device besides the CPU a machine without GPU has) is refused naming the side
    and the block, rather than failing in a copy."""
    from tracin import backends

    backend = backends.get("torch:cpu")
    host = rng.standard_normal((3, 4)).astype(np.float32)
    good = KernelSide(False, [host, torch.from_numpy(host)], [0, 0])
    elsewhere = KernelSide(False, [host, torch.empty(3, 4, device="meta")], [0, 0])
    factored = KernelSide(True, [host, torch.empty(3, 4, device="meta")], [0, 0])
    both = KernelSide(True, [host, host], [0, 0])
    cases = [
        (elsewhere, good, [1.0, 1.0], "test checkpoint 1"),
        (good, elsewhere, [1.0, 1.0], "train checkpoint 1"),
        (both, factored, [1.0], "train right factor of checkpoint 0"),
    ]
    for test, train, weights, name in cases:
        with pytest.raises(ValueError, match=rf"^{name} is on meta but scoring runs on cpu; pass device='meta' or"):
            backend.top_k(test, train, weights, 2, "both", num_threads=1)
    with pytest.raises(ValueError, match=r"^train checkpoint 0 is on cuda:1 but scoring runs on cuda:0; pass dev"):
        on_gpu = type("Block", (), {"device": torch.device("cuda:1")})()  # no GPU touched: only its device is read
        _torch_rows.check_device(KernelSide(False, [on_gpu], [0]), "train", torch.device("cuda:0"))


def test_cpu_tensors_are_used_in_place_on_the_cpu_only_and_staged_for_a_gpu():
    """Which blocks a call stages (its layout: block index, columns, dtype code): for "torch:cpu" the NumPy
    blocks only, CPU tensors being used in place; for a CUDA device every host block, CPU tensors
    included (decided from the devices alone: no GPU is touched)."""
    side = KernelSide(False, [torch.zeros(2, 3), np.zeros((2, 5), np.float32), torch.zeros(2, 4)], [0, 0, 0])
    gpu = torch.device("cuda", 0)
    assert _torch_rows._layout(side, CPU) == ((1, 5, 0),)
    assert _torch_rows._layout(side, gpu) == ((0, 3, 0), (1, 5, 0), (2, 4, 0))
    tensors = KernelSide(False, [torch.zeros(2, 3)], [0])
    assert _torch_rows.all_resident(tensors, CPU) and not _torch_rows.all_resident(tensors, gpu)
