"""The deepspeed and torchrun launchers run a 2-rank CPU training of S2MoE (EP=2, ZeRO-1, AdamW) with
tests/deepspeed_tiny_train.py; both give the same losses, decreasing on the fixed batch (issue 4)."""
import json
import os
import subprocess
import sys

import pytest

from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "deepspeed_tiny_train.py")
BIN = os.path.dirname(sys.executable)


def _launch(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))}
    proc = subprocess.run(cmd + [SCRIPT, "--ep-size", "2", "--steps", "5", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    return {
        "deepspeed": _launch([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())],
                             d / "ds.json"),
        "torchrun": _launch([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port",
                             str(free_port())], d / "tr.json"),
    }


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launcher_runs_two_rank_cpu_training(runs, launcher):
    r = runs[launcher]
    assert r["world_size"] == 2 and len(r["losses"]) == 5
    assert all(b < a for a, b in zip(r["losses"], r["losses"][1:])), r["losses"]


def test_both_launchers_train_identically(runs):
    assert runs["deepspeed"]["losses"] == runs["torchrun"]["losses"]
