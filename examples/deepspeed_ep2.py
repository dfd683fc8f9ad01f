"""A model with S2MoE layers under ``deepspeed.initialize``, experts split over 2 ranks (EP=2).

    deepspeed --num_gpus 2 examples/deepspeed_ep2.py [--steps 5]
    torchrun --nproc_per_node 2 examples/deepspeed_ep2.py [--steps 5]

Runs on GPUs (NCCL) or, without them, on CPU ranks (gloo). The three changes a DeepSpeed-MoE
script needs are marked 1-3. Rank 0 prints the loss of every step.
"""
import argparse

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from s2moe_dist import S2MoE, s2moe_aux_loss
from s2moe_dist.integrations.deepspeed import s2moe_param_groups, validate_deepspeed_config

D = 64


class Model(nn.Module):
    """Embedding -> residual S2MoE FFN -> LayerNorm -> head: a stand-in for a transformer."""

    def __init__(self, ep_size):
        super().__init__()
        self.inp = nn.Linear(D, D)
        # 1. was: deepspeed.moe.layer.MoE(hidden_size=D, expert=mlp, num_experts=4, ep_size=ep_size, k=2)
        self.moe = S2MoE(hidden_size=D, num_experts=4, ep_size=ep_size, k=2, ffn_hidden_size=4 * D)
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, D)

    def forward(self, x, target):
        h = self.inp(x)
        out, l_aux, counts = self.moe(h)                # as with MoE
        pred = self.out(self.norm(h + out))
        task_loss = F.mse_loss(pred.float(), target.float())
        return task_loss + s2moe_aux_loss(self)         # 3. alpha * L_bal + beta * L_u of every S2MoE layer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="training steps")
    p.add_argument("--ep-size", type=int, default=2, help="expert-parallel size (divides the world size)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")  # before building layers with ep_size > 1
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if not gpu:  # DeepSpeed's CPU all-reduce leaves a /dev/shm buffer per rank behind otherwise
        from s2moe_dist.train.distributed import unlink_deepspeed_shm_buffer
        unlink_deepspeed_shm_buffer()

    ds_config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": 1}, "bf16": {"enabled": gpu}}
    validate_deepspeed_config(ds_config)                # fails early, naming the field and the fix
    torch.manual_seed(0)
    model = Model(args.ep_size)
    opt = torch.optim.AdamW(s2moe_param_groups(model, weight_decay=0.1), lr=1e-3)  # 2. expert groups split
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    g = torch.Generator().manual_seed(rank)             # every rank its own data
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    for step in range(args.steps):
        x = torch.randn(8, 16, D, generator=g).to(device, dtype)
        loss = engine(x, x.flip(-1))
        engine.backward(loss)
        engine.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} (world {torch.distributed.get_world_size()}, "
                  f"ep_size {args.ep_size}, local experts {model.moe.num_local_experts})", flush=True)


if __name__ == "__main__":
    main()
