"""benchmarks/quality.py's seed aggregation: means, sample std and seed-paired differences."""
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality  # noqa: E402


def _run(bpc):
    return {"test_bpc": {k: v for k, v in bpc.items()}, "test_characters": 100, "step": 10,
            "train": {"valid_bpc": None, "median_train_tokens_per_s": None, "train_wall_s": None}}


def test_aggregate_means_std_and_paired_differences():
    runs = {"smoe": {"1": _run({"1": 2.20, "2": 2.10}), "2": _run({"1": 2.30, "2": 2.16}),
                     "3": _run({"1": 2.25, "2": 2.13})},
            "s2moe": {"1": _run({"1": 2.15, "2": 2.08}), "3": _run({"1": 2.11, "2": 2.12})}}
    res = quality.aggregate(runs, steps=10)
    assert res["smoe"]["seeds"] == [1, 2, 3]
    assert res["smoe"]["test_bpc"]["1"] == pytest.approx(2.25)
    assert res["smoe"]["test_bpc_std"]["1"] == pytest.approx(statistics.stdev([2.20, 2.30, 2.25]))
    assert res["s2moe"]["test_bpc_std"]["2"] == pytest.approx(0.04 / 2 ** 0.5)
    # paired on the seeds both have (1 and 3), S2MoE k=1 against SMoE k=2
    pairs = quality.paired(res, "s2moe", "1", "smoe", "2")
    assert [s for s, _ in pairs] == ["1", "3"]
    assert [d for _, d in pairs] == pytest.approx([2.15 - 2.10, 2.11 - 2.13])


def test_one_seed_has_no_std_and_config_seed_keeps_the_old_folder(tmp_path):
    res = quality.aggregate({"smoe": {"7": _run({"1": 2.0})}}, steps=10)
    assert res["smoe"]["test_bpc_std"]["1"] is None
    args = quality.parse_args(["--output", str(tmp_path)])
    assert quality.run_dir_for(args, "smoe", 1234, 1234) == os.path.join(str(tmp_path), "smoe")
    assert quality.run_dir_for(args, "smoe", 1235, 1234) == os.path.join(str(tmp_path), "smoe-seed1235")
