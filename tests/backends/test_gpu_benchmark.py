"""benchmarks/gpu.py as a smoke test on the CPU (--device cpu --quick): the record is complete and
its derived figures follow from its measurements (no timing assertions)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

pytest.importorskip("torch")

from benchmarks import gpu  # noqa: E402
from tracin import _tunables  # noqa: E402


def test_quick_cpu_run_writes_a_consistent_record(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "QUICK", {"m": 5, "n": 1500, "d": 8})
    monkeypatch.setattr(gpu, "STORE_BLOCK_ROWS", 400)  # the store is written in several blocks
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = gpu.main(
            ["--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path), "--dir", str(tmp_path)]
        )
    assert code == 0 and f"wrote {tmp_path / 'gpu_quick.json'}" in printed.getvalue()
    record = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert record["benchmark"] == "gpu_quick" and "machine" in record
    config = record["config"]
    assert (config["m"], config["n"], config["d"]) == (5, 1500, 8) and config["tracin_device"] == "torch:cpu"
    assert config["store_bytes"] == 1500 * 8 * 4
    assert config["device_tile_bytes"] == _tunables.DEVICE_TILE_BYTES  # with the chunk bytes: uploads per call
    assert [(c["k"], c["side"]) for c in record["cases"]] == [(10, "proponents"), (1000, "proponents"), (10, "both")]
    for case in record["cases"][:2]:
        assert {"tracin_device_resident", "tracin_host_store_streamed", "torch_matmul_topk_whole_matrix"} <= set(
            case["times"]
        )
        for t in case["times"].values():
            assert len(t["times_s"]) == 1 and t["tflops"] == pytest.approx(2 * 5 * 1500 * 8 / t["median_s"] / 1e12)
    # tracin's top-10 equals torch's on the whole matrix (random data: no ties)
    assert record["agreement"]["rows_with_equal_indices"] == 1.0
    assert record["agreement"]["max_value_gap_over_norm_product"] <= 1e-5
    goals, limits = record["goals"], record["limits"]
    k10 = record["cases"][0]["times"]
    assert goals["device_resident_fraction_of_sgemm"] == pytest.approx(
        limits["sgemm"]["seconds"] / k10["tracin_device_resident"]["median_s"]
    )
    assert goals["host_streamed_fraction_of_h2d_bound"] == pytest.approx(
        1500 * 8 * 4 / (limits["h2d_gbs"] * 1e9) / k10["tracin_host_store_streamed"]["median_s"]
    )
    assert goals["k1000_over_k10"] == pytest.approx(
        record["cases"][1]["times"]["tracin_device_resident"]["median_s"] / k10["tracin_device_resident"]["median_s"]
    )
    assert goals["met"]["k1000_over_k10"] == (goals["k1000_over_k10"] <= 1.3)
    assert not list(tmp_path.glob("tracin-gpu-bench-*"))  # the store is removed


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu.main(["--quick"]) == 2
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err
