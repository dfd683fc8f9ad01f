"""A tiny model with S2MoE layers, trained under deepspeed.initialize.

Used by tests/test_deepspeed_*.py (the model, in-process) and run as a script by launchers:

    deepspeed --num_gpus 2 --master_port P tests/deepspeed_tiny_train.py --ep-size 2 --out r.json
    torchrun --nproc_per_node 2 --master_port P tests/deepspeed_tiny_train.py --ep-size 2 --out r.json

Rank 0 writes {"losses": [...], "world_size": W} to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

D, E, H = 16, 4, 32


class TinyMoEModel(nn.Module):
    """Linear -> (residual S2MoE) x layers -> LayerNorm -> Linear; MSE + S2MoE aux losses.

    Noise scales default to 0 so that a multi-rank run can be compared with one process exactly."""

    def __init__(self, layer_cls, ep_size=1, layers=2, num_experts=E, k=2, **kw):
        super().__init__()
        kw = {"noise_mult_std": 0.0, "noise_add_std": 0.0, **kw}
        self.inp = nn.Linear(D, D)
        self.moes = nn.ModuleList([layer_cls(D, num_experts=num_experts, k=k, ffn_hidden_size=H,
                                             ep_size=ep_size, **kw) for _ in range(layers)])
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, D)

    def forward(self, x, y):
        from s2moe_dist import s2moe_aux_loss
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)[0]
        pred = self.out(self.norm(h))
        return F.mse_loss(pred.float(), y.float()) + s2moe_aux_loss(self)


def batch(rank, tokens=24, seed=0):
    """The fixed batch of ``rank`` (different on every rank)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(tokens, D, generator=g), torch.randn(tokens, D, generator=g)


def ds_config(stage=0, bf16=False, clip=0.0, offload=False):
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
           "steps_per_print": 10**9, "zero_optimization": zero, "bf16": {"enabled": bf16},
           "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True}
    if offload:
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--config", default=None, help="DeepSpeed JSON (default: ZeRO-1 fp32)")
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import deepspeed
    from s2moe_dist import S2MoE
    from s2moe_dist.integrations.deepspeed import s2moe_param_groups, validate_deepspeed_config
    cfg = ds_config(stage=1)
    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
    validate_deepspeed_config(cfg)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from s2moe_dist.train.distributed import unlink_deepspeed_shm_buffer
    unlink_deepspeed_shm_buffer()  # DeepSpeed's CPU shm buffer would outlive the run (64 MiB/rank)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = TinyMoEModel(S2MoE, ep_size=args.ep_size)
    opt = torch.optim.AdamW(s2moe_param_groups(model, weight_decay=0.01), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    x, y = batch(rank)
    losses = []
    for _ in range(args.steps):
        loss = engine(x.to(dtype), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "world_size": torch.distributed.get_world_size()}, f)
    print(f"rank {rank} losses {losses}", flush=True)


if __name__ == "__main__":
    main()
