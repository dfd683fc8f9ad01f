"""``s2moe_dist.integrations.megatron_deepspeed.install()`` against a stand-in of the three places of
Megatron-DeepSpeed it touches (written here from its documented structure; no client code):
``megatron.initialize.parse_args(extra_args_provider, ignore_unknown_args)``, ``megatron.get_args()``
and ``megatron.model.transformer``, which binds ``MoE`` from ``deepspeed.moe.layer`` at import and
calls it with the 14 arguments of its ParallelTransformerLayer. Runs in a subprocess: the stand-in
``megatron`` package must not meet megatron-core's in this process.
"""
import json
import subprocess
import sys
import textwrap

from dist_utils import single_process_env

FILES = {
    "megatron/__init__.py": """
        _ARGS = None
        def get_args():
            return _ARGS
    """,
    "megatron/initialize.py": """
        import argparse
        import megatron
        def parse_args(extra_args_provider=None, ignore_unknown_args=False):
            p = argparse.ArgumentParser(allow_abbrev=False)
            p.add_argument("--hidden-size", type=int, default=8)
            p.add_argument("--num-experts", type=int, default=4)
            p.add_argument("--topk", type=int, default=1)
            p.add_argument("--moe-loss-coeff", type=float, default=0.01)
            if extra_args_provider is not None:
                p = extra_args_provider(p)
            return p.parse_args()
        def initialize_megatron(extra_args_provider=None):
            megatron._ARGS = parse_args(extra_args_provider)
    """,
    "megatron/model/__init__.py": "",
    "megatron/model/transformer.py": """
        import torch
        from deepspeed.moe.layer import MoE
        from megatron import get_args
        class ParallelMLP(torch.nn.Module):
            def __init__(self, d):
                super().__init__()
                self.fc = torch.nn.Linear(d, d)
            def forward(self, x):
                return self.fc(x), self.fc.bias
        class ParallelTransformerLayer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                args = get_args()
                self.mlp = MoE(args.hidden_size, ParallelMLP(args.hidden_size), num_experts=args.num_experts,
                               ep_size=1, k=args.topk, use_residual=False, capacity_factor=1.0,
                               eval_capacity_factor=1.0, min_capacity=4, drop_tokens=True, use_tutel=False,
                               enable_expert_tensor_parallelism=False, top2_2nd_expert_sampling=True)
            def forward(self, x):
                out, moe_loss, _ = self.mlp(x)
                return out, moe_loss
    """,
}

DRIVER = """
import json, sys, torch
import megatron.initialize, megatron.model.transformer as t   # pretrain_gpt.py's imports
from s2moe_dist.integrations import megatron_deepspeed
megatron_deepspeed.install()
megatron_deepspeed.install()   # idempotent
sys.argv = ["pretrain_gpt.py", "--num-experts", "4", "--s2moe-uncertainty-coef", "0.3", "--s2moe-noisy-gate-policy",
            "RSample", "--moe-loss-coeff", "0.02"]
megatron.initialize.initialize_megatron()
layer = t.ParallelTransformerLayer()
moe = layer.mlp
from deepspeed.moe.layer import MoE
x = torch.randn(16, 8)
out, moe_loss = layer(x)
(out.sum() + 0.02 * moe_loss).backward()
cfg = moe.config
print("RESULT " + json.dumps({"cls": type(moe).__name__, "is_ds_moe": isinstance(moe, MoE),
    "beta": cfg.uncertainty_coef, "alpha": cfg.balance_coef, "policy": cfg.noisy_gate_policy, "k": cfg.k,
    "E": cfg.num_experts, "drop": cfg.drop_tokens, "grad": float(moe.router.weight.grad.abs().sum()),
    "infonce": float(moe.uncertainty_loss)}))
"""


def test_install_makes_the_gpt_layers_s2moe_with_the_flags(tmp_path):
    for rel, text in FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    env = single_process_env()
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = f"{tmp_path}:{root}"
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(line[7:])
    assert got["cls"] == "MegatronDeepSpeedS2MoE" and got["is_ds_moe"]
    assert (got["beta"], got["alpha"], got["policy"]) == (0.3, 0.02, "RSample")
    assert (got["k"], got["E"], got["drop"]) == (1, 4, True)
    assert got["grad"] > 0 and got["infonce"] > 0
