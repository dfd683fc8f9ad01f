"""Does overlapping one stream's all-to-all with the other stream's expert GEMMs pay on this machine?

    python benchmarks/a2a_overlap.py [--tokens 8192] [--repeats 20] [--imbalance 0.05]

S2MoE dispatches its clean and noisy streams as ONE exchange. The alternative: exchange the clean
stream, start the noisy stream's exchange asynchronously, run the clean stream's expert GEMMs while it
is in flight, then the noisy stream's. This measures the forward dispatch of both ways at the paper
shape (d 256, expert hidden 512, 16 experts, EP=2: 8 per rank, top-1 per stream) on two gloo ranks with
one compute thread each, the steps of the two ways interleaved, and prints the medians and their ratio.
``--imbalance`` gives rank 0 that fraction more expert rows (dropless loads differ between ranks; the
other rank waits inside the exchange, the wait an overlap could fill).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _ranks(rank, world, tokens, d, h, local_experts, repeats, imbalance):
    import torch.distributed as dist
    torch.manual_seed(rank)
    rows = int(tokens * (1 + imbalance)) if rank == 0 else tokens  # expert rows this rank computes per stream
    w1 = torch.randn(local_experts, d, h) / d ** 0.5
    w2 = torch.randn(local_experts, h, d) / h ** 0.5
    clean, noisy = torch.randn(tokens, d), torch.randn(tokens, d)

    def experts(x):
        x = torch.cat([x, x[:rows - len(x)]]) if rows > len(x) else x
        return torch.cat([torch.nn.functional.gelu(c @ w1[e]) @ w2[e] for e, c in enumerate(x.chunk(local_experts))])

    def exchange_only():
        both = torch.empty(2 * tokens, d)
        dist.all_to_all_single(both, torch.cat([clean, noisy]))
        return both

    def one_exchange():
        both = exchange_only()
        experts(both[:tokens]), experts(both[tokens:])

    def overlapped():
        got_clean, got_noisy = torch.empty(tokens, d), torch.empty(tokens, d)
        dist.all_to_all_single(got_clean, clean)
        pending = dist.all_to_all_single(got_noisy, noisy, async_op=True)
        experts(got_clean)
        pending.wait()
        experts(got_noisy)

    ways = {"one exchange": one_exchange, "overlapped": overlapped, "exchange only": exchange_only,
            "experts only": lambda: (experts(clean), experts(noisy))}
    times = {name: [] for name in ways}
    for i in range(repeats + 2):
        for name, fn in ways.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()  # both ranks done: the step time of the slower one
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank (rows of each stream)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--imbalance", type=float, default=0.05)
    args = p.parse_args(argv)
    from s2moe_dist.testing.local_ranks import run_on_local_ranks
    res = run_on_local_ranks(_ranks, world_size=2, timeout=1200,
                             args=(args.tokens, 256, 512, 8, args.repeats, args.imbalance))[0]
    ratio = res["overlapped"] / res["one exchange"]
    print(json.dumps({"ms": {k: round(v, 1) for k, v in res.items()}, "overlapped/one_exchange": round(ratio, 3),
                      "tokens": args.tokens, "imbalance": args.imbalance, "repeats": args.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
