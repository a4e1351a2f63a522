"""benchmarks/distributed.py on a tiny store: the record is complete and consistent (no timing assertions)."""

from __future__ import annotations

import pytest

from benchmarks import distributed as bench


def _arguments(argv: list[str]):
    """The script's arguments for `argv`, the sizes not given filled in as main does (full sizes)."""
    args = bench._parser().parse_args(argv)
    bench.quick_or_given(args, bench.QUICK, bench.FULL)
    return args


def test_tiny_run_records_every_part(client):
    args = _arguments(["--size", "0.002", "--dim", "64", "--shards", "9", "--repeats", "1", "--tiny-shards", "6"])
    result = bench.run(args, client)
    assert result["identical_results"] is True
    times = {name: t["median_s"] for name, t in result["times"].items()}
    assert result["ratio_distributed_over_single_machine"] == pytest.approx(
        times["distributed"] / times["single_machine"]
    )
    assert result["shards"] == len(result["shard_compute_s"]) == 9 and result["merge_tasks"] == 3  # 8 + 1, then 1
    assert result["fixed_cost"]["tasks"] == 6
    per_byte = sum(result["shard_compute_s"]) / result["store_bytes"]
    assert result["shard_gib_per_s_per_worker"] == pytest.approx(1 / per_byte / 2**30)
    rows = result["projection"]["rows"]
    assert [r["workers"] for r in rows] == [10, 100, 1000]
    assert "PROJECTION" in result["projection"]["note"]
    for r in rows:  # a list schedule is never faster than perfect division, nor slower than it plus one shard
        largest = r["largest_shard_mib"] * 2**20 * per_byte + result["fixed_cost"]["fixed_cost_per_task_s"]
        assert r["ideal_scoring_s"] == pytest.approx(2**40 * per_byte / r["workers"])
        assert (
            r["ideal_scoring_s"]
            <= r["scoring_s"]
            <= r["ideal_scoring_s"]
            + largest
            + r["shards"] / r["workers"] * result["fixed_cost"]["fixed_cost_per_task_s"]
            + 1e-9
        )
        assert r["smallest_shard_mib"] <= r["largest_shard_mib"] <= 256


def test_tiny_export_run_records_identical_files(client):
    pytest.importorskip("torch")
    args = _arguments(["--only", "export", "--export-rows", "60", "--export-batch", "7", "--repeats", "1"])
    result = bench.run_export(args, client)
    assert result["identical_data_files_to_one_thread_export"] is True
    data = 60 * 11018 * 4 * 2  # float32 rows of every parameter, two checkpoints, and two .npy headers
    assert data < result["store_data_bytes"] <= data + 2 * 4096
    med = {name: t["median_s"] for name, t in result["times"].items()}
    speedup = result["speedup_distributed_over_single_process"]
    assert speedup == pytest.approx(med["single_process"] / med["distributed"])
    assert result["rows_per_s"]["distributed"] == pytest.approx(120 / med["distributed"])
