"""launch_scripts/gpu_check.sh --dry-run: every check of the GPU check runs on CPU and passes (so
the script cannot rot between GPU runs); its comparisons do catch a mismatch; s2moe-eval scores a
bf16-trained checkpoint in bf16, as s2moe-train's own evaluation did."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import single_process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_parity as gp  # noqa: E402

CHECKS = ("build", "grouped_mm", "layer_parity", "sync_census", "collectives", "ep2_vs_ep1", "layer_speed",
          "train_resume_eval")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    p = subprocess.run(["bash", os.path.join(ROOT, "launch_scripts", "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--run-dir", str(out / "run")],
                       cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=400)
    return p, out


@pytest.mark.slow
def test_dry_run_passes_every_check_and_writes_the_summary(dry_run):
    p, out = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    status = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == "[gpu_check]" and parts[2] in CHECKS:
            status[parts[2]] = parts[1]
    assert set(status) == set(CHECKS), p.stdout[-2000:]
    census_missing = gp.census_class() is None
    for name, st in status.items():
        assert st == ("SKIP" if name == "sync_census" and census_missing else "PASS"), (name, p.stdout[-3000:])
    assert "[gpu_check] PASS: 8/8 checks" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["checks"]] == list(CHECKS) and summary["dry_run"] is True
    md = (out / "summary.md").read_text()
    assert all(f"| {name} |" in md for name in CHECKS)
    assert "32/32 modes match CPU" in md


@pytest.mark.slow
def test_eval_scores_a_bf16_checkpoint_in_bf16_like_the_trainer(dry_run):
    from s2moe_dist.cli import evaluate_checkpoint
    from s2moe_dist.train.distributed import destroy_process_group
    _, out = dry_run
    run = str(out / "run")
    final = json.load(open(os.path.join(run, "final_eval.json")))
    saved = dict(os.environ)  # the 1-process group exports RANK, MASTER_PORT, ...
    try:
        auto = evaluate_checkpoint(run, split="valid", max_windows=16)
        fp32 = evaluate_checkpoint(run, split="valid", max_windows=16, dtype="fp32")
    finally:
        destroy_process_group()  # DeepSpeed's cached groups with it (a later in-process eval reuses none)
        os.environ.clear()
        os.environ.update(saved)
    assert auto["dtype"] == "bfloat16" and fp32["dtype"] == "float32"
    for k, v in final["bpc_valid"].items():
        assert abs(auto["bpc"][k] - v) < 1e-6  # the trainer evaluated the same windows in bf16
    assert any(abs(fp32["bpc"][k] - v) > 1e-6 for k, v in final["bpc_valid"].items())


def test_without_a_gpu_it_refuses_unless_dry_run():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: the refusal is for machines without one")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], cwd=ROOT,
                       env=single_process_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device visible" in p.stderr and "--dry-run" in p.stderr


@pytest.mark.parametrize("mode", [gp.Mode("s2moe", 2, True, False, torch.float32),
                                  gp.Mode("smoe", 1, False, True, torch.bfloat16)], ids=lambda m: m.name)
def test_layer_comparison_catches_a_different_weight(mode):
    assert gp.compare_layer(mode, "cpu")["ok"]
    bad = gp.compare_layer(mode, "cpu", perturb=0.05)
    assert not bad["ok"] and any(p.startswith("output: relative error") for p in bad["problems"])


def test_cpu_random_draws_the_same_numbers_whatever_generator_is_passed():
    torch.manual_seed(5)
    want = torch.randn(6), torch.randperm(7), torch.rand(3)
    other = torch.Generator().manual_seed(99)
    torch.manual_seed(5)
    with gp.CpuRandom():
        got = torch.randn(6, generator=other), torch.randperm(7, generator=other), torch.rand_like(torch.empty(3))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
