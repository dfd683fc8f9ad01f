"""benchmarks/quality.py contestant names and quality_report.py's paired differences and
same-wall-clock reading (pure functions over run records)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality  # noqa: E402
import quality_report  # noqa: E402


def test_contestant_names_and_overrides():
    assert quality.contestant_overrides("s2moe-top1.fixed-gate", 1500) == [
        "model.moe.moe_type=s2moe", "model.moe.router_type=topk", "model.moe.k=1", "model.moe.gate=fixed"]
    assert quality.contestant_overrides("stablemoe", 1500)[-1] == "model.moe.freeze_router_after=375"
    with pytest.raises(ValueError, match="ablation .* applies to an S2MoE base"):
        quality.split_name("smoe.beta0")
    with pytest.raises(ValueError, match="base must be one of"):
        quality.split_name("moe")


def _run(bpc, source="run folder", wall=None, curve=None):
    return {"test_bpc": bpc, "source": source, "step": 1000,
            "train": {"train_wall_s": wall, "eval_curve": curve or {}}}


def test_paired_differences_by_seed_mark_pairs_across_sources():
    results = {"a": {"runs": {"1": _run({"1": 2.0}), "2": _run({"1": 2.2}), "3": _run({"1": 2.0})}},
               "b": {"runs": {"1": _run({"2": 2.1}), "2": _run({"2": 2.1}, source="old.json")}}}
    pairs = quality_report.paired(results, "a", "1", "b", "2")
    assert [(s, round(d, 6), c) for s, d, c in pairs] == [("1", -0.1, False), ("2", 0.1, True)]
    assert quality_report.diff_line(pairs).startswith("+0.0000 ± 0.1414 (by seed: 1: -0.1000, 2*: +0.1000)")


def test_bpc_at_wall_interpolates_the_eval_curve():
    curve = {"250": {"eval/bpc_k1": 3.0}, "500": {"eval/bpc_k1": 2.0}, "1000": {"eval/bpc_k1": 1.0}}
    run = _run({}, wall=100.0, curve=curve)  # 1000 steps in 100 s: 10 steps/s
    assert quality_report.bpc_at_wall(run, 37.5, "1") == pytest.approx(2.5)
    assert quality_report.bpc_at_wall(run, 75.0, "1") == pytest.approx(1.5)
    assert quality_report.bpc_at_wall(run, 100.0, "1") == pytest.approx(1.0)
    assert quality_report.bpc_at_wall(run, 120.0, "1") == pytest.approx(1.0)  # finished by then
    assert quality_report.bpc_at_wall(run, 10.0, "1") is None  # before the first eval


def test_discover_keeps_every_budget_of_a_seed(tmp_path):
    # a 6000-step run of seed 1 once hid the same seed's run of the config's budget from the report
    for folder in ("smoe-seed1", "smoe-seed1-steps6000", "smoe-seed2", "smoe-seed3-steps6000", "junk-seed1"):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "test_eval.json").write_text("{}")
    os.makedirs(tmp_path / "s2moe-seed1")  # unfinished: no test_eval.json
    found = quality.discover(str(tmp_path))
    assert sorted(found) == ["smoe"]
    assert sorted(found["smoe"], key=str) == sorted([(1, None), (1, 6000), (2, None), (3, 6000)], key=str)


def test_recorded_runs_count_as_this_reports_own_where_no_run_folder_is_here(tmp_path):
    # run folders are not kept between machines: the committed quality.json is the record
    import argparse
    import json

    def rec(bpc, source="run folder"):
        return {"test_bpc": {"1": bpc}, "source": source, "step": 1, "train": {}, "collapse": {"cos": 0.5}}
    recorded = {"meta": {"steps": 1500, "longer": {"6000": {"smoe": {"runs": {"1234": rec(1.9)}}}}},
                "results": {"smoe": {"runs": {"1234": rec(2.0), "1235": rec(2.1, source="old.json")}},
                            "s2moe-top1": {"runs": {"1234": rec(2.2)}}}}
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(recorded))
    out = tmp_path / "runs"
    folder = out / "smoe-seed1235-steps6000"  # a new longer run, here as a folder
    os.makedirs(folder)
    (folder / "test_eval.json").write_text(json.dumps({"bpc": {"1": 1.8}, "characters_scored": 10, "step": 6000}))
    args = argparse.Namespace(output=str(out), recorded=str(path), previous=None, models=None, seeds=None)
    runs = quality_report.gather(args, 1500, 1500)
    assert sorted(runs) == ["s2moe-top1", "smoe"]
    assert runs["smoe"]["1234"] == rec(2.0)  # kept as written: source, collapse
    assert runs["smoe"]["1235"]["source"] == "old.json"
    longer = quality_report.gather_longer(args, 1500, 1500)
    assert sorted(longer["6000"]["smoe"]["runs"]) == ["1234", "1235"]
    assert longer["6000"]["smoe"]["test_bpc"]["1"] == pytest.approx(1.85)
    args.seeds = [1234]
    assert sorted(quality_report.gather(args, 1500, 1500)["smoe"]) == ["1234"]
    assert quality_report.gather(args, 6000, 6000) == {}  # a recorded file of another budget adds nothing
    args.recorded = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit, match="--recorded .*missing.json: not a readable quality.json"):
        quality_report.gather(args, 1500, 1500)


def test_a_default_changes_only_for_an_ablation_better_on_every_seed_at_k1_and_k2():
    def runs(*bpcs):
        return {"runs": {str(s): _run({"1": b, "2": b}) for s, b in zip((1, 2, 3), bpcs)}}
    results = {"s2moe-top1": runs(2.0, 2.0, 2.0), "s2moe-top1.noise0.1": runs(1.9, 1.95, 1.99),
               "s2moe-top1.beta0": runs(1.9, 2.1, 1.9)}
    abls = [(n, r) for n, r in results.items() if "." in n]
    assert quality_report.default_verdict(results, abls).endswith("(a candidate default): s2moe-top1.noise0.1.")
    results["s2moe-top1.noise0.1"]["runs"]["3"] = _run({"1": 1.9, "2": 2.01})  # worse at k=2 on one seed
    assert quality_report.default_verdict(results, abls).startswith(
        "Defaults unchanged: no ablation is better than its base on every seed at both k=1 and k=2 (3 seeds each)")
    del results["s2moe-top1.beta0"]["runs"]["3"]
    assert "(fewer than 3 seeds so far: s2moe-top1.beta0)" in quality_report.default_verdict(results, abls)
