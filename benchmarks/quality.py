"""The paper's Figure 1 in miniature: BPC against the number of experts activated at inference.

Trains each contestant with ``s2moe-train`` (the DeepSpeed engine) on the same budget -- same
config, steps, batches and seed; only ``model.moe.moe_type`` / ``router_type`` differ -- then
scores each checkpoint with ``s2moe-eval`` on the held-out test split at every ``--eval-k``.

    python benchmarks/quality.py [--models smoe s2moe xmoe stablemoe] [--steps 1500] [--world 1]
        [--seeds 1234 1235 1236] [--config configs/model/quality-tiny.yaml] [--output outputs/quality]
        [--write-results]

With several ``--seeds`` every contestant is trained once per seed (``train.seed``: initial
weights, batch order, noise) and the tables give the mean and the sample standard deviation over
seeds, and S2MoE - SMoE differences paired by seed.

Contestants (all trained with top-2):
  smoe       the paper's SMoE baseline: our layer without the noise stream and gate
  s2moe      S2MoE: clean + noisy stream, gate, InfoNCE uncertainty loss
  xmoe       SMoE with X-MoE routing (Chi et al. 2022, low-dimensional normalised routing)
  stablemoe  SMoE with StableMoE routing (Dai et al. 2022); router frozen after a quarter of
             the steps (stage 2)

Resumable: a contestant whose output folder holds a finished run of the same steps is not
trained again (an unfinished one continues with ``--resume auto``); its test scores are
kept in ``test_eval.json`` and reused. Writes ``benchmarks/results/quality.json``,
``benchmarks/results/quality.md``, ``benchmarks/quality_bpc_vs_k.png`` and, with
``--write-results``, the "Quality (Figure 1 in miniature)" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/common.py: machine, load average, tables, RESULTS.md)

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "text8-head-12.5M.gz")
SECTION = "Quality (Figure 1 in miniature)"
LABELS = {"smoe": "SMoE", "s2moe": "S2MoE", "xmoe": "XMoE", "stablemoe": "StableMoE"}


def contestant_overrides(name: str, steps: int):
    """``--set`` overrides that make ``name`` out of the shared config."""
    table = {
        "smoe": ["model.moe.moe_type=smoe", "model.moe.router_type=topk"],
        "s2moe": ["model.moe.moe_type=s2moe", "model.moe.router_type=topk"],
        "xmoe": ["model.moe.moe_type=smoe", "model.moe.router_type=xmoe"],
        "stablemoe": ["model.moe.moe_type=smoe", "model.moe.router_type=stablemoe",
                      f"model.moe.freeze_router_after={max(1, steps // 4)}"],
    }
    return table[name]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smoe", "s2moe"], choices=list(LABELS))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "model", "quality-tiny.yaml"))
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="text8 file (default <repo>/../shared/data/text8-head-12.5M.gz)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's train.steps)")
    p.add_argument("--world", type=int, default=1, help="training ranks (torchrun on this machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: ZeRO-0 fp32)")
    p.add_argument("--eval-k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train.seed of each run (default: the config's seed only)")
    p.add_argument("--max-windows", type=int, default=None, help="test windows scored (default: all)")
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "quality"), help="run folders")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="where quality.json / .md go")
    p.add_argument("--png", default=os.path.join(HERE, "quality_bpc_vs_k.png"))
    p.add_argument("--write-results", action="store_true", help="write the RESULTS.md section")
    p.add_argument("--report-only", action="store_true", help="no training/eval: tables and plot from the run folders")
    return p.parse_args(argv)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _env(threads: int):
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_dir_for(args, name: str, seed: int, config_seed: int) -> str:
    """``<output>/<name>`` for the config's seed (the folders that predate --seeds), else
    ``<output>/<name>-seed<N>``."""
    base = os.path.join(os.path.abspath(args.output), name)
    return base if seed == config_seed else f"{base}-seed{seed}"


def train(name: str, args, steps: int, run_dir: str, seed: int) -> None:
    """Train (or finish) one contestant; a finished run of ``steps`` steps is left alone."""
    done = _read_json(os.path.join(run_dir, "final_eval.json"))
    if done and done.get("step") == steps:
        print(f"[quality] {name}: trained ({steps} steps) in {run_dir}, skipping", flush=True)
        return
    train_args = ["train", "--config", args.config, "--data", args.data, "--output", run_dir, "--resume", "auto",
                  "--set", f"train.steps={steps}", f"train.seed={seed}", *contestant_overrides(name, steps)]
    if args.deepspeed:
        train_args += ["--deepspeed", args.deepspeed]
    if args.world == 1:
        cmd = [sys.executable, "-m", "s2moe_dist.cli", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(args.world),
               "--master_addr", "127.0.0.1", "--master_port", str(common.free_port()),
               "-m", "s2moe_dist.cli", *train_args]
    os.makedirs(run_dir, exist_ok=True)
    print(f"[quality] {name}: training {steps} steps on {args.world} rank(s) -> {run_dir}/train.log", flush=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    timing_path = os.path.join(run_dir, "timing.json")
    timing = _read_json(timing_path) or {"train_wall_s": 0.0, "invocations": 0}
    timing["train_wall_s"] += wall
    timing["invocations"] += 1
    timing["load_average_after"] = common.load_average()
    with open(timing_path, "w") as f:
        json.dump(timing, f, indent=2)
    if code != 0:
        raise SystemExit(f"[quality] {name}: s2moe-train exited {code}; see {run_dir}/train.log "
                         "(run again to resume)")


def evaluate(name: str, args, steps: int, run_dir: str) -> dict:
    """Test-split BPC at every eval_k (cached in test_eval.json for this step and k set)."""
    path = os.path.join(run_dir, "test_eval.json")
    cached = _read_json(path)
    ks = sorted(args.eval_k)
    if (cached and cached.get("step") == steps and sorted(int(k) for k in cached["bpc"]) == ks
            and cached.get("max_windows") == args.max_windows):
        return cached
    cmd = [sys.executable, "-m", "s2moe_dist.cli", "eval", "--checkpoint", run_dir, "--data", args.data,
           "--split", "test", "--json", "--eval-k", *map(str, ks)]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    print(f"[quality] {name}: test BPC at eval_k {ks}", flush=True)
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=_env(args.threads), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"[quality] {name}: s2moe-eval exited {out.returncode}:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"eval_wall_s": time.time() - t0, "max_windows": args.max_windows})
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def mean_std(values):
    """Mean and sample standard deviation (None for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: dict, steps: int) -> dict:
    """Per model: mean test BPC over seeds (``test_bpc``), its std (``test_bpc_std``), the runs."""
    results = {}
    for name, by_seed in runs.items():
        ks = next(iter(by_seed.values()))["test_bpc"].keys()
        stats = {k: mean_std(r["test_bpc"][k] for r in by_seed.values()) for k in ks}
        first = next(iter(by_seed.values()))
        results[name] = {"overrides": contestant_overrides(name, steps), "seeds": [int(x) for x in by_seed],
                         "test_bpc": {k: m for k, (m, _) in stats.items()},
                         "test_bpc_std": {k: sd for k, (_, sd) in stats.items()},
                         "test_characters": first["test_characters"], "step": first["step"],
                         "runs": by_seed}
    return results


def paired(results: dict, a: str, ka: str, b: str, kb: str):
    """Differences a@ka - b@kb over the seeds both models have, in seed order."""
    common_seeds = [s for s in results[a]["runs"] if s in results[b]["runs"]]
    return [(s, results[a]["runs"][s]["test_bpc"][ka] - results[b]["runs"][s]["test_bpc"][kb])
            for s in common_seeds]


def _fmt(mean: float, sd) -> str:
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def train_summary(run_dir: str) -> dict:
    """Median logged training tokens/s, last logged losses, final validation BPC, wall time."""
    rows = {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                rows.setdefault(rec["step"], {}).update(rec)  # a resumed run: the later line counts
    except OSError:
        pass
    tps = [r["train/tokens_per_s"] for r in rows.values() if "train/tokens_per_s" in r]
    last = rows[max(rows)] if rows else {}
    final = _read_json(os.path.join(run_dir, "final_eval.json")) or {}
    timing = _read_json(os.path.join(run_dir, "timing.json")) or {}
    return {"median_train_tokens_per_s": statistics.median(tps) if tps else None,
            "last_train_loss_task": last.get("train/loss_task"),
            "valid_bpc": final.get("bpc_valid"), "train_wall_s": timing.get("train_wall_s"),
            "eval_curve": {str(s): {k: v for k, v in r.items() if k.startswith("eval/")}
                           for s, r in sorted(rows.items()) if any(k.startswith("eval/") for k in r)}}


def plot(results: dict, ks, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        ys = [r["test_bpc"][str(k)] for k in ks]
        err = [r["test_bpc_std"][str(k)] for k in ks]
        n = len(r["seeds"])
        label = LABELS[name] + (f" (mean ± sd, {n} seeds)" if n > 1 else "")
        ax.errorbar(ks, ys, yerr=None if None in err else err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("experts activated per token at inference (eval_k; trained with top-2)")
    ax.set_ylabel("test BPC (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, steps: int, results: dict, meta: dict) -> str:
    ks = sorted(args.eval_k)
    header = ["model", "seeds", *[f"test BPC k={k}" for k in ks], "valid BPC k=2 (end of training)",
              "train tokens/s (median of logs)", "train wall s"]
    rows, seed_rows = [], []
    for name, r in results.items():
        trains = [run["train"] for run in r["runs"].values()]
        valid = [t["valid_bpc"]["2"] for t in trains if (t["valid_bpc"] or {}).get("2") is not None]
        tps = [t["median_train_tokens_per_s"] for t in trains if t["median_train_tokens_per_s"]]
        wall = [t["train_wall_s"] for t in trains if t["train_wall_s"]]
        test_bpc = [_fmt(r["test_bpc"][str(k)], r["test_bpc_std"][str(k)]) for k in ks]
        rows.append([LABELS[name], len(r["seeds"]), *test_bpc,
                     _fmt(*mean_std(valid)) if valid else "-", f"{statistics.median(tps):.0f}" if tps else "-",
                     f"{statistics.fmean(wall):.0f}" if wall else "-"])
        for seed, run in r["runs"].items():
            seed_rows.append([LABELS[name], seed, *[f'{run["test_bpc"][str(k)]:.4f}' for k in ks]])
    several = any(len(r["seeds"]) > 1 for r in results.values())
    tables = [common.markdown_table(header, rows)]
    if several:
        tables += ["", "Each run (test BPC):", "", common.markdown_table(["model", "seed", *[f"k={k}" for k in ks]],
                                                                        seed_rows)]
    notes = []
    if "smoe" in results and "s2moe" in results:
        def line(pairs):
            m, sd = mean_std(d for _, d in pairs)
            per_seed = ", ".join(f"{d:+.4f}" for _, d in pairs)
            return f"{m:+.4f}" + (f" ± {sd:.4f} (per seed: {per_seed})" if sd is not None else "")
        diffs = "; ".join(f"k={k}: {line(paired(results, 's2moe', str(k), 'smoe', str(k)))}" for k in ks)
        notes.append(f"- S2MoE minus SMoE test BPC, paired by seed (negative: S2MoE better): {diffs}")
        if "1" in results["s2moe"]["test_bpc"] and "2" in results["smoe"]["test_bpc"]:
            pairs = paired(results, "s2moe", "1", "smoe", "2")
            m = statistics.fmean(d for _, d in pairs)
            notes.append(f"- the paper's claim, S2MoE with 1 expert against SMoE with 2: {line(pairs)} BPC "
                         f"({'S2MoE k=1 better' if m < 0 else 'SMoE k=2 better'} on the mean; "
                         f"{sum(d < 0 for _, d in pairs)} of {len(pairs)} seeds S2MoE k=1 better)")
    seeds = sorted({s for r in results.values() for s in r["seeds"]})
    spread = ("the standard deviations above are over " + f"{len(seeds)} seeds" if several else
              "one seed per model: the seed-to-seed spread was not measured, so differences of a few "
              "hundredths of a bit are not established by this run alone")
    body = "\n".join([
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; command: `{meta['command']}`",
        (f"- load average: before {meta['load_before']}, after {meta['load_after']} (2 cores shared with other jobs)"
         if not meta["load_before"].startswith("n/a") else f"- load average: {meta['load_before']}"),
        f"- budget (same for every model and seed): {steps} steps x {meta['batch_size']} sequences x "
        f"{meta['seq_len']} characters = {meta['train_characters'] / 1e6:.2f}M training characters, "
        f"seed(s) {', '.join(map(str, seeds))} (train.seed: initial weights, batch order, noise), "
        f"{args.world} rank(s), {args.threads} thread(s) each, DeepSpeed engine ({args.deepspeed or 'ZeRO-0 fp32'})",
        f"- model: `{os.path.relpath(args.config, ROOT)}` ({meta['model_desc']}); all trained with top-2; "
        "StableMoE's router frozen after steps/4",
        f"- data: `{os.path.relpath(os.path.abspath(args.data), ROOT)}` (text8 head, 90/5/5 split); test BPC "
        f"over {meta['test_characters']} characters of the test split"
        + (f" (first {args.max_windows} windows)" if args.max_windows else " (all windows)"),
        f"- plot: `{os.path.relpath(os.path.abspath(args.png), ROOT)}`; JSON: "
        f"`{os.path.relpath(os.path.join(os.path.abspath(args.results), 'quality.json'), ROOT)}`",
        "- cells: mean ± sample standard deviation over seeds (a single value: one seed)",
        "", *tables, "", *notes,
        f"- A miniature: a ~1M-parameter model trained for minutes, not the paper's 100k steps at d 256; "
        f"{spread}. Train tokens/s and wall time were taken under different loads from other jobs "
        "(see bench_model.py for speed).",
    ])
    return body


def write_outputs(args, run_cfg, steps: int, results: dict, load_before: str) -> str:
    m = run_cfg.model
    run_meta = {"machine": common.machine(), "date": common.now(), "command": common.command_line(),
                "load_before": load_before, "load_after": common.load_average()}
    if args.report_only:
        previous = (_read_json(os.path.join(args.results, "quality.json")) or {}).get("meta", {})
        seeds = sorted({s for r in results.values() for s in r["seeds"]})
        if previous.get("seeds", [previous.get("config_seed", previous.get("seed"))]) == seeds:
            # the same runs: keep the figures' own date, command and load from the run that made them
            run_meta.update({k: previous[k] for k in run_meta if k in previous})
        else:  # assembled from run folders trained at different times: say so instead of one load
            run_meta["load_before"] = run_meta["load_after"] = (
                "n/a: a report over existing run folders, each trained by `python benchmarks/quality.py "
                "--models M --seeds S` (its log: <run folder>/train.log)")
    meta = {**run_meta, "batch_size": run_cfg.train.batch_size,
            "seq_len": m.seq_len, "config_seed": run_cfg.train.seed,
            "train_characters": steps * run_cfg.train.batch_size * m.seq_len,
            "test_characters": next(iter(results.values()))["test_characters"],
            "model_desc": f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, seq {m.seq_len}, "
                          f"{m.moe['num_experts']} experts of hidden {m.moe['ffn_hidden_size']}"}
    ks = sorted(args.eval_k)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "quality.json"), "w") as f:
        json.dump({"meta": {**meta, "steps": steps, "world": args.world, "threads": args.threads,
                            "seeds": sorted({s for r in results.values() for s in r["seeds"]}),
                            "config": os.path.relpath(args.config, ROOT), "eval_k": ks},
                   "results": results}, f, indent=2)
    plot(results, ks, args.png, f"text8 head, {steps} steps, tiny LM ({m.n_layers}x{m.d_model}, "
                                f"{m.moe['num_experts']} experts), trained top-2")
    body = report(args, steps, results, meta)
    with open(os.path.join(args.results, "quality.md"), "w") as f:
        f.write(f"## {SECTION}\n\n{body}\n")
    if args.write_results:
        common.write_section(SECTION, body)
    return body


def main(argv=None) -> int:
    args = parse_args(argv)
    args.config, args.data = os.path.abspath(args.config), os.path.abspath(args.data)
    if not os.path.isfile(args.data):
        print(f"quality.py: error: data file {args.data} not found; the benchmark needs text8 "
              "(e.g. ../shared/data/text8-head-12.5M.gz next to the repository) -- pass --data PATH",
              file=sys.stderr)
        return 2
    if args.world < 1 or args.threads < 1:
        print("quality.py: error: --world and --threads must be >= 1", file=sys.stderr)
        return 2
    from s2moe_dist.train.config import load_run_config
    run_cfg = load_run_config(args.config, [f"train.steps={args.steps}"] if args.steps else [], args.data)
    steps = run_cfg.train.steps
    load_before = common.load_average()
    seeds = args.seeds or [run_cfg.train.seed]
    runs = {}  # name -> {seed: run record}
    body = None
    # seed-major: after each seed every model has one more run, so partial results stay comparable
    for seed in seeds:
        for name in args.models:
            run_dir = run_dir_for(args, name, seed, run_cfg.train.seed)
            if not args.report_only:
                train(name, args, steps, run_dir, seed)
                ev = evaluate(name, args, steps, run_dir)
            else:
                ev = _read_json(os.path.join(run_dir, "test_eval.json"))
                if not ev:
                    print(f"[quality] {name} seed {seed}: no test_eval.json in {run_dir}, left out", flush=True)
                    continue
            runs.setdefault(name, {})[str(seed)] = {
                "run_dir": os.path.relpath(run_dir, ROOT), "test_bpc": ev["bpc"],
                "test_characters": ev["characters_scored"], "step": ev["step"], "train": train_summary(run_dir)}
            print(f"[quality] {name} seed {seed}: test BPC "
                  + "  ".join(f"k={k}: {v:.4f}" for k, v in ev["bpc"].items()), flush=True)
            body = write_outputs(args, run_cfg, steps, aggregate(runs, steps), load_before)
    if body is None:
        return 1
    print(body, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
