"""How unequal the dropless expert loads of two expert-parallel ranks are, step to step.

    python benchmarks/a2a_imbalance.py [--tokens 8192] [--steps 20]

At EP=2 each rank runs the expert GEMMs of its 8 of 16 experts on the rows BOTH ranks route there;
the rank with fewer rows then waits inside the all-to-all for the other. DeepSpeed top-2's
capacity-1 buffers are the same size on every rank, so it has no such wait. Routes each rank's own
random tokens through the benchmark's freshly initialised S2MoE top-1 layer (paper shape, both
streams) and prints the busier rank's rows over the mean: (max/mean - 1) of the expert GEMM time is
what the other rank waits.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    from s2moe_dist.moe.layer import S2MoELayer
    torch.manual_seed(0)
    layer = S2MoELayer(256, num_experts=16, k=1, ffn_hidden_size=512, activation="gelu")
    excess = []
    with torch.no_grad():
        for _ in range(args.steps):
            rows_per_rank = torch.zeros(2)
            for _rank in range(2):
                x = torch.randn(args.tokens, 256)
                tokens = layer.noise(x, stacked=True)
                r = layer._route(tokens, 1)
                per_expert = torch.bincount(r.dispatch_idx.reshape(-1), minlength=16)
                rows_per_rank += per_expert.view(2, 8).sum(1)  # experts 0-7 on rank 0, 8-15 on rank 1
            excess.append(float(rows_per_rank.max() / rows_per_rank.mean()) - 1)
    print(f"busier rank's expert rows over the mean, {args.steps} steps of {args.tokens} tokens per rank: "
          f"median +{100 * statistics.median(excess):.1f}%, max +{100 * max(excess):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
