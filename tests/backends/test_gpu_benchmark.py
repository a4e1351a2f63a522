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


@pytest.fixture
def tiny(monkeypatch):
    """Sizes small enough for a test: scoring 5 x 1500 x 8, an export of 6 examples."""
    monkeypatch.setattr(gpu, "QUICK", {"m": 5, "n": 1500, "d": 8})
    monkeypatch.setattr(gpu, "EXPORT_QUICK", {"examples": 6, "hidden": 4})
    monkeypatch.setattr(gpu, "STORE_BLOCK_ROWS", 400)  # the store is written in several blocks


def run_cpu(tmp_path) -> tuple[int, str, dict]:
    """main(--device cpu) (no --quick: the CPU smoke test takes the quick sizes by itself): exit
    status, what it printed, the record."""
    with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(printed):
        code = gpu.main(["--device", "cpu", "--repeats", "1", "--out", str(tmp_path), "--dir", str(tmp_path)])
    return code, printed.getvalue(), json.loads((tmp_path / "gpu_quick.json").read_text())


def test_quick_cpu_run_writes_a_consistent_record(tmp_path, tiny):
    code, printed, record = run_cpu(tmp_path)
    assert code == 0 and f"wrote {tmp_path / 'gpu_quick.json'}" in printed
    assert record["errors"] == {} and record["config"]["quick"] is True
    export = record["export"]
    assert (export["examples"], export["hidden"], export["checkpoints"]) == (6, 4, 2)
    assert list(export["devices"]) == ["cpu"] and set(export["devices"]["cpu"]) == {"factored", "full"}
    for t in export["devices"]["cpu"].values():
        assert t["examples_x_checkpoints_per_s"] == pytest.approx(2 * 6 / t["seconds"])
    assert record["benchmark"] == "gpu_quick" and "machine" in record
    config = record["config"]
    assert (config["m"], config["n"], config["d"]) == (5, 1500, 8) and config["tracin_device"] == "torch:cpu"
    assert config["store_bytes"] == 1500 * 8 * 4
    assert config["device_tile_bytes"] == _tunables.DEVICE_TILE_BYTES  # with the chunk bytes: uploads per call
    assert config["device_resident_tile_bytes"] == _tunables.DEVICE_RESIDENT_TILE_BYTES  # rows on the device
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


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, tiny, monkeypatch):
    """The whole-matrix peer runs out of memory at k=1000 and the sgemm limit fails: both are named
    under "errors", the exit status is 1, and every other figure is still written (the goals that
    need the sgemm limit are None, not met or unmet)."""
    whole = gpu.whole_matrix_top_k

    def out_of_memory_at_k1000(test, train, k):
        if k == 1000:
            raise RuntimeError("CUDA out of memory (simulated)")
        return whole(test, train, k)

    monkeypatch.setattr(gpu, "whole_matrix_top_k", out_of_memory_at_k1000)
    monkeypatch.setattr(gpu, "sgemm_tflops", lambda *a: 1 / 0)
    code, printed, record = run_cpu(tmp_path)
    assert code == 1 and f"wrote {tmp_path / 'gpu_quick.json'}" in printed
    assert record["errors"] == {
        "limits.sgemm": "ZeroDivisionError: division by zero",
        "k=1000 torch_matmul_topk_whole_matrix": "RuntimeError: CUDA out of memory (simulated)",
    }
    assert "FAILED k=1000 torch_matmul_topk_whole_matrix: RuntimeError" in printed
    k10, k1000 = (record["cases"][i]["times"] for i in (0, 1))
    assert "torch_matmul_topk_whole_matrix" in k10 and "torch_matmul_topk_whole_matrix" not in k1000
    assert {"tracin_device_resident", "tracin_host_store_streamed"} <= set(k1000)
    goals = record["goals"]
    assert (
        goals["device_resident_fraction_of_sgemm"] is None and goals["met"]["device_resident_fraction_of_sgemm"] is None
    )
    assert goals["host_streamed_fraction_of_h2d_bound"] > 0 and goals["k1000_over_k10"] > 0
    assert record["limits"]["h2d_gbs"] > 0 and set(record["export"]["devices"]["cpu"]) == {"factored", "full"}


def test_a_run_stopped_before_the_scoring_already_recorded_the_export(tmp_path, tiny, monkeypatch):
    """The export is measured first: a run that a time limit stops while it writes the store (the
    first step of the scoring) leaves a record with the export's seconds in it."""

    def stopped(*_):
        raise KeyboardInterrupt  # what a time limit's signal does to a run, here at the store

    monkeypatch.setattr(gpu, "write_store", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_cpu(tmp_path)
    record = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert record["complete"] is False and record["cases"] == []
    for t in record["export"]["devices"]["cpu"].values():
        assert t["seconds"] > 0 and t["examples_x_checkpoints_per_s"] == pytest.approx(12 / t["seconds"])
