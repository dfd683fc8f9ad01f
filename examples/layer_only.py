"""The S2MoE layer alone, in plain PyTorch (no DeepSpeed, no process group).

    python examples/layer_only.py [--steps 3]

The first lines of ``main`` are the README's snippet; the loop around them trains the layer on
random data for a few steps and prints the losses, then evaluates with one expert per token.
"""
import argparse

import torch

from s2moe_dist import S2MoE, s2moe_aux_loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="training steps")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    moe = S2MoE(hidden_size=256, num_experts=16, k=2, ffn_hidden_size=512, activation="gelu")
    model = torch.nn.ModuleDict({"ffn": moe})          # stands for your model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        x = torch.randn(4, 32, 256)
        y, l_aux, exp_counts = moe(x)                      # x: [..., 256] -> y: same shape
        loss = y.pow(2).mean() + s2moe_aux_loss(model)     # task loss + alpha*L_bal + beta*L_u of every S2MoE layer
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f} balance {l_aux.item():.4f} "
              f"infonce {moe.uncertainty_loss.item():.4f} slots per expert {exp_counts.tolist()}")

    moe.eval()
    moe.config.eval_k = 1                              # one expert per token at inference
    with torch.no_grad():
        y, _, counts = moe(torch.randn(2, 8, 256))
    print(f"eval (clean stream, eval_k=1): output {tuple(y.shape)}, {int(counts.sum())} slots")


if __name__ == "__main__":
    main()
