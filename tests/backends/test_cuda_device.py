"""Scoring on a CUDA device: rows on the GPU used in place, host rows and stores streamed to it,
TF32 off unless asked, against the C++ kernel and float64 NumPy.

These run only where torch sees a CUDA device (`.ci/gpu-check` runs them on such a machine); the
same code path runs on the CPU in tests/backends/test_torch_device.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import tracin
from reference import exact_scores, factored_to_full, score_bound
from tracin import _tunables
from tracin.backends import _torch_rows

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_gpu(rows: list[np.ndarray], dtype=torch.float32) -> list:
    return [torch.from_numpy(r).to("cuda", dtype) for r in rows]


def stable_top_k(exact: np.ndarray, k: int, sign: int) -> np.ndarray:
    return np.argsort(sign * exact, axis=1, kind="stable")[:, :k]


def test_gpu_rows_are_scored_on_their_device_within_the_bound(rng):
    w = [0.5, -0.25]
    test = [rng.standard_normal((40, 300)).astype(np.float32), rng.standard_normal((40, 70)).astype(np.float32)]
    train = [rng.standard_normal((5000, 300)).astype(np.float32), rng.standard_normal((5000, 70)).astype(np.float32)]
    t, x = tracin.Gradients(on_gpu(test), w), tracin.Gradients(on_gpu(train), w)
    exact, bound = exact_scores(test, train, w), score_bound(test, train, w)
    assert np.all(np.abs(tracin.scores(t, x) - exact) <= bound)  # device=None: the rows' GPU
    assert np.all(np.abs(tracin.aggregate(t, x) - exact.sum(0)) <= bound.sum(0))
    own = sum(c * (b.astype(np.float64) ** 2).sum(1) for c, b in zip(w, train, strict=True))
    np.testing.assert_allclose(tracin.self_influence(x), own, rtol=1e-5)
    # k beyond faiss-gpu's 2048, on small integers (exact in float32 whatever the summation order, so
    # the same bits as the C++ kernel; random rows' near-equal scores would swap places)
    test, train = [np.round(2 * b) for b in test], [np.round(2 * b) for b in train]
    both = tracin.top_k(tracin.Gradients(on_gpu(test), w), tracin.Gradients(on_gpu(train), w), k=3000, side="both")
    kernel = tracin.top_k(tracin.Gradients(test, w), tracin.Gradients(train, w), k=3000, side="both")
    for got, want in zip(both, kernel, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.values, want.values)


def test_ties_go_to_the_smaller_index_on_the_gpu(rng, monkeypatch):
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 4096)  # many tiles: ties across tiles too
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 4096)
    test = np.round(rng.standard_normal((17, 4))).astype(np.float32)
    train = np.round(rng.standard_normal((3000, 4))).astype(np.float32)
    exact = exact_scores([test], [train], [1.0])
    for rows in (on_gpu([train])[0], train):  # on the device, and streamed from the host
        both = tracin.top_k(on_gpu([test])[0], rows, k=700, side="both", device="cuda")
        np.testing.assert_array_equal(both.proponents.indices, stable_top_k(exact, 700, -1))
        np.testing.assert_array_equal(both.opponents.indices, stable_top_k(exact, 700, 1))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_store_streams_to_the_gpu(rng, tmp_path, monkeypatch, dtype):
    """Pinned double buffers on a side stream, many tiles per store chunk, many chunks. Small integers
    and weights of powers of two: every score is exact in float32, so the GPU's results are the C++
    kernel's bits, ties included."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 64 * 1024)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 64 * 1024)
    w = [0.5, 0.25]
    train = [np.round(2 * rng.standard_normal((40_000, d))).astype(np.float32) for d in (96, 32)]
    writer = tracin.GradientStore.create(tmp_path / "s", 40_000, [96, 32], w, dtype)
    for c, block in enumerate(train):
        writer.write(c, 0, block)
    writer.finalize()
    store = tracin.GradientStore.open(tmp_path / "s", chunk_bytes=3 * 2**20)
    test = tracin.Gradients([np.round(2 * rng.standard_normal((30, d))).astype(np.float32) for d in (96, 32)], w)
    gpu = tracin.top_k(test, store, k=25, side="both", device="cuda")
    cpu = tracin.top_k(test, store, k=25, side="both", device="cpu")
    for got, want in zip(gpu, cpu, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(tracin.self_influence(store, device="cuda"), tracin.self_influence(store))


def test_each_test_chunk_goes_to_the_gpu_once_per_call(rng, tmp_path, monkeypatch):
    """Stores on both sides, each read in many chunks: every test chunk is uploaded once for all the
    train pieces it meets, and the streamed results equal the C++ kernel's (small integers: the same
    bits; cosine scores, which are not exact, within float32 rounding)."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 16 * 1024)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 16 * 1024)
    uploaded: list[int] = []
    whole = _torch_rows.whole
    monkeypatch.setattr(
        _torch_rows, "whole", lambda side, device: uploaded.append(len(side.blocks[0])) or whole(side, device)
    )
    sets = []
    for name, n in (("test", 50), ("train", 6000)):
        writer = tracin.GradientStore.create(tmp_path / name, n, [64], [0.5])
        writer.write(0, 0, np.round(2 * rng.standard_normal((n, 64))).astype(np.float32))
        writer.finalize()
        sets.append(tracin.GradientStore.open(tmp_path / name, chunk_bytes=64 * 4 * (20 if name == "test" else 700)))
    test, train = sets
    for normalize in (False, True):
        uploaded.clear()
        gpu = tracin.top_k(test, train, k=30, side="both", device="cuda", normalize=normalize)
        assert uploaded == [20, 20, 10]  # 3 test chunks x 9 train pieces: 3 uploads
        cpu = tracin.top_k(test, train, k=30, side="both", device="cpu", normalize=normalize)
        for got, want in zip(gpu, cpu, strict=True):
            if normalize:  # near-equal cosines may swap places: the k best values per row agree
                np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(got.indices, want.indices)
                np.testing.assert_array_equal(got.values, want.values)


@pytest.mark.parametrize("all_exact", [False, True])
def test_uploads_run_on_across_store_pieces_on_the_gpu(rng, tmp_path, monkeypatch, all_exact):
    """A store of 40 pieces of 3 tiles (the last one short), each piece's first tile uploaded on the
    copy stream during the previous piece; tied small integers: exactly the C++ kernel's results, also
    when every row is selected exactly from its whole tile (as rows cut inside a tie are)."""
    from tracin.backends import _torch_topk

    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 100 * 40 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 100 * 40 * 4)
    if all_exact:
        monkeypatch.setattr(
            _torch_topk, "_cut_in_tie", lambda values, side: torch.ones(len(values), dtype=torch.bool, device="cuda")
        )
    train = np.round(2 * rng.standard_normal((10_000, 40))).astype(np.float32)
    writer = tracin.GradientStore.create(tmp_path / "s", 10_000, [40], [0.5])
    writer.write(0, 0, train)
    writer.finalize()
    store = tracin.GradientStore.open(tmp_path / "s", chunk_bytes=250 * 40 * 4)
    test = np.round(2 * rng.standard_normal((37, 40))).astype(np.float32)
    gpu = tracin.top_k(test, store, k=300, side="both", device="cuda")
    cpu = tracin.top_k(test, store, k=300, side="both", device="cpu")
    for got, want in zip(gpu, cpu, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(tracin.self_influence(store, device="cuda"), tracin.self_influence(store))


def test_factored_sets_on_the_gpu(rng):
    left_t, right_t = [rng.standard_normal((9, 10), dtype=np.float32)], [rng.standard_normal((9, 65), dtype=np.float32)]
    left_x = [rng.standard_normal((800, 10), dtype=np.float32)]
    right_x = [rng.standard_normal((800, 65), dtype=np.float32)]
    t = tracin.FactoredGradients(on_gpu(left_t), on_gpu(right_t), [0.3])
    x = tracin.FactoredGradients(on_gpu(left_x), on_gpu(right_x), [0.3])
    full_t, full_x = factored_to_full(left_t, right_t), factored_to_full(left_x, right_x)
    exact, bound = exact_scores(full_t, full_x, [0.3]), score_bound(full_t, full_x, [0.3])
    assert np.all(np.abs(tracin.scores(t, x) - exact) <= bound)
    assert np.all(np.abs(tracin.aggregate(t, x) - exact.sum(0)) <= bound.sum(0))


def test_tf32_only_when_asked_and_the_global_setting_is_restored(rng):
    test, train = rng.standard_normal((64, 4096), dtype=np.float32), rng.standard_normal((512, 4096), dtype=np.float32)
    exact, bound = exact_scores([test], [train], [1.0]), score_bound([test], [train], [1.0])
    t, x = on_gpu([test])[0], on_gpu([train])[0]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the user allows TF32 globally: scoring still refuses it
    try:
        plain = tracin.scores(t, x)
        assert torch.get_float32_matmul_precision() == "high"
        fast = tracin.scores(t, x, precision="tf32")
    finally:
        torch.set_float32_matmul_precision(before)
    assert np.all(np.abs(plain - exact) <= bound)
    assert np.all(np.abs(fast - exact) <= 200 * bound)  # TF32: up to about 1e-3 of the scale
    assert not np.array_equal(plain, fast)


@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9 has no fp32_precision"
)
@pytest.mark.parametrize("library", ["cublas", "cublaslt"])
@pytest.mark.parametrize(
    "user", ["default", "legacy allow_tf32", "legacy medium", "new fp32_precision tf32", "new generic tf32"]
)
def test_tf32_settings_of_either_api_do_not_fail_a_call(rng, library, user):
    """The GEMMs of scores and top_k under cuBLAS and cuBLASLt (which reads torch's allowTF32CuBLAS,
    raising where the legacy and new TF32 settings disagree) after a user set TF32 through either
    API (torch.backends.fp32_precision = "tf32" is what transformers' tf32=True sets), at both
    precisions; the user's settings read the same after."""
    test, train = rng.standard_normal((64, 256), dtype=np.float32), rng.standard_normal((300, 256), dtype=np.float32)
    exact, bound = exact_scores([test], [train], [1.0]), score_bound([test], [train], [1.0])
    t, x = on_gpu([test])[0], on_gpu([train])[0]
    matmul, blas = torch.backends.cuda.matmul, torch.backends.cuda.preferred_blas_library()
    keys = [("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("mkldnn", "all"), ("mkldnn", "matmul")]
    torch.backends.cuda.preferred_blas_library(library)
    try:
        if user == "legacy allow_tf32":
            matmul.allow_tf32 = True
        elif user == "legacy medium":
            torch.set_float32_matmul_precision("medium")
        elif user == "new fp32_precision tf32":
            matmul.fp32_precision = "tf32"
        elif user == "new generic tf32":
            torch.backends.fp32_precision = "tf32"
        before = [torch._C._get_fp32_precision_getter(*key) for key in keys]
        for precision, slack in (("float32", 1), ("tf32", 200)):  # TF32: up to about 1e-3 of the scale
            got = tracin.scores(t, x, precision=precision)
            assert np.all(np.abs(got - exact) <= slack * bound)
            top = tracin.top_k(t, x, k=5, precision=precision)
            near = np.take_along_axis(exact, top.indices, 1) - top.values
            assert np.all(np.abs(near) <= slack * np.take_along_axis(bound, top.indices, 1))
            assert [torch._C._get_fp32_precision_getter(*key) for key in keys] == before
    finally:
        torch.backends.cuda.preferred_blas_library(blas)
        torch.set_float32_matmul_precision("highest")
        for key in keys:
            torch._C._set_fp32_precision_setter(*key, "none")


def test_device_mismatches_and_bad_rows_are_value_errors(rng):
    rows = torch.randn(6, 5, device="cuda")
    with pytest.raises(ValueError, match=r"device='cpu' but test is on cuda:0; pass device='cuda:0'"):
        tracin.top_k(rows, rows.cpu().numpy(), device="cpu")
    rows[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"train checkpoint 0 contains NaN or Inf values, first in rows \[4\]"):
        tracin.top_k(torch.randn(2, 5, device="cuda"), rows)


@pytest.mark.parametrize("library", ["cupy", "jax"])
def test_cupy_and_jax_gpu_arrays_are_scored_on_their_device(rng, monkeypatch, library):
    """Arrays of other libraries on the GPU come in through DLPack, sharing memory: the same bits as
    the C++ kernel on small integers."""
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX would take 75% of the GPU
    module = pytest.importorskip(library)
    if library == "cupy":
        to_gpu = module.asarray
    else:
        gpus = [d for d in module.devices() if d.platform == "gpu"]
        if not gpus:
            pytest.skip("this JAX sees no GPU")
        to_gpu = functools.partial(module.device_put, device=gpus[0])
    test = np.round(2 * rng.standard_normal((23, 48))).astype(np.float32)
    train = np.round(2 * rng.standard_normal((3000, 48))).astype(np.float32)
    got = tracin.top_k(to_gpu(test), to_gpu(train), k=40, side="both")
    want = tracin.top_k(test, train, k=40, side="both")
    for ours, theirs in zip(got, want, strict=True):
        np.testing.assert_array_equal(ours.indices, theirs.indices)
        np.testing.assert_array_equal(ours.values, theirs.values)
    np.testing.assert_array_equal(tracin.self_influence(to_gpu(train)), tracin.self_influence(train))
