"""``train.compile``: s2moe-train with the model compiled trains the same losses as eager.

The ``aot_eager`` backend traces the model with dynamo and AOT autograd (the graph, its
backward and the custom ops' fake kernels) without inductor's code generation, which takes
minutes per graph on this CPU.
"""
import json
import os
import subprocess
import sys

import pytest

from dist_utils import single_process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
SETTINGS = ["train.steps=3", "model.seq_len=32", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "model.moe.ffn_hidden_size=64", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
            "train.ckpt_every=0", "train.progress=false"]


def _run(out, extra):
    cmd = [sys.executable, "-m", "s2moe_dist.cli", "train", "--config", TINY, "--output", str(out),
           "--set", *SETTINGS, *extra]
    env = dict(single_process_env(), TORCH_LOGS="dynamo")  # dynamo says when it traces a frame
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    traced = "start tracing" in done.stderr + done.stdout
    return [r["train/loss_total"] for r in rows if "train/loss_total" in r], traced


@pytest.mark.slow
def test_compiled_model_trains_the_eager_losses(tmp_path):
    eager, eager_traced = _run(tmp_path / "eager", [])
    compiled, traced = _run(tmp_path / "compiled", ["train.compile=true", "train.compile_backend=aot_eager"])
    assert traced and not eager_traced
    assert len(eager) == 3 and len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_unknown_backend_is_refused_before_training(tmp_path):
    cmd = [sys.executable, "-m", "s2moe_dist.cli", "train", "--config", TINY, "--output", str(tmp_path / "run"),
           "--set", *SETTINGS, "train.compile=true", "train.compile_backend=nope"]
    done = subprocess.run(cmd, cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.compile_backend='nope' is invalid" in done.stderr and "inductor" in done.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
