"""The paper's Figure 1 in miniature: BPC against the number of experts activated at inference.

Trains each contestant with ``s2moe-train`` (the DeepSpeed engine) on the same budget -- same
config, steps, batches and seed; only the ``model.moe`` overrides of the contestant differ --
then scores each checkpoint with ``s2moe-eval`` on the held-out test split at every ``--eval-k``.

    python benchmarks/quality.py --models smoe s2moe-top1 s2moe-top1.beta0 --seeds 1234 1235 1236
        [--steps 1500] [--config configs/model/quality-tiny.yaml] [--output runs/quality] [--train-only]
    python benchmarks/quality.py --report-only --write-results   # tables, plot, RESULTS.md section

Contestants (``--models``): a base, optionally ``<base>.<ablation>`` for an S2MoE base.
  smoe / smoe-top1     the paper's SMoE baseline (our layer without noise stream and gate), top-2 / top-1
  s2moe                S2MoE trained top-2: both streams top-2 (twice SMoE top-2's expert rows)
  s2moe-top1           S2MoE trained top-1: two streams x top-1, SMoE top-2's expert rows per token
  xmoe, stablemoe      SMoE with X-MoE / StableMoE routing (router frozen after steps/4)
  ablations            beta0, infonce-output, fixed-gate, shared-routing, noise0.1, noise0.3,
                       noise0.3-1.0, noise1.0-0.3, draws1, tau0.5, tau0.05 (see ABLATIONS)

Run folders: ``<output>/<name>-seed<N>`` (``-steps<S>`` appended for a budget other than the
config's). Resumable: a finished run of the same steps is not trained again (an unfinished one
continues with ``--resume auto``); test scores are kept in ``test_eval.json``. ``--train-only``
writes no report (several quality.py may train at once); ``--report-only`` trains nothing and
reports every run folder under ``--output`` plus, with ``--recorded``, the runs an earlier report of
this code recorded (quality_report.py): ``benchmarks/results/quality.json``,
``quality.md``, ``benchmarks/quality_bpc_vs_k.png`` and, with ``--write-results``, the
"Quality (Figure 1 in miniature)" section of RESULTS.md.
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
# Base contestants: name -> (label, overrides). "-top1": trained with model.moe.k=1 (the config has k=2).
BASES = {
    "smoe": ("SMoE top-2", ["model.moe.moe_type=smoe", "model.moe.router_type=topk"]),
    "s2moe": ("S2MoE top-2", ["model.moe.moe_type=s2moe", "model.moe.router_type=topk"]),
    "smoe-top1": ("SMoE top-1", ["model.moe.moe_type=smoe", "model.moe.router_type=topk", "model.moe.k=1"]),
    # two streams x top-1: the same expert rows per token in training as SMoE top-2 (iso-FLOP)
    "s2moe-top1": ("S2MoE trained top-1", ["model.moe.moe_type=s2moe", "model.moe.router_type=topk",
                                           "model.moe.k=1"]),
    "xmoe": ("XMoE", ["model.moe.moe_type=smoe", "model.moe.router_type=xmoe"]),
    "stablemoe": ("StableMoE", ["model.moe.moe_type=smoe", "model.moe.router_type=stablemoe"]),
}
# Ablations of S2MoE's parts, appended to an S2MoE base as "<base>.<ablation>" (e.g. s2moe-top1.beta0).
ABLATIONS = {
    "beta0": ("no InfoNCE (beta 0)", ["model.moe.uncertainty_coef=0.0"]),
    "infonce-output": ("InfoNCE on expert outputs", ["model.moe.uncertainty_on=output"]),
    "fixed-gate": ("fixed gate 0.5", ["model.moe.gate=fixed"]),
    "shared-routing": ("noisy stream routed like its clean token", ["model.moe.noisy_routing=shared"]),
    "noise0.1": ("noise (a, b) = (0.1, 0.1)", ["model.moe.noise_mult_std=0.1", "model.moe.noise_add_std=0.1"]),
    "noise0.3": ("noise (a, b) = (0.3, 0.3)", ["model.moe.noise_mult_std=0.3", "model.moe.noise_add_std=0.3"]),
    "noise0.3-1.0": ("noise (a, b) = (0.3, 1.0)", ["model.moe.noise_mult_std=0.3", "model.moe.noise_add_std=1.0"]),
    "noise1.0-0.3": ("noise (a, b) = (1.0, 0.3)", ["model.moe.noise_mult_std=1.0", "model.moe.noise_add_std=0.3"]),
    "draws1": ("one noise draw per element (noise_draws 1)", ["model.moe.noise_draws=1"]),
    "tau0.5": ("InfoNCE tau 0.5", ["model.moe.infonce_temperature=0.5"]),
    "tau0.05": ("InfoNCE tau 0.05", ["model.moe.infonce_temperature=0.05"]),
}


def split_name(name: str):
    """``"<base>[.<ablation>]"`` -> (base, ablation or None); unknown parts raise ValueError."""
    base, _, abl = name.partition(".")
    if base not in BASES:
        raise ValueError(f"unknown contestant {name!r}: base must be one of {sorted(BASES)}")
    if abl and (abl not in ABLATIONS or not base.startswith("s2moe")):
        raise ValueError(f"unknown contestant {name!r}: an ablation ({sorted(ABLATIONS)}) applies to an "
                         "S2MoE base (s2moe, s2moe-top1)")
    return base, abl or None


def label(name: str) -> str:
    base, abl = split_name(name)
    return BASES[base][0] + (f", {ABLATIONS[abl][0]}" if abl else "")


def contestant_overrides(name: str, steps: int):
    """``--set`` overrides that make ``name`` out of the shared config."""
    base, abl = split_name(name)
    out = list(BASES[base][1])
    if base == "stablemoe":
        out.append(f"model.moe.freeze_router_after={max(1, steps // 4)}")
    return out + (ABLATIONS[abl][1] if abl else [])


def contestant_name(value: str) -> str:
    split_name(value)
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", type=contestant_name, default=None,
                   help=f"contestants: a base {sorted(BASES)}, optionally with an S2MoE ablation "
                        f"<base>.<ablation> {sorted(ABLATIONS)} (default: smoe s2moe; with --report-only "
                        "every run folder under --output)")
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
    p.add_argument("--output", default=os.path.join(ROOT, "runs", "quality"), help="run folders")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="where quality.json / .md go")
    p.add_argument("--png", default=os.path.join(HERE, "quality_bpc_vs_k.png"))
    p.add_argument("--write-results", action="store_true", help="write the RESULTS.md section")
    p.add_argument("--report-only", action="store_true", help="no training/eval: tables and plot from the run folders")
    p.add_argument("--previous", default=None,
                   help="a previous quality.json whose runs fill in contestants/seeds with no run folder here")
    p.add_argument("--recorded", default=None,
                   help="a quality.json written by this code (e.g. benchmarks/results/quality.json): its runs, "
                        "Figure 1 and longer budgets, count as this report's own where no run folder of that "
                        "contestant, seed and budget is here (run folders are not kept between machines)")
    p.add_argument("--train-only", action="store_true",
                   help="train and score the runs, write no report (for several quality.py at once)")
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


def run_dir_for(args, name: str, seed: int, steps: int, config_steps: int) -> str:
    """``<output>/<name>-seed<N>``, with ``-steps<S>`` when the budget is not the config's."""
    base = os.path.join(os.path.abspath(args.output), f"{name}-seed{seed}")
    return base if steps == config_steps else f"{base}-steps{steps}"


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
            "gate_mean": {k: v for k, v in last.items() if k.endswith("/gate_mean")},
            "eval_curve": {str(s): {k: v for k, v in r.items() if k.startswith("eval/")}
                           for s, r in sorted(rows.items()) if any(k.startswith("eval/") for k in r)}}


def collect(args, run_dir: str, ev: dict, source: str) -> dict:
    """One run's record: test BPC, training summary, counted FLOPs and collapse diagnostics."""
    import quality_report
    return {"run_dir": os.path.relpath(run_dir, ROOT), "source": source, "test_bpc": ev["bpc"],
            "test_characters": ev["characters_scored"], "step": ev["step"], "train": train_summary(run_dir),
            "collapse": quality_report.run_collapse(run_dir, args.data)}


def discover(output: str):
    """{name: [(seed, steps), ...]} of the run folders under ``output`` that hold a test_eval.json
    (steps None: the config's budget; one seed may have runs of several budgets)."""
    import re
    found = {}
    for entry in sorted(os.listdir(output)) if os.path.isdir(output) else []:
        m = re.fullmatch(r"(.+)-seed(\d+)(?:-steps(\d+))?", entry)
        if m and os.path.isfile(os.path.join(output, entry, "test_eval.json")):
            try:
                split_name(m.group(1))
            except ValueError:
                continue
            found.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3)) if m.group(3) else None))
    return found


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
    if args.report_only and args.train_only:
        print("quality.py: error: --report-only and --train-only exclude each other", file=sys.stderr)
        return 2
    from s2moe_dist.train.config import load_run_config
    run_cfg = load_run_config(args.config, [f"train.steps={args.steps}"] if args.steps else [], args.data)
    steps = run_cfg.train.steps
    config_steps = load_run_config(args.config, [], args.data).train.steps
    if args.report_only:
        import quality_report
        return quality_report.main(args, run_cfg, config_steps)
    seeds = args.seeds or [run_cfg.train.seed]
    args.models = args.models or ["smoe", "s2moe"]
    # seed-major: after each seed every model has one more run, so partial results stay comparable
    for seed in seeds:
        for name in args.models:
            run_dir = run_dir_for(args, name, seed, steps, config_steps)
            train(name, args, steps, run_dir, seed)
            ev = evaluate(name, args, steps, run_dir)
            print(f"[quality] {name} seed {seed}: test BPC "
                  + "  ".join(f"k={k}: {v:.4f}" for k, v in ev["bpc"].items()), flush=True)
    if not args.train_only:
        import quality_report
        return quality_report.main(args, run_cfg, config_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
