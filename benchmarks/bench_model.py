"""Whole-LM throughput: S2MoE against the SMoE baseline, under the DeepSpeed engine, 1 or 2 gloo ranks.

    python benchmarks/bench_model.py --shapes tiny paper --worlds 1 2 --repeats 8 [--write-results]

For every (shape, world) the character LM (``s2moe_dist.model.CharLM``, built from the shape's
config with expert parallel = world) is wrapped by ``deepspeed.initialize`` (ZeRO-0 fp32 unless
``--deepspeed``; torch AdamW), once per contestant, in the same processes:
  training (one optimizer step: engine forward, LM loss + auxiliary losses, engine.backward, engine.step)
    s2moe       S2MoE trained top-2 (clean + noisy stream, gate, InfoNCE)
    smoe        the SMoE baseline, top-2 (same layer, moe_type smoe)
  inference (eval mode, no_grad forward)
    s2moe_eval_k1  S2MoE evaluated with 1 expert per token (the paper's cheaper inference)
    s2moe_eval_k2  S2MoE at 2 experts
    smoe_k2        SMoE at its trained k=2
Steps are timed interleaved after a warm-up (benchmarks/common.py); medians. Inputs are random
characters (the speed does not depend on the text). Tokens/s counts characters of all ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

SECTION = "Model throughput"
VOCAB = 27  # text8: a-z and space
# micro-batch (sequences per rank) and sequence length per shape; the paper's own batch (44 x 512
# characters per step) takes tens of seconds a step on one CPU core, hence the smaller default
SHAPES = {
    "tiny": dict(config="configs/model/tiny.yaml", micro=16, seq_len=None),
    "paper": dict(config="configs/model/paper-text8.yaml", micro=2, seq_len=None),
}
TRAIN = ("s2moe", "smoe")
INFER = {"s2moe_eval_k1": ("s2moe", 1), "s2moe_eval_k2": ("s2moe", 2), "smoe_k2": ("smoe", 2)}


def build_engine(opts, moe_type, world):
    """CharLM of the shape under deepspeed.initialize -> (engine, run config)."""
    import deepspeed

    from s2moe_dist.integrations.deepspeed import s2moe_param_groups
    from s2moe_dist.model import CharLM
    from s2moe_dist.train.config import load_run_config
    from s2moe_dist.train.ds_config import build_ds_config

    sets = [f"model.vocab_size={VOCAB}", f"model.moe.moe_type={moe_type}", f"model.moe.ep_size={world}",
            f"train.batch_size={opts['micro'] * world}", "train.gradient_accumulation_steps=1"]
    if opts["seq_len"]:
        sets.append(f"model.seq_len={opts['seq_len']}")
    run = load_run_config(os.path.join(ROOT, opts["config"]), sets, None)
    ds_config = build_ds_config(opts["deepspeed"], run.train, world, device="cpu")
    torch.manual_seed(0)
    from s2moe_dist.integrations.deepspeed import DeepSpeedS2MoE
    model = CharLM(run.model, moe_layer_cls=DeepSpeedS2MoE)
    groups = s2moe_param_groups(model, weight_decay=run.train.weight_decay)
    kwargs = ({"model_parameters": groups} if "optimizer" in ds_config else
              {"optimizer": torch.optim.AdamW(groups, lr=run.train.lr, betas=(run.train.beta1, run.train.beta2))})
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kwargs)
    return engine, run


def train_step(engine, x, y):
    from s2moe_dist.model import lm_loss

    def step():
        logits = engine(x)
        parts = lm_loss(engine.module, logits, y)
        engine.backward(parts.total)
        engine.step()
    return step


def infer_step(engine, x, k):
    from s2moe_dist.train.evaluate import eval_k_set

    def step():
        with eval_k_set(engine.module, k), torch.no_grad():
            engine.module(x)
    return step


def _bench(rank, world, opts):
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engines, runs = {}, {}
    for moe_type in TRAIN:
        engines[moe_type], runs[moe_type] = build_engine(opts, moe_type, world)
    m = runs["s2moe"].model
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, VOCAB, (opts["micro"], m.seq_len), generator=g)
    y = torch.randint(0, VOCAB, (opts["micro"], m.seq_len), generator=g)
    out = {"load_before": common.load_average(),
           "params": {t: sum(p.numel() for p in e.module.parameters()) for t, e in engines.items()},
           "seq_len": m.seq_len, "model": f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, "
                                          f"{m.moe.num_experts} experts of hidden {m.moe.ffn_hidden_size}, "
                                          f"top-{m.moe.k}, dropout {m.dropout}"}
    for e in engines.values():
        e.train()
    steps = {"train": {t: train_step(engines[t], x, y) for t in TRAIN},
             "infer": {n: infer_step(engines[t], x, k) for n, (t, k) in INFER.items()}}
    for mode, fns in steps.items():
        out[mode] = common.interleaved(fns, opts["repeats"], warmup=opts["warmup"])
    out["profile"] = {f"{mode} {n}": common.profile_table(fn, rows=opts.get("profile_rows", 15))
                      for mode, fns in steps.items() for n, fn in fns.items() if n in opts.get("profile", ())}
    out["load_after"] = common.load_average()
    return out


# ---- report ---------------------------------------------------------------------------------------
def rows_for(shape, world, r, opts):
    """Table rows of one (shape, world) run: tokens/s from the median wall and CPU times."""
    tokens = opts["micro"] * r["seq_len"] * world  # characters per step, all ranks
    rows, fig = [], {}
    for mode, ref in (("train", "smoe"), ("infer", "smoe_k2")):
        wall = {n: common.median(v) for n, v in r[mode]["wall"].items()}
        cpu = {n: common.median(v) for n, v in r[mode]["cpu"].items()}
        for name in wall:
            # CPU-based rate: as if each rank had its own core (the machine is shared)
            fig[name] = (tokens / wall[name], tokens / cpu[name])
            rows.append([shape, world, mode, name, tokens, wall[name] * 1e3, common.spread(r[mode]["wall"][name]),
                         cpu[name] * 1e3, fig[name][0], fig[name][1],
                         f"{fig[name][0] / (tokens / wall[ref]):.2f} / {fig[name][1] / (tokens / cpu[ref]):.2f}"])
    return rows, fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["tiny", "paper"])
    p.add_argument("--worlds", nargs="+", type=int, choices=(1, 2), default=[1, 2])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--micro", type=int, default=None, help="sequences per rank per step (default: the shape's)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the config's)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: ZeRO-0 fp32)")
    p.add_argument("--profile", nargs="*", default=[], metavar="CONTESTANT",
                   help="print a torch.profiler breakdown of these contestants' steps (rank 0)")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_model.json"),
                   help="raw results (and the table next to it as .md); '-': none")
    p.add_argument("--write-results", action="store_true", help=f"write the '{SECTION}' section of RESULTS.md")
    args = p.parse_args(argv)
    all_rows, runs = [], {}
    for shape in args.shapes:
        for world in args.worlds:
            opts = dict(SHAPES[shape], repeats=args.repeats, warmup=args.warmup, deepspeed=args.deepspeed,
                        profile=args.profile, profile_rows=args.profile_rows)
            if args.micro:
                opts["micro"] = args.micro
            if args.seq_len:
                opts["seq_len"] = args.seq_len
            print(f"[bench_model] {shape} shape on {world} rank(s) ...", flush=True)
            r = common.spawn(_bench, world, (opts,), threads=args.threads)[0]
            rows, fig = rows_for(shape, world, r, opts)
            all_rows += rows
            runs[f"{shape}/world{world}"] = {"opts": opts, "result": r, "tokens_per_s": fig}
            print(common.markdown_table(HEADER, rows), flush=True)
            for name, text in r.pop("profile", {}).items():
                print(f"\n### profile: {shape} {world} rank(s), {name} (rank 0)\n{text}", flush=True)
    body = report(args, all_rows, runs)
    print(body)
    if args.json != "-":
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": common.machine(), "date": common.now(), "command": common.command_line(),
                       "runs": runs}, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"## {SECTION}\n\n{body}\n")
    if args.write_results:
        common.write_section(SECTION, body)


HEADER = ["shape", "ranks", "mode", "contestant", "chars/step", "wall ms", "IQR/med", "CPU ms/rank",
          "tokens/s (wall)", "tokens/s (CPU)", "vs SMoE (train) / smoe_k2 (infer), wall / CPU"]


def report(args, rows, runs):
    lines = [f"- machine: {common.machine()}",
             f"- date: {common.now()}; code: {common.git_revision()}; command: `{common.command_line()}`"]
    for key, run in runs.items():
        r, o = run["result"], run["opts"]
        lines.append(f"- {key}: {r['model']}, seq {r['seq_len']}, {o['micro']} sequences per rank per step; "
                     f"parameters S2MoE {r['params']['s2moe']:,} / SMoE {r['params']['smoe']:,} (per rank); "
                     f"load average before {r['load_before']}, after {r['load_after']}")
    lines += [
        f"- DeepSpeed engine, {args.deepspeed or 'ZeRO-0 fp32'}, torch AdamW, expert parallel = ranks, "
        f"{args.threads} torch thread(s) per rank, gloo; {args.repeats} interleaved repeats after {args.warmup} "
        "warm-ups, medians; random characters as input",
        "- the paper shape (configs/model/paper-text8.yaml: 4 layers, d 256, 16 experts, seq 512) runs with a "
        "small micro-batch (chars/step column), not the paper's 44 x 512 per step: on one CPU core per rank a "
        "full batch takes tens of seconds a step",
        "- tokens/s (wall): characters of all ranks / the slowest rank's median step time; tokens/s (CPU): the "
        "same over the median process CPU time per rank (the figure as if each rank had a core of its own; "
        "the 2 cores are shared with other jobs, so wall time includes waiting)",
        "- ratio column: tokens/s of the contestant over the SMoE baseline's (train: smoe top-2; inference: "
        "smoe_k2) in the same run; > 1 = faster",
        "", common.markdown_table(HEADER, rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
