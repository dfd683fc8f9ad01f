"""The examples in examples/ (the README's snippets) run as written: the layer alone, a model under
deepspeed.initialize with EP=2 on 2 ranks started by the deepspeed launcher, and a Megatron-core
GPTModel with the S2MoE spec. Tiny sizes, a few steps; each checks that the loss is finite."""
import math
import os
import re
import subprocess
import sys

import pytest

from dist_utils import free_port, single_process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _run(cmd, timeout=400):
    env = {**single_process_env(), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+: loss (\S+)", proc.stdout, re.M)]
    assert losses and all(math.isfinite(x) for x in losses), proc.stdout[-3000:]
    return proc.stdout, losses


def test_layer_only():
    out, losses = _run([sys.executable, "examples/layer_only.py", "--steps", "2"])
    assert len(losses) == 2 and "eval (clean stream, eval_k=1)" in out


@pytest.mark.slow
def test_deepspeed_ep2_under_the_deepspeed_launcher():
    pytest.importorskip("deepspeed")
    out, losses = _run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                        "examples/deepspeed_ep2.py"])
    assert len(losses) == 3 and "world 2, local experts 2" in out


@pytest.mark.slow
def test_megatron_gpt_with_the_s2moe_spec():
    pytest.importorskip("megatron.core")
    out, losses = _run([sys.executable, "examples/megatron_gpt.py", "--steps", "2"])
    assert len(losses) == 2 and "layer 1 MLP: S2MoEMLP" in out


def _code_lines(text):
    """Code lines without comments and indentation (a snippet's lines, wherever the script has them)."""
    lines = (line.split("  #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("index,example", [(0, "layer_only.py"), (1, "deepspeed_ep2.py"), (2, "megatron_gpt.py")])
def test_readme_snippets_are_the_examples(index, example):
    """Every line of the README's python snippets is in the example the tests run."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(snippets) == 3
    script = set(_code_lines(open(os.path.join(ROOT, "examples", example), encoding="utf-8").read()))
    missing = [line for line in _code_lines(snippets[index]) if line not in script]
    assert not missing, f"README snippet {index + 1} lines not in examples/{example}: {missing}"
