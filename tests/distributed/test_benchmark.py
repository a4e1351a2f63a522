"""benchmarks/distributed.py on a tiny store: the record is complete and consistent (no timing assertions)."""

from __future__ import annotations

import statistics

import pytest

from benchmarks import distributed as bench


def test_tiny_run_records_every_part(client):
    args = bench._parser().parse_args(["--size", "0.002", "--dim", "64", "--shards", "9", "--repeats", "1",
                                     "--tiny-shards", "6"])
    result = bench.run(args, client)
    assert result["identical_results"] is True
    times = {name: t["median_s"] for name, t in result["times"].items()}
    assert result["ratio_distributed_over_single_machine"] == pytest.approx(times["distributed"] /
                                                                           times["single_machine"])
    assert result["shards"] == len(result["shard_compute_s"]) >= 2 and result["merge_tasks"] >= 1
    assert result["shard_bytes"] * result["shards"] == pytest.approx(result["store_bytes"])
    assert result["fixed_cost"]["tasks"] == 6
    rows = result["projection"]["rows"]
    assert [r["workers"] for r in rows] == [10, 100, 1000]
    assert all(r["waves"] * r["workers"] >= r["shards"] for r in rows)
    assert "PROJECTION" in result["projection"]["note"]
    per_shard = statistics.median(result["shard_compute_s"]) / result["shard_bytes"] * 2**40 / rows[0]["shards"]
    assert rows[0]["shard_s"] == pytest.approx(per_shard + result["fixed_cost"]["fixed_cost_per_task_s"])
