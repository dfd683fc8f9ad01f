"""A model with an S2MoE layer under ``deepspeed.initialize``, experts split over 2 ranks (EP=2).

    deepspeed --num_gpus 2 examples/deepspeed_ep2.py
    torchrun --nproc_per_node 2 examples/deepspeed_ep2.py

Runs on GPUs (NCCL) or, without them, on CPU ranks (gloo). The body is the README's DeepSpeed
snippet; the three changes a DeepSpeed-MoE script needs are marked 1-3. Rank 0 prints the loss
of every step.
"""
import sys

import deepspeed, torch
from s2moe_dist import S2MoE, s2moe_aux_loss
from s2moe_dist.integrations.deepspeed import s2moe_param_groups, validate_deepspeed_config


class Model(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        # was: deepspeed.moe.layer.MoE(hidden_size=d, expert=mlp, num_experts=4, ep_size=2, k=2)
        self.moe = S2MoE(hidden_size=d, num_experts=4, ep_size=2, k=2, ffn_hidden_size=4 * d)   # 1.
        self.head = torch.nn.Linear(d, d)

    def forward(self, x):
        out, l_aux, exp_counts = self.moe(x)                                # as with MoE
        return self.head(x + out).pow(2).mean() + s2moe_aux_loss(self)    # 2. (or keep coef * l_aux)


def main():
    deepspeed.init_distributed()                                  # before building layers with ep_size > 1
    if not torch.cuda.is_available():  # DeepSpeed's CPU all-reduce would leave a /dev/shm buffer per rank
        from s2moe_dist.train.distributed import unlink_deepspeed_shm_buffer
        unlink_deepspeed_shm_buffer()
    ds_config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}, "steps_per_print": 10**6}
    validate_deepspeed_config(ds_config)                          # fails early, naming the field and the fix
    model = Model()
    opt = torch.optim.AdamW(s2moe_param_groups(model, weight_decay=0.1), lr=1e-3)   # 3. expert param groups
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    for step in range(3):
        loss = engine(torch.randn(8, 16, 64, device=engine.device))
        engine.backward(loss); engine.step()
        if torch.distributed.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f} (world {torch.distributed.get_world_size()}, "
                  f"local experts {model.moe.num_local_experts})", flush=True)


if __name__ == "__main__":
    sys.argv = sys.argv[:1]  # the deepspeed launcher appends --local_rank=N; LOCAL_RANK says the same
    main()
    deepspeed.comm.destroy_process_group()  # a rank exiting with live gloo threads can abort (SIGABRT)
