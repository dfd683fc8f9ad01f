"""s2moe-train's signal handlers come first: importing the CLI and the signal module does not
import torch (2-3 s), so a preemption SIGTERM right after start is a clean exit 0, not a kill."""
import os
import signal
import subprocess
import sys
import time

from dist_utils import single_process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_cli_and_its_signal_handlers_does_not_import_torch():
    code = ("import sys, s2moe_dist, s2moe_dist.cli, s2moe_dist.train.signals, s2moe_dist.model; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=single_process_env(),
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_public_names_still_resolve():
    code = ("from s2moe_dist import S2MoE, S2MoEConfig, S2MoELayer, s2moe_aux_loss; "
            "from s2moe_dist.model import CharLM; from s2moe_dist.train import load_run_config; "
            "import deepspeed.moe.layer as m; assert issubclass(S2MoE, m.MoE) and issubclass(S2MoE, S2MoELayer); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=single_process_env(),
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_sigterm_half_a_second_after_start_exits_0(tmp_path):
    """0.5 s after exec: Python is up (~0.05 s here) and the handlers are in, torch is still importing."""
    cmd = [sys.executable, "-m", "s2moe_dist.cli", "train",
           "--config", os.path.join(ROOT, "configs", "model", "tiny.yaml"), "--output", str(tmp_path / "run"),
           "--set", "train.steps=3", "train.progress=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=single_process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM during start-up: nothing to save (step 0), exiting" in out, out[-3000:]
