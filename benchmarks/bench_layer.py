"""One MoE layer, S2MoE against DeepSpeed-MoE, on 1 or 2 gloo ranks (expert parallel = world).

    python benchmarks/bench_layer.py --world 2 --shape paper --repeats 10
    python benchmarks/bench_layer.py --world 2 --shape large --tokens 1024

Contestants, all fp32, gelu experts of the same hidden size, timed interleaved in one run:
  training (forward + backward of the layer, input gradient included, no optimizer step)
    ds_top2          deepspeed.moe.layer.MoE, k=2, DeepSpeed's defaults (capacity_factor 1.0,
                     drop_tokens=True, use_rts=True, top2_2nd_expert_sampling=True)
    ds_top2_dropless the same with drop_tokens=False (capacity = the largest expert load)
    s2moe_top1/top2  S2MoE (ours): both streams routed, fused, dispatched once; dropless
    smoe_top2        our layer as a plain top-2 MoE (moe_type smoe): our dispatcher at DeepSpeed's work
    s2moe_top1_no_noise (--ablation) S2MoE top-1 with a=b=0: what the noise module costs
    s2moe_top1_one_draw (--ablation) S2MoE top-1 with noise_draws=1 (one Gaussian draw per element)
    naive_top1/top2  S2MoE done naively: two calls of DeepSpeed's MoE (clean, noisy input; its
                     defaults) mixed by the same sigmoid gate, same noise and InfoNCE as ours
  inference (eval, no_grad)
    ds_top2          DeepSpeed's MoE, k=2, eval_capacity_factor 1.0
    s2moe_eval_k1    S2MoE trained top-2, evaluated clean at eval_k=1 (the paper's inference claim)
    s2moe_eval_k2    the same at eval_k=2
  floors: the expert GEMMs alone (grouped_mm over the local experts, rows split evenly) for the
  slot count of each contestant: its step time is reported as a multiple of its floor.
Peak memory: torch profiler allocation events of one step (CPU bytes above what was live before,
rank 0). All-to-all: calls and payload bytes per step and rank, counted by wrapping
torch.distributed's collectives.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

SHAPES = {
    "paper": dict(d=256, h=512, E=16, tokens=8192),
    "large": dict(d=1024, h=4096, E=8, tokens=1024),  # 8k tokens per rank: ~1 min per step on one core
}
DS_SETTINGS = dict(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, use_rts=True,
                   top2_2nd_expert_sampling=True)
BALANCE_COEF, UNCERTAINTY_COEF, INFONCE_TAU, INFONCE_TOKENS = 0.01, 0.1, 0.1, 1024


# ---- contestants -------------------------------------------------------------------------------
def ds_moe(d, h, E, world, k, drop_tokens):
    from deepspeed.moe.layer import MoE
    expert = nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, d, bias=False))
    moe = MoE(d, expert, num_experts=E, ep_size=world, k=k, drop_tokens=drop_tokens, **DS_SETTINGS)
    moe.set_deepspeed_parallelism()
    return moe


class NaiveS2MoE(nn.Module):
    """What a quick port would do: S2MoE's output from two calls of DeepSpeed's MoE."""

    def __init__(self, moe, d):
        super().__init__()
        from s2moe_dist.moe.noise import GaussianNoise
        self.moe = moe
        self.gate = nn.Linear(d, 1)
        self.noise = GaussianNoise(1.0, 1.0)

    def forward(self, x):
        from s2moe_dist.moe.losses import infonce_loss
        x_hat = self.noise(x)
        y_clean, l_clean, _ = self.moe(x)
        y_noisy, l_noisy, _ = self.moe(x_hat)
        g = torch.sigmoid(self.gate(x))
        y = g * y_clean + (1 - g) * y_noisy
        self.uncertainty_loss = infonce_loss(x, x_hat, INFONCE_TAU, INFONCE_TOKENS)
        return y, 0.5 * (l_clean + l_noisy), None


def s2moe(d, h, E, world, k, eval_k=None, moe_type="s2moe", noise=1.0, noise_draws=2):
    from s2moe_dist import S2MoE
    return S2MoE(d, num_experts=E, k=k, ffn_hidden_size=h, ep_size=world, activation="gelu",
                 eval_k=eval_k, moe_type=moe_type, noise_mult_std=noise, noise_add_std=noise, noise_draws=noise_draws,
                 infonce_temperature=INFONCE_TAU, infonce_max_tokens=INFONCE_TOKENS,
                 balance_coef=BALANCE_COEF, uncertainty_coef=UNCERTAINTY_COEF)


def train_step(module, x, grad_out):
    def step():
        y, l_aux, _ = module(x)
        loss = (y * grad_out).sum() + BALANCE_COEF * l_aux
        lu = getattr(module, "uncertainty_loss", None)
        if lu is not None:
            loss = loss + UNCERTAINTY_COEF * lu
        loss.backward()
        module.zero_grad(set_to_none=True)  # free the gradients: 9 layers' worth do not fit at the large shape
        x.grad = None
    return step


def infer_step(module, x):
    def step():
        with torch.no_grad():
            module(x)
    return step


def gemm_floor(rows, d, h, E_local, train):
    """The expert GEMMs alone: grouped_mm over ``rows`` rows split evenly over the local experts."""
    w1 = (torch.randn(E_local, d, h) / d ** 0.5).requires_grad_(train)
    w2 = (torch.randn(E_local, h, d) / h ** 0.5).requires_grad_(train)
    counts = torch.full((E_local,), rows // E_local, dtype=torch.long)
    counts[: rows - int(counts.sum())] += 1
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(rows, d, requires_grad=train)
    g = torch.randn(rows, d)

    def step():
        with torch.set_grad_enabled(train):
            y = F.grouped_mm(F.gelu(F.grouped_mm(x, w1, offs=offs)), w2, offs=offs)
            if train:
                y.backward(g)
                w1.grad = w2.grad = x.grad = None
    return step


def component_costs(d, E, T, repeats):
    """S2MoE's work beyond a plain top-k MoE, each piece alone (fwd+bwd, one process, CPU ms median):
    what the S2MoE top-1 step pays on top of DeepSpeed top-2 at the same expert FLOPs."""
    import time
    from s2moe_dist.moe.losses import balance_loss, infonce_loss
    from s2moe_dist.moe.noise import GaussianNoise
    from s2moe_dist.moe.router import TopKRouter
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    x_hat = torch.randn(T, d, requires_grad=True)
    a, b, go = torch.randn(T, d, requires_grad=True), torch.randn(T, d, requires_grad=True), torch.randn(T, d)
    gate, router, noise = nn.Linear(d, 1), TopKRouter(d, E), GaussianNoise(1.0, 1.0)

    def noise_step():
        noise(x).backward(go)

    def infonce_step():
        infonce_loss(x, x_hat, INFONCE_TAU, INFONCE_TOKENS).backward()

    def gate_step():
        g = torch.sigmoid(gate(x))
        torch.lerp(b, a, g).backward(go)

    def router_step():
        r = router(x_hat, 1, False)
        (balance_loss(r.probs, r.expert_idx, E) + r.weights.sum()).backward()

    def streams_step():  # the two streams concatenated for one dispatch, split after
        u, v = torch.cat([x, x_hat]).split([T, T])
        torch.autograd.backward([u, v], [go, go])

    rows = []
    for name, fn in [("noise module (2 Gaussian draws per element, x_hat = n1 x + n2)", noise_step),
                     (f"InfoNCE on {min(T, INFONCE_TOKENS)} sampled tokens", infonce_step),
                     ("gate: sigmoid(x W_g + b_g), mix of the two streams", gate_step),
                     ("second router (noisy stream) + its balance loss", router_step),
                     ("concatenate / split the two streams", streams_step)]:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            ts.append(time.process_time() - t0)
            x.grad = x_hat.grad = a.grad = b.grad = None
            for m in (gate, router):
                m.zero_grad(set_to_none=True)
        rows.append([name, common.median(ts) * 1e3])
    return rows


# ---- one rank ------------------------------------------------------------------------------------
def _bench(rank, world, opts):
    counter = common.CollectiveCounter().install()
    d, h, E, T = opts["d"], opts["h"], opts["E"], opts["tokens"]
    E_local = E // world
    torch.manual_seed(0)  # same dense (router, gate) weights on every rank
    layers = {
        "ds_top2": ds_moe(d, h, E, world, 2, True),
        "ds_top2_dropless": ds_moe(d, h, E, world, 2, False),
        "s2moe_top1": s2moe(d, h, E, world, 1),
        "s2moe_top2": s2moe(d, h, E, world, 2),
        "smoe_top2": s2moe(d, h, E, world, 2, moe_type="smoe"),
        "naive_top1": NaiveS2MoE(ds_moe(d, h, E, world, 1, True), d),
    }
    if opts["ablation"]:  # s2moe_top1 minus this = the noise module's cost
        layers["s2moe_top1_no_noise"] = s2moe(d, h, E, world, 1, noise=0.0)
        layers["s2moe_top1_one_draw"] = s2moe(d, h, E, world, 1, noise_draws=1)  # same x_hat law, half the RNG
    if opts["naive_top2"]:  # 4T expert rows per rank: doubles the run's time
        layers["naive_top2"] = NaiveS2MoE(ds_moe(d, h, E, world, 2, True), d)
    infer_layers = {"ds_top2": layers["ds_top2"], "s2moe_eval_k1": s2moe(d, h, E, world, 2, eval_k=1),
                    "s2moe_eval_k2": s2moe(d, h, E, world, 2, eval_k=2)}
    torch.manual_seed(1000 + rank)
    x = torch.randn(T, d, requires_grad=True)
    grad_out = torch.randn(T, d)

    # slots per rank each contestant's experts process (T tokens per rank, balanced routing)
    train_slots = {"ds_top2": 2 * T, "ds_top2_dropless": 2 * T, "s2moe_top1": 2 * T, "s2moe_top2": 4 * T,
                   "smoe_top2": 2 * T, "s2moe_top1_no_noise": 2 * T, "s2moe_top1_one_draw": 2 * T,
                   "naive_top1": 2 * T, "naive_top2": 4 * T}
    infer_slots = {"ds_top2": 2 * T, "s2moe_eval_k1": T, "s2moe_eval_k2": 2 * T}
    modes = {
        "train": ({n: train_step(m.train(), x, grad_out) for n, m in layers.items()},
                  {f"floor_{s}": gemm_floor(s, d, h, E_local, True) for s in sorted({train_slots[n] for n in layers})},
                  train_slots),
        "infer": ({n: infer_step(m, x) for n, m in infer_layers.items()},
                  {f"floor_{s}": gemm_floor(s, d, h, E_local, False) for s in sorted(set(infer_slots.values()))},
                  infer_slots),
    }
    out = {"load_before": common.load_average()}
    for mode, (steps, floors, slots) in modes.items():
        if mode == "infer":
            for m in infer_layers.values():
                m.eval()
        times = common.interleaved({**steps, **floors}, opts["repeats"], warmup=opts["warmup"])
        mem, comm = {}, {}
        for name, step in steps.items():
            mem[name] = common.peak_memory_bytes(step)
            counter.reset()
            step()
            comm[name] = counter.snapshot()
        out[mode] = {"times": times, "mem": mem, "comm": comm, "slots": slots}
        if opts["profile"]:
            out[mode]["profile"] = {n: common.profile_table(steps[n], rows=opts["profile_rows"])
                                    for n in opts["profile"] if n in steps}
    if opts["components"] and rank == 0:
        out["components"] = component_costs(d, E, T, max(5, opts["repeats"]))
    out["load_after"] = common.load_average()
    return out


# ---- report ---------------------------------------------------------------------------------------
BASELINE = "ds_top2"
PAIRS = {"naive_top1": "s2moe_top1", "naive_top2": "s2moe_top2", "smoe_top2": "ds_top2"}


def _ratio(a, b):
    return f"{a[0] / b[0]:.2f} / {a[1] / b[1]:.2f}"


def report(results, opts):
    r0 = results[0]
    rows, checks = [], []
    for mode in ("train", "infer"):
        res = r0[mode]
        wall = {n: common.median(v) * 1e3 for n, v in res["times"]["wall"].items()}
        cpu = {n: common.median(v) * 1e3 for n, v in res["times"]["cpu"].items()}
        best = {n: min(v) * 1e3 for n, v in res["times"]["cpu"].items()}
        fig = {n: (wall[n], cpu[n]) for n in wall}
        base = fig[BASELINE]
        for name, slots in res["slots"].items():
            if name not in res["mem"]:
                continue
            comm = [r[mode]["comm"][name] for r in results]
            calls = sum(comm[0]["calls"].get(k, 0) for k in ("all_to_all_single", "all_to_all"))
            mbytes = max(sum(c["bytes"].get(k, 0) for k in ("all_to_all_single", "all_to_all")) for c in comm) / 2**20
            other = {k: v for k, v in comm[0]["calls"].items() if k not in ("all_to_all_single", "all_to_all")}
            pair = f"{_ratio(fig[name], fig[PAIRS[name]])} vs {PAIRS[name]}" if name in PAIRS else ""
            rows.append([mode, name, slots, wall[name], common.spread(res["times"]["wall"][name]), cpu[name],
                         best[name], _ratio(fig[name], base), pair, _ratio(fig[name], fig[f"floor_{slots}"]),
                         res["mem"][name] / 2**20, calls, mbytes,
                         ", ".join(f"{k} {v}" for k, v in sorted(other.items())) or "-"])
        for key in sorted((k for k in fig if k.startswith("floor_")), key=lambda k: int(k[6:])):
            rows.append([mode, f"expert GEMMs only ({key[6:]} rows)", int(key[6:]), wall[key],
                         common.spread(res["times"]["wall"][key]), cpu[key], best[key], _ratio(fig[key], base), "",
                         "1", "", "", "", ""])
        low = {n: best[n] / best[BASELINE] for n in best}
        if mode == "train":
            checks.append(_check("S2MoE top-1 training step <= DeepSpeed top-2 (s2moe_top1 / ds_top2)",
                                 fig["s2moe_top1"], base, 1.0, low["s2moe_top1"]))
            checks.append(_check("naive two-call S2MoE top-1 slower than ours (naive_top1 / s2moe_top1)",
                                 fig["naive_top1"], fig["s2moe_top1"], 1.0, low["naive_top1"] / low["s2moe_top1"],
                                 above=True))
        else:
            checks.append(_check("S2MoE eval_k=1 inference <= 0.72 x DeepSpeed top-2 (s2moe_eval_k1 / ds_top2)",
                                 fig["s2moe_eval_k1"], base, 0.72, low["s2moe_eval_k1"]))
    header = ["mode", "contestant", "slots/rank", "wall ms", "IQR/med", "CPU ms/rank", "best CPU ms",
              "vs ds_top2 wall / CPU",
              "pair wall / CPU", "x floor wall / CPU", "peak MiB", "a2a calls", "a2a MiB/rank", "other collectives"]
    settings = (f"- machine: {common.machine()}\n"
                f"- date: {common.now()}; code: {common.git_revision()}; command: `{common.command_line()}`\n"
                f"- load average: before {r0['load_before']}, after {r0['load_after']}\n"
                f"- shape: d {opts['d']}, expert hidden {opts['h']}, {opts['E']} experts, {opts['tokens']} tokens "
                f"per rank, EP = world = {opts['world']}, {opts['threads']} torch thread(s) per rank, fp32, gelu; "
                f"{opts['repeats']} interleaved repeats after {opts['warmup']} warm-up, medians\n"
                f"- DeepSpeed MoE: {DS_SETTINGS}, drop_tokens True (its default) unless 'dropless'; "
                f"expert = Linear(d,h,bias=False)-GELU-Linear(h,d,bias=False)\n"
                f"- S2MoE: dropless, noise a=b=1, InfoNCE on <= {INFONCE_TOKENS} tokens, aux loss "
                f"{BALANCE_COEF} L_bal + {UNCERTAINTY_COEF} L_u (the naive port computes the same); smoe_top2: "
                f"our layer as a plain top-2 MoE (moe_type smoe), to compare dispatchers at equal work\n"
                f"- wall ms: slowest rank; CPU ms/rank: process CPU time (user+sys), mean over ranks -- the steadier "
                f"figure when other jobs share the cores; ratios are given as wall / CPU (medians); best CPU ms: "
                f"the fastest repeat, the least disturbed one\n"
                f"- peak MiB: torch allocations during one step (gradients included) above those live "
                f"before it (profiler "
                f"allocation events, rank 0); a2a: all_to_all(_single) calls and input bytes per step, "
                f"max over ranks; slots/rank: (token, expert) rows each rank's experts get when balanced")
    body = settings + "\n\n" + common.markdown_table(header, rows) + "\n\n" + "\n".join(checks)
    if "components" in r0:
        body += ("\n\nS2MoE's work beyond a plain top-k MoE, each piece alone (forward + backward, rank 0, "
                 "CPU ms, median):\n\n" + common.markdown_table(["piece", "CPU ms"], r0["components"]))
    return body


def _check(what, fig, ref, target, best, above=False):
    w, c = fig[0] / ref[0], fig[1] / ref[1]
    ok = [(v > target) if above else (v <= target) for v in (w, c, best)]
    verdict = "MET" if all(ok) else ("MISSED" if not any(ok) else "MIXED")
    return (f"- {verdict}: {what}: median wall {w:.3f}, median CPU {c:.3f}, best CPU {best:.3f} "
            f"(target {'>' if above else '<='} {target})")


def profiles_markdown(rank0: dict) -> str:
    """The ``--profile`` tables of rank 0, for the section (where the time goes, op by op)."""
    parts = [f"\n\n### profile: {mode} {name} (rank 0, one step, torch.profiler, top ops by self CPU time)\n\n"
             f"```\n{text.strip()}\n```" for mode in ("train", "infer")
             for name, text in rank0[mode].get("profile", {}).items()]
    return "".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, choices=(1, 2), default=2)
    p.add_argument("--shape", choices=tuple(SHAPES), default="paper")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default: the shape's)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--ablation", action="store_true",
                   help="also time S2MoE top-1 with the noise off (a=b=0), to split its cost")
    p.add_argument("--components", action="store_true",
                   help="also time S2MoE's extra pieces (noise, InfoNCE, gate, second router) alone")
    p.add_argument("--naive-top2", action="store_true", help="also time the naive two-call S2MoE at top-2")
    p.add_argument("--profile", nargs="*", default=[], metavar="CONTESTANT",
                   help="print a torch.profiler breakdown of these contestants' steps (rank 0)")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--out", default=common.RESULTS, help="markdown file to write the section to ('-': none)")
    args = p.parse_args(argv)
    opts = dict(SHAPES[args.shape])
    if args.tokens is not None:
        opts["tokens"] = args.tokens
    opts.update(world=args.world, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                naive_top2=args.naive_top2, ablation=args.ablation, components=args.components,
                profile=args.profile, profile_rows=args.profile_rows)
    if opts["E"] % args.world:
        raise ValueError(f"--world {args.world} must divide the number of experts ({opts['E']})")
    results = common.spawn(_bench, args.world, (opts,), threads=args.threads)
    body = report(results, opts)
    title = f"Layer benchmark: {args.shape} shape, EP={args.world}"
    if opts["tokens"] != SHAPES[args.shape]["tokens"]:
        title += f", {opts['tokens']} tokens per rank"
    body += profiles_markdown(results[0])
    print(f"## {title}\n\n{body}")
    if args.out != "-":
        common.write_section(title, body, args.out)
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
