"""The quality report over the run folders of benchmarks/quality.py: contestants (Figure 1),
paired differences by seed, ablations, counted training FLOPs, wall-clock, collapse diagnostics
and a verdict in numbers. Reads only what the runs wrote (plus one FLOP-counted training step
and one collapse probe per run, both cached in the run folder)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import common
import quality as q

FIGURE = ("smoe", "s2moe", "smoe-top1", "s2moe-top1", "xmoe", "stablemoe")  # in the plot, in this order
CLAIM = ("s2moe-top1", "1", "smoe", "2")  # the paper's claim at equal training FLOPs


def mean_std(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean, sd) -> str:
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


# ---- per run (cached in the run folder) -----------------------------------------------------
def contestant_flops(args, name: str, steps: int, vocab_size: int):
    """Counted FLOPs of one training step of contestant ``name`` (quality_flops.py) and of the run."""
    import quality_flops
    from s2moe_dist.train.config import load_run_config
    run_cfg = load_run_config(args.config, [f"train.steps={steps}", *q.contestant_overrides(name, steps)])
    run_cfg.model.vocab_size = vocab_size
    flops = quality_flops.training_step_flops(run_cfg)
    return {**flops, "steps": steps, "train_total": flops["total"] * steps}


def run_collapse(run_dir: str, data: str):
    """Collapse diagnostics of the run's final checkpoint (s2moe_dist.train.collapse_eval), cached."""
    path = os.path.join(run_dir, "collapse.json")
    cached = q._read_json(path)
    if cached:
        return cached
    cmd = [sys.executable, "-m", "s2moe_dist.train.collapse_eval", run_dir, "--data", data]
    out = subprocess.run(cmd, cwd=q.ROOT, env=q._env(1), capture_output=True, text=True)
    if out.returncode != 0:
        print(f"[quality] collapse diagnostics of {run_dir} failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


# ---- gathering -----------------------------------------------------------------------------
def gather(args, config_steps: int, steps: int):
    """{name: {seed: record}} for the run folders of ``steps`` steps, plus the previous report's
    runs (``--previous``) the folders do not have."""
    found = q.discover(os.path.abspath(args.output))
    runs = {}
    for name, seeds in found.items():
        if args.models and name not in args.models:
            continue
        for seed, s in sorted(seeds, key=lambda run: run[0]):
            if (s or config_steps) != steps or (args.seeds and seed not in args.seeds):
                continue
            run_dir = q.run_dir_for(args, name, seed, steps, config_steps)
            ev = q._read_json(os.path.join(run_dir, "test_eval.json"))
            runs.setdefault(name, {})[str(seed)] = q.collect(args, run_dir, ev, "run folder")
    for name, r in recorded_results(recorded(args, steps), steps, steps).items():
        for seed, rec in r["runs"].items():
            if (not args.models or name in args.models) and (not args.seeds or int(seed) in args.seeds):
                runs.setdefault(name, {}).setdefault(str(seed), rec)
    prev = q._read_json(args.previous) if getattr(args, "previous", None) else None
    if prev and prev["meta"].get("steps") == steps:
        for name, r in prev["results"].items():
            if args.models and name not in args.models:
                continue
            for seed, rec in r["runs"].items():
                if str(seed) not in runs.get(name, {}) and (not args.seeds or int(seed) in args.seeds):
                    runs.setdefault(name, {})[str(seed)] = {**rec, "source": os.path.basename(args.previous),
                                                            "flops": None, "collapse": None}
    return runs


def recorded(args, steps: int):
    """The ``--recorded`` quality.json (of this code) when it reports ``steps`` as its own budget, else None."""
    path = getattr(args, "recorded", None)
    if not path:
        return None
    rec = q._read_json(path)
    if rec is None:
        raise SystemExit(f"[quality] --recorded {path}: not a readable quality.json")
    return rec if rec["meta"].get("steps") == steps else None


def recorded_results(rec, steps: int, budget: int) -> dict:
    """{name: results} that the recorded report ``rec`` holds for ``budget`` steps: its Figure 1
    results when that is its own budget ``steps``, else its longer runs of ``budget``. Records are
    kept as written: their source (a run folder, or the previous report), FLOPs, collapse."""
    if not rec:
        return {}
    return rec["results"] if budget == steps else rec["meta"].get("longer", {}).get(str(budget), {})


def aggregate(runs: dict, steps: int, flops=None) -> dict:
    results = {}
    for name in sorted(runs, key=_order):
        by_seed = dict(sorted(runs[name].items()))
        ks = next(iter(by_seed.values()))["test_bpc"].keys()
        stats = {k: mean_std(r["test_bpc"][k] for r in by_seed.values()) for k in ks}
        results[name] = {"label": q.label(name), "overrides": q.contestant_overrides(name, steps),
                         "seeds": [int(x) for x in by_seed],
                         "test_bpc": {k: m for k, (m, _) in stats.items()},
                         "test_bpc_std": {k: sd for k, (_, sd) in stats.items()},
                         "flops": flops(name) if flops else None, "runs": by_seed}
    return results


def _order(name: str):
    base, abl = q.split_name(name)
    return (FIGURE.index(base) if base in FIGURE else 99, abl or "")


def paired(results, a, ka, b, kb):
    """[(seed, a@ka - b@kb, cross)] over the seeds both have; ``cross``: the two runs come from
    different sources (a run folder here and the previous report)."""
    if a not in results or b not in results:
        return []
    ra, rb = results[a]["runs"], results[b]["runs"]
    return [(s, ra[s]["test_bpc"][ka] - rb[s]["test_bpc"][kb], ra[s].get("source") != rb[s].get("source"))
            for s in ra if s in rb]


def diff_line(pairs) -> str:
    m, sd = mean_std(d for _, d, _ in pairs)
    per_seed = ", ".join(f"{s}{'*' if cross else ''}: {d:+.4f}" for s, d, cross in pairs)
    return f"{m:+.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" (by seed: {per_seed})"


# ---- tables --------------------------------------------------------------------------------
def _flops_cell(r):
    f = r.get("flops")
    return f"{f['total'] / 1e9:.2f} / {f['train_total'] / 1e12:.2f}" if f else "-"


def _wall_cell(r):
    wall = [run["train"]["train_wall_s"] for run in r["runs"].values() if (run["train"] or {}).get("train_wall_s")]
    return f"{statistics.fmean(wall):.0f}" if wall else "-"


def _trained_k(name):
    return 1 if q.split_name(name)[0].endswith("-top1") else 2


def bpc_at_wall(run: dict, wall: float, k: str):
    """Validation BPC (k) the run had reached after ``wall`` seconds of its own training, from its
    eval curve (linear in steps between evals; steps taken as evenly timed); a run finished by
    then gives its last value, a time before its first eval None."""
    curve = run["train"].get("eval_curve") or {}
    own = run["train"].get("train_wall_s")
    pts = sorted((int(s), v.get(f"eval/bpc_k{k}")) for s, v in curve.items() if v.get(f"eval/bpc_k{k}") is not None)
    if not pts or not own:
        return None
    step = wall / own * run["step"]
    if step >= pts[-1][0]:  # finished by then: its final value
        return pts[-1][1]
    prev = (pts[0][0], pts[0][1])
    if step <= prev[0]:
        return None
    for s, v in pts[1:]:
        if step <= s:
            return prev[1] + (v - prev[1]) * (step - prev[0]) / (s - prev[0])
        prev = (s, v)
    return None


def contestant_table(results, ks, ref_wall):
    header = ["contestant", "trained k", "seeds", *[f"test BPC k={k}" for k in ks],
              "training GFLOPs / step / run TFLOPs (counted)", "train wall s (mean)",
              f"valid BPC k=1 at {ref_wall:.0f} s" if ref_wall else "valid BPC k=1 at SMoE top-2's wall-clock"]
    rows = []
    for name, r in results.items():
        if "." in name:
            continue
        same = [bpc_at_wall(run, ref_wall, "1") for run in r["runs"].values()] if ref_wall else []
        same = [v for v in same if v is not None]
        rows.append([r["label"], _trained_k(name), len(r["seeds"]),
                     *[_fmt(r["test_bpc"][str(k)], r["test_bpc_std"][str(k)]) for k in ks],
                     _flops_cell(r), _wall_cell(r), _fmt(*mean_std(same)) if same else "-"])
    return common.markdown_table(header, rows)


def seed_table(results, ks):
    rows = []
    for name, r in results.items():
        for seed, run in r["runs"].items():
            rows.append([name, seed, *[f'{run["test_bpc"][str(k)]:.4f}' for k in ks],
                         f'{run["train"]["train_wall_s"]:.0f}' if (run["train"] or {}).get("train_wall_s") else "-",
                         run.get("source", "run folder")])
    return common.markdown_table(["run", "seed", *[f"k={k}" for k in ks], "train wall s", "from"], rows)


def ablation_table(results, ks):
    rows = []
    for name, r in results.items():
        base, abl = q.split_name(name)
        if not abl:
            continue
        d = {k: paired(results, name, str(k), base, str(k)) for k in (1, 2)}
        claim = paired(results, name, "1", "smoe", "2")
        knobs = " ".join(q.ABLATIONS[abl][1]).replace("model.moe.", "")
        rows.append([f"{q.BASES[base][0]}: {q.ABLATIONS[abl][0]}", knobs,
                     len(r["seeds"]), *[_fmt(r["test_bpc"][str(k)], r["test_bpc_std"][str(k)]) for k in ks],
                     *[(f"{mean_std(x for _, x, _ in d[k])[0]:+.4f}" if d[k] else "-") for k in (1, 2)],
                     f"{mean_std(x for _, x, _ in claim)[0]:+.4f}" if claim else "-"])
    if not rows:
        return None
    return common.markdown_table(["ablation", "overrides", "seeds", *[f"test BPC k={k}" for k in ks],
                                  "Δ vs its base k=1 (paired)", "Δ vs its base k=2 (paired)",
                                  "k=1 minus SMoE top-2 k=2 (paired)"], rows)


def collapse_table(results):
    rows, layers = [], set()
    for name, r in results.items():
        per = [run["collapse"]["layers"] for run in r["runs"].values() if run.get("collapse")]
        if not per:
            continue
        layers |= set(per[0])
        cells = []
        for i in sorted(per[0]):
            cos = mean_std(p[i]["expert_cosine"] for p in per)
            rank = mean_std(p[i]["expert_effective_rank"] for p in per)
            cells += [_fmt(*cos), f"{rank[0]:.2f}" + (f" ± {rank[1]:.2f}" if rank[1] is not None else "")]
        rows.append([name, len(per), *cells])
    if not rows:
        return None
    header = ["run", "seeds"] + [h for i in sorted(layers) for h in (f"layer {i} expert cosine",
                                                                      f"layer {i} effective rank (of 8)")]
    return common.markdown_table(header, rows)


# ---- plot ----------------------------------------------------------------------------------
def plot(results, ks, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in results.items():
        if "." in name:
            continue
        ys = [r["test_bpc"][str(k)] for k in ks]
        err = [r["test_bpc_std"][str(k)] for k in ks]
        n = len(r["seeds"])
        old = sum(run.get("source", "run folder") != "run folder" for run in r["runs"].values())
        note = "" if not old else (", previous report" if old == n else f", {old} from the previous report")
        ax.errorbar(ks, ys, yerr=None if None in err else err, marker="o", capsize=3,
                    linestyle="--" if _trained_k(name) == 1 else "-",
                    label=f"{r['label']} ({n} seed{'s' if n > 1 else ''}{', mean ± sd' if n > 1 else ''}{note})")
    if "smoe" in results and "2" in results["smoe"]["test_bpc"]:  # the bar of the paper's claim
        ax.axhline(results["smoe"]["test_bpc"]["2"], color="grey", linestyle=":", linewidth=1,
                   label="SMoE top-2 at k=2")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("experts activated per token at inference (eval_k)")
    ax.set_ylabel("test BPC (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- verdict -------------------------------------------------------------------------------
def default_verdict(results, abls) -> str:
    """Whether an ablation earns a change of default: better than its base on every seed (3 or more)
    at both k=1 and k=2."""
    wins, few = [], []
    for n, _ in abls:
        base = q.split_name(n)[0]
        p1, p2 = paired(results, n, "1", base, "1"), paired(results, n, "2", base, "2")
        if len(p1) < 3 or len(p2) < 3:
            few.append(n)
        elif all(d < 0 for _, d, _ in p1 + p2):
            wins.append(n)
    if wins:
        return ("Better than its base on every seed at both k=1 and k=2 (a candidate default): "
                + ", ".join(wins) + ".")
    return ("Defaults unchanged: no ablation is better than its base on every seed at both k=1 and k=2"
            + (f" (fewer than 3 seeds so far: {', '.join(few)})" if few else " (3 seeds each)")
            + "; the seed-to-seed sd of a contestant is ~0.01 BPC.")


def verdict(results) -> list:
    out = []
    claim = paired(results, *CLAIM)
    if claim:
        m, sd = mean_std(d for _, d, _ in claim)
        better = sum(d < 0 for _, d, _ in claim)
        holds = m <= 0 or (sd is not None and abs(m) < sd)
        out.append(f"- **The paper's claim at equal training expert rows** (S2MoE trained top-1 with ONE expert at "
                   f"inference vs SMoE top-2 with two): {diff_line(claim)} BPC, S2MoE better on {better} of "
                   f"{len(claim)} seed(s): " + ("holds at this scale." if holds else
                                               f"does NOT hold at this scale: S2MoE top-1 is {m:.3f} BPC behind."))
    for k in ("1", "2"):
        p = paired(results, "s2moe-top1", k, "smoe", k)
        if p:
            out.append(f"- S2MoE trained top-1 minus SMoE top-2 at the same eval_k={k}: {diff_line(p)}")
    p = paired(results, "s2moe-top1", "1", "smoe-top1", "1")
    if p:
        out.append(f"- S2MoE trained top-1 minus SMoE trained top-1, both at k=1 (same inference cost): {diff_line(p)}")
    for k in ("1", "2"):
        p = paired(results, "s2moe", k, "smoe", k)
        if p:
            out.append(f"- S2MoE top-2 minus SMoE top-2 at eval_k={k} (S2MoE with twice the expert rows): "
                       f"{diff_line(p)}")
    fl = {n: results[n].get("flops") for n in ("smoe", "s2moe-top1", "s2moe") if n in results}
    if fl.get("smoe") and fl.get("s2moe-top1"):
        a, b = fl["s2moe-top1"], fl["smoe"]
        out.append(f"- FLOPs: S2MoE trained top-1 routes as many expert rows per step as SMoE top-2 "
                   f"({a['expert_rows']:.0f} = {b['expert_rows']:.0f}), but its counted training step is "
                   f"{a['total'] / b['total']:.2f}x SMoE top-2's ({a['total'] / 1e9:.2f} vs {b['total'] / 1e9:.2f} "
                   f"GFLOPs): the dense part counted {a['counted'] / b['counted']:.2f}x, mostly the InfoNCE "
                   "similarity matrices (infonce_max_tokens x infonce_max_tokens x d per layer) and the gate; "
                   "at this model size they cost as much as the rest of the dense model.")
    col = {n: [run["collapse"]["layers"] for run in results[n]["runs"].values() if run.get("collapse")]
           for n in ("smoe", "s2moe-top1", "s2moe") if n in results}
    col = {n: v for n, v in col.items() if v}
    if "smoe" in col and len(col) > 1:
        def cells(n):
            return "; ".join(f"layer {i}: cosine {statistics.fmean(p[i]['expert_cosine'] for p in col[n]):.3f}, "
                             f"rank {statistics.fmean(p[i]['expert_effective_rank'] for p in col[n]):.2f}"
                             for i in sorted(col[n][0]))
        out.append("- Collapse (final checkpoints, mean over the seeds measured): "
                   + " | ".join(f"{q.label(n)} ({len(col[n])} seed(s)): {cells(n)}" for n in col)
                   + ". Higher cosine / lower rank = more alike experts.")
    gates = [run["train"].get("gate_mean") for run in results.get("s2moe-top1", {}).get("runs", {}).values()
             if run.get("source") == "run folder" and run["train"].get("gate_mean")]
    if gates:
        tags = sorted(gates[0])
        out.append("- The learned gate of S2MoE trained top-1 at the end of training (weight of the clean stream, "
                   f"mean over {len(gates)} seed(s)): "
                   + ", ".join(f"{t.split('/')[1]} {statistics.fmean(g[t] for g in gates):.3f}" for t in tags)
                   + ": the model nearly switches the noisy stream off; a fixed 0.5 gate forces it in "
                     "(see the ablations).")
    abls = [(n, r) for n, r in results.items() if "." in n]
    for k in ("1", "2"):
        scored = []
        for n, r in abls:
            base = q.split_name(n)[0]
            d = paired(results, n, k, base, k)
            if d:
                scored.append((mean_std(x for _, x, _ in d)[0], n, len(d)))
        if scored:
            best = min(scored)
            worst = max(scored)
            out.append(f"- Ablations at k={k}: best {best[1]} ({best[0]:+.4f} vs its base, {best[2]} seed(s)), "
                       f"worst {worst[1]} ({worst[0]:+.4f}); "
                       + ", ".join(f"{n} {d:+.4f}" for d, n, _ in sorted(scored)))
    vs_smoe = {n: paired(results, n, "1", "smoe", "2") for n, _ in abls}
    vs_smoe = {n: p for n, p in vs_smoe.items() if p}
    closes = [n for n, p in vs_smoe.items() if mean_std(x for _, x, _ in p)[0] <= 0]
    if vs_smoe:
        out.append("- Does any setting close the k=1 gap to SMoE top-2? "
                   + (f"yes on the mean: {', '.join(closes)}" if closes else "no ablation did (k=1 minus SMoE top-2 "
                      "k=2 > 0 for all of them)")
                   + ". " + default_verdict(results, abls))
    if any(cross for r in (claim,) for _, _, cross in r) or any(
            run.get("source", "run folder") != "run folder" for r in results.values() for run in r["runs"].values()):
        out.append("- `*`: a pair of one run folder of this code and one run of the previous report (older layer "
                   "code, not bitwise the same training; see the reproduction line below).")
    return out


def reproduction(results, args) -> list:
    """Runs of this code next to the previous report's runs of the same contestant and seed."""
    prev = q._read_json(args.previous) if getattr(args, "previous", None) else None
    if not prev:
        return []
    out = []
    for name, r in results.items():
        for seed, run in r["runs"].items():
            old = prev["results"].get(name, {}).get("runs", {}).get(seed)
            if old and run.get("source") == "run folder":
                cells = ", ".join(f"k={k} {run['test_bpc'][k]:.4f} (previous {old['test_bpc'][k]:.4f})"
                                  for k in run["test_bpc"])
                out.append(f"- reproduction: {name} seed {seed} rerun on this code: {cells}")
    return out


# ---- the section ---------------------------------------------------------------------------
def report(args, steps, results, meta) -> str:
    ks = sorted(args.eval_k)
    smoe_walls = [run["train"]["train_wall_s"] for run in results.get("smoe", {}).get("runs", {}).values()
                  if (run["train"] or {}).get("train_wall_s") and run.get("source") == "run folder"]
    ref_wall = statistics.fmean(smoe_walls) if smoe_walls else None
    sources = sorted({run.get("source", "run folder") for r in results.values() for run in r["runs"].values()})
    parts = [
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; regenerate: `{meta['command']}`",
        f"- budget: {steps} steps x {meta['batch_size']} sequences x {meta['seq_len']} characters = "
        f"{meta['train_characters'] / 1e6:.2f}M training characters per run, 1 rank, 1 thread, DeepSpeed ZeRO-0 fp32; "
        "seeds set `train.seed` (initial weights, batch order, noise)",
        f"- model: `{os.path.relpath(args.config, q.ROOT)}` ({meta['model_desc']}); each contestant is the config "
        "plus its `model.moe` overrides (quality.py BASES / ABLATIONS)",
        f"- data: text8 head (90/5/5 split); test BPC over {meta['test_characters']} characters of the test split",
        "- training FLOPs: one training step (forward + backward, global batch) of the run's own config counted "
        "with `torch.utils.flop_counter.FlopCounterMode` plus the expert GEMMs from the rows the step routed "
        "(the counter counts `aten._grouped_mm` as 0): `benchmarks/quality_flops.py`; optimizer and "
        "elementwise ops not counted",
        "- wall-clock: each run's own training time (start-up, periodic evals and checkpoints included), measured "
        "under `nice -n 15` on a 2-core machine shared with other jobs (two quality runs at a time plus other "
        "engineers' work): a rough cost figure, not a speed benchmark. The same-wall-clock column reads each "
        "run's validation BPC (k=1, 128 windows, from its eval curve every 250 steps) after the mean SMoE top-2 "
        "training time, taking the steps as evenly timed (a run that finished sooner: its final value)",
        f"- run sources: {', '.join(sources)}"
        + (" (the previous report's runs, taken where this report has no run folder for that contestant and "
           "seed; their code predates the current layer, see below)" if len(sources) > 1 else ""),
        f"- plot: `{os.path.relpath(os.path.abspath(args.png), q.ROOT)}`; JSON: "
        f"`{os.path.relpath(os.path.join(os.path.abspath(args.results), 'quality.json'), q.ROOT)}`",
        "- cells: mean ± sample standard deviation over seeds (one value: one seed)",
        "", "### Contestants (Figure 1)", "",
        contestant_table(results, ks, ref_wall), "",
        "![BPC vs experts at inference]("
        f"{os.path.relpath(os.path.abspath(args.png), os.path.dirname(common.RESULTS))})",
        "", "### Paired differences by seed, and the verdict", "", *verdict(results), *reproduction(results, args),
    ]
    abl = ablation_table(results, ks)
    if abl:
        parts += ["", "### Ablations of S2MoE's parts", "",
                  "Each row changes one knob of its base (S2MoE trained top-1 unless named otherwise); Δ columns: "
                  "the ablation minus its base, paired by seed (negative: the ablation is better).", "", abl]
    col = collapse_table(results)
    if col:
        parts += ["", "### Collapse diagnostics (final checkpoints)", "",
                  "Every expert applied to the same probe tokens (the layer's inputs on the first 4 validation "
                  "windows): mean pairwise cosine of the expert outputs (1 = identical experts) and the effective "
                  "rank of the stacked outputs (1 = collapsed, 8 = all experts different); "
                  "`python -m s2moe_dist.train.collapse_eval RUN --data TEXT8`, the same numbers s2moe-train logs "
                  "as `moe/layer{i}/expert_cosine` / `expert_effective_rank` (docs/diagnostics.md).", "", col]
    if meta.get("longer"):
        parts += ["", "### Longer runs", "",
                  "The same contestants trained for more steps (cosine schedule over the longer budget): does "
                  "the k=1 gap shrink with training?", "", longer_table(meta["longer"], ks), "",
                  *longer_verdict(results, meta["longer"])]
    parts += ["", "### Each run", "", seed_table(results, ks)]
    if meta.get("pending"):
        parts += ["", "Runs not finished when this section was written (their folders under `runs/quality/`): "
                  + ", ".join(f"`{p}`" for p in meta["pending"]) + "; rerun the command above when they finish."]
    return "\n".join(parts)


def gather_longer(args, config_steps: int, steps: int):
    """{steps: results} for the run folders trained for a budget other than ``steps``."""
    found = q.discover(os.path.abspath(args.output))
    budgets = {s for seeds in found.values() for _, s in seeds if s and s != steps}
    rec = recorded(args, steps)
    if rec:
        budgets |= {int(b) for b in rec["meta"].get("longer", {})}
    out = {}
    for budget in sorted(budgets):
        runs = {}
        for name, seeds in found.items():
            for seed, s in seeds:
                if s == budget:
                    run_dir = q.run_dir_for(args, name, seed, budget, config_steps)
                    ev = q._read_json(os.path.join(run_dir, "test_eval.json"))
                    runs.setdefault(name, {})[str(seed)] = {
                        "run_dir": os.path.relpath(run_dir, q.ROOT), "source": "run folder", "test_bpc": ev["bpc"],
                        "test_characters": ev["characters_scored"], "step": ev["step"],
                        "train": q.train_summary(run_dir), "collapse": None}
        for name, r in recorded_results(rec, steps, budget).items():
            for seed, record in r["runs"].items():
                runs.setdefault(name, {}).setdefault(str(seed), record)
        out[str(budget)] = aggregate(runs, budget)
    return out


def longer_table(longer, ks):
    rows = []
    for budget, results in longer.items():
        for name, r in results.items():
            gap = paired(results, name, "1", CLAIM[2], CLAIM[3]) if name != CLAIM[2] else []
            rows.append([budget, r["label"], len(r["seeds"]),
                         *[_fmt(r["test_bpc"][str(k)], r["test_bpc_std"][str(k)]) for k in ks],
                         diff_line(gap) if gap else ""])
    return common.markdown_table(["steps", "contestant", "seeds", *[f"test BPC k={k}" for k in ks],
                                  "its k=1 minus SMoE top-2 k=2 (paired by seed)"], rows)


def longer_verdict(results, longer) -> list:
    """Per longer budget and S2MoE contestant: its k=1 gap to SMoE top-2 k=2 there, next to the gap of
    the same seeds at the report's own budget (does training longer shrink it?)."""
    out = []
    for budget, res in longer.items():
        for name in res:
            if name == CLAIM[2]:
                continue
            gap = paired(res, name, "1", CLAIM[2], CLAIM[3])
            if not gap:
                continue
            seeds = {s for s, _, _ in gap}
            short = [p for p in paired(results, name, "1", CLAIM[2], CLAIM[3]) if p[0] in seeds]
            out.append(f"- {res[name]['label']} k=1 minus SMoE top-2 k=2 after {budget} steps: {diff_line(gap)}"
                       + (f"; the same seeds at the shorter budget: {diff_line(short)}" if short else ""))
    return out


def pending(output: str):
    """Run folders that exist but hold no test score yet."""
    if not os.path.isdir(output):
        return []
    return sorted(e for e in os.listdir(output)
                  if os.path.isdir(os.path.join(output, e))
                  and not os.path.isfile(os.path.join(output, e, "test_eval.json")))


def main(args, run_cfg, config_steps) -> int:
    steps = run_cfg.train.steps
    runs = gather(args, config_steps, steps)
    if not runs:
        print(f"[quality] no finished runs of {steps} steps under {args.output}", file=sys.stderr)
        return 1
    from s2moe_dist.data import load_corpus
    d = run_cfg.data
    vocab = load_corpus(args.data, kind=d.kind, split=tuple(d.split), cache_dir=d.cache_dir).vocab_size
    results = aggregate(runs, steps, lambda name: contestant_flops(args, name, steps, vocab))
    m = run_cfg.model
    first = next(run for r in results.values() for run in r["runs"].values())
    meta = {"machine": common.machine(), "date": common.now(), "command": common.command_line(),
            "batch_size": run_cfg.train.batch_size, "seq_len": m.seq_len,
            "train_characters": steps * run_cfg.train.batch_size * m.seq_len,
            "test_characters": first["test_characters"], "steps": steps,
            "model_desc": f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, seq {m.seq_len}, "
                          f"{m.moe.num_experts} experts of hidden {m.moe.ffn_hidden_size}",
            "pending": pending(os.path.abspath(args.output)), "eval_k": sorted(args.eval_k),
            "longer": gather_longer(args, config_steps, steps),
            "config": os.path.relpath(args.config, q.ROOT)}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "quality.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    plot(results, sorted(args.eval_k), args.png,
         f"text8 head, {steps} steps, tiny LM ({m.n_layers}x{m.d_model}, {m.moe.num_experts} experts); "
         "dashed: trained top-1")
    body = report(args, steps, results, meta)
    with open(os.path.join(args.results, "quality.md"), "w") as f:
        f.write(f"## {q.SECTION}\n\n{body}\n")
    if args.write_results:
        common.write_section(q.SECTION, body)
    print(body, flush=True)
    return 0
