"""Console-script habits: ``--help`` shows every option with its default, and ``s2moe-eval --json``
prints only JSON on stdout (DeepSpeed's log lines go to stderr), run as the real console script
on a checkpoint of a 2-step training."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from dist_utils import single_process_env

from s2moe_dist.cli import _HelpWithDefaults, eval_parser, train_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _script(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        path = shutil.which(name)
    assert path, f"console script {name} not installed (pip install -e .)"
    return path


def _env():
    return {**single_process_env(), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.mark.parametrize("name,parser", [("s2moe-train", train_parser), ("s2moe-eval", eval_parser)])
def test_help_lists_every_option_with_its_default(name, parser):
    proc = subprocess.run([_script(name), "--help"], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    formatter = _HelpWithDefaults(name)
    options = [a for a in parser()._actions if a.option_strings and a.help != "==SUPPRESS==" and a.dest != "help"]
    assert len(options) >= 6
    for action in options:
        assert action.option_strings[0] in proc.stdout, action.option_strings
        text = formatter._get_help_string(action)
        assert "default" in text or "(required)" in text, (action.option_strings, text)
    assert "(default: 16)" in proc.stdout or name == "s2moe-train"  # --batch-size of s2moe-eval


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("json") / "run"
    cmd = [_script("s2moe-train"), "--config", os.path.join(ROOT, "configs", "model", "tiny.yaml"),
           "--output", str(out), "--set", "train.steps=2", "train.batch_size=2", "train.eval_every=0",
           "train.eval_windows=1", "train.progress=false", "model.n_layers=1", "model.d_model=32",
           "model.n_heads=2", "model.moe.num_experts=2", "model.moe.ffn_hidden_size=32", "train.eval_k=[1]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_eval_json_stdout_is_only_json(tiny_run):
    proc = subprocess.run([_script("s2moe-eval"), "--checkpoint", str(tiny_run), "--json", "--max-windows", "2"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)  # the whole of stdout: what `| python -m json.tool` reads
    assert result["step"] == 2 and set(result["bpc"]) == {"1"} and result["characters_scored"] == 2 * 64
    assert "real_accelerator" in proc.stderr  # DeepSpeed's accelerator line: still logged, on stderr
    piped = subprocess.run([sys.executable, "-m", "json.tool"], input=proc.stdout, capture_output=True,
                           text=True, timeout=60)
    assert piped.returncode == 0 and '"bpc"' in piped.stdout
