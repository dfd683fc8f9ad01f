"""The GPU path end to end on one GPU, in at most ~7 minutes; ``--dry-run``: the same code on CPU.

    bash launch_scripts/gpu_check.sh [--out DIR]        # on a GPU machine (no network needed)
    bash launch_scripts/gpu_check.sh --dry-run          # CPU, ~2 minutes: keeps the script working

Checks (one PASS / FAIL / SKIP line each; exit status 1 on any FAIL):
  build              torch version, CUDA build, device and compute capability
  grouped_mm         whether torch._grouped_mm takes its fast path (no host sync, no per-expert
                     loop) for bf16 and fp32, seen through CUDA's sync debug mode; time against a loop
  layer_parity       every mode (s2moe/smoe, k=1/2, train/eval, dropless/capacity, fp32/bf16) on the
                     device against the same weights on CPU: outputs, losses, every gradient, the
                     device of every returned tensor
  sync_census        host syncs of a training step per file:line (SyncCensus; on CUDA also what
                     CUDA's sync debug mode reports)
  collectives        the project's collectives at one rank on NCCL (gloo in --dry-run)
  ep2_vs_ep1         EP=2 on two processes sharing the GPU (gloo on CUDA tensors) against EP=1
  layer_speed        training step times at the paper's layer shape against DeepSpeed MoE top-2,
                     with the GPU-busy fraction (kernel time / wall time, torch.profiler)
  train_resume_eval  s2moe-train (bf16, tiny) + resume + s2moe-eval, as subprocesses

Writes DIR/summary.md (for benchmarks/RESULTS.md) and DIR/summary.json; DIR is --out, else
$OUT, else gpu_check_out/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import gpu_parity as gp  # noqa: E402

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_")


@dataclass
class Result:
    name: str
    status: str = "PASS"  # PASS | FAIL | SKIP
    summary: str = ""
    lines: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.lines.append(f"FAIL: {why}")


@dataclass
class Ctx:
    device: torch.device
    dry_run: bool
    out: str
    run_dir: str = ""  # s2moe-train's --output in train_resume_eval ("": a temporary folder)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ---- helpers -------------------------------------------------------------------------------------
def sync_device(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


@contextlib.contextmanager
def cuda_sync_warnings(ctx: Ctx):
    """CUDA's own record of host syncs (``torch.cuda.set_sync_debug_mode('warn')``): yields a list
    filled with "file:line" of the first project frame of each sync. Empty on CPU."""
    found: List[str] = []
    if not ctx.cuda:
        yield found
        return
    import traceback as tb
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return old(message, category, filename, lineno, file, line)
        site = "outside s2moe_dist"
        for fr in reversed(tb.extract_stack()[:-1]):
            if f"{os.sep}s2moe_dist{os.sep}" in fr.filename:
                site = f"{os.path.relpath(fr.filename, ROOT)}:{fr.lineno}"
                break
        found.append(site)

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old


def time_steps(ctx: Ctx, step: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median seconds per step (CUDA events on the GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if ctx.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def busy_fraction(ctx: Ctx, step: Callable[[], None], steps: int) -> float:
    """Device kernel time / wall time over ``steps`` steps (torch.profiler); NaN on CPU."""
    if not ctx.cuda:
        return float("nan")
    from torch.profiler import ProfilerActivity, profile
    sync_device(ctx)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages()
                    if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type))
    return kernel_us / 1e6 / wall


# ---- checks --------------------------------------------------------------------------------------
def check_build(ctx: Ctx, r: Result) -> None:
    cuda_build = torch.version.cuda or "none (CPU build)"
    r.lines.append(f"torch {torch.__version__}, CUDA build {cuda_build}, cuDNN "
                   f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}")
    if ctx.cuda:
        cap = torch.cuda.get_device_capability()
        r.lines.append(f"device {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), "
                       f"{torch.cuda.device_count()} visible, "
                       f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
        r.summary = f"torch {torch.__version__} CUDA {cuda_build} on {torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}"
    else:
        r.summary = f"torch {torch.__version__}, CUDA build {cuda_build}; dry run on CPU"
    try:
        import deepspeed
        r.lines.append(f"deepspeed {deepspeed.__version__}")
    except ImportError as e:
        r.fail(f"deepspeed does not import: {e}")


def check_grouped_mm(ctx: Ctx, r: Result) -> None:
    n_exp, d, h, rows = 16, 256, 512, 8192
    if ctx.dry_run:
        rows = 512
    parts = []
    for dtype in (torch.bfloat16, torch.float32):
        try:
            parts.append(_grouped_mm_one(ctx, r, dtype, n_exp, d, h, rows))
        except Exception as e:  # noqa: BLE001 - the layer calls grouped_mm in both dtypes
            r.fail(f"{str(dtype).replace('torch.', '')} grouped_mm raised {type(e).__name__}: {e}")
    r.summary = "; ".join(parts)


def _grouped_mm_one(ctx: Ctx, r: Result, dtype, n_exp: int, d: int, h: int, rows: int) -> str:
    import torch.nn.functional as F
    x = torch.randn(rows, d, device=ctx.device, dtype=dtype)
    w = torch.randn(n_exp, d, h, device=ctx.device, dtype=dtype) / d ** 0.5
    offs = torch.arange(1, n_exp + 1, device=ctx.device, dtype=torch.int32) * (rows // n_exp)
    ref = torch.cat([x[i * (rows // n_exp):(i + 1) * (rows // n_exp)] @ w[i] for i in range(n_exp)])
    y = F.grouped_mm(x, w, offs=offs)
    err = gp._rel(y, ref)
    with cuda_sync_warnings(ctx) as syncs:
        F.grouped_mm(x, w, offs=offs)
    sync_device(ctx)
    t_grouped = time_steps(ctx, lambda: F.grouped_mm(x, w, offs=offs), 10 if ctx.cuda else 2, 2)
    t_loop = time_steps(ctx, lambda: [x[i * (rows // n_exp):(i + 1) * (rows // n_exp)] @ w[i]
                                      for i in range(n_exp)], 10 if ctx.cuda else 2, 2)
    name = str(dtype).replace("torch.", "")
    fast = "n/a on CPU" if not ctx.cuda else ("fast path (no host sync)" if not syncs else
                                              f"FALLBACK ({len(syncs)} host syncs: per-expert loop)")
    r.lines.append(f"{name}: {fast}; {t_grouped * 1e6:.0f} us grouped vs {t_loop * 1e6:.0f} us loop of "
                   f"{n_exp} mm ({rows}x{d}x{h}); error vs loop {err:.1e}")
    if not err <= gp.TOL[dtype]:
        r.fail(f"{name} grouped_mm differs from a loop of mm: {err:.2e}")
    if ctx.cuda and dtype == torch.bfloat16 and syncs and torch.cuda.get_device_capability()[0] >= 9:
        r.fail("bf16 grouped_mm syncs with the host on sm_90+ (expected the fast path)")
    return f"{name}: {fast}"


def check_layer_parity(ctx: Ctx, r: Result) -> None:
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    modes = gp.all_modes()
    bad = 0
    for mode in modes:
        res = gp.compare_layer(mode, ctx.device)
        worst = max(res["errors"].items(), key=lambda kv: kv[1]) if res["errors"] else ("-", 0.0)
        r.lines.append(f"{'ok  ' if res['ok'] else 'FAIL'} {mode.name:38s} {len(res['errors']):2d} tensors, "
                       f"worst {worst[0]} {worst[1]:.1e}")
        for p in res["problems"]:
            r.lines.append(f"       {p}")
        bad += not res["ok"]
    if bad:
        r.fail(f"{bad} of {len(modes)} modes differ from CPU (see above)")
    r.summary = f"{len(modes) - bad}/{len(modes)} modes match CPU (outputs, losses, all gradients, devices)"


def check_sync_census(ctx: Ctx, r: Result) -> None:
    census = gp.census_class()
    if census is None:
        r.status, r.summary = "SKIP", "census unavailable (s2moe_dist.testing.sync_census not in this tree)"
        return
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    totals = []
    for moe_type, k in (("s2moe", 1), ("s2moe", 2), ("smoe", 2)):
        mode = gp.Mode(moe_type, k, True, False, dtype)
        step = gp.layer_train_step(mode, ctx.device)
        step()  # warm-up (lazy dispatcher, caches)
        sync_device(ctx)
        with census() as c:
            step()
        with cuda_sync_warnings(ctx) as seen:
            step()
        sync_device(ctx)
        totals.append(c.total)
        sites = ", ".join(f"{s} x{n}" for s, n in sorted(c.by_site.items())) or "none"
        line = f"{mode.name}: census {c.total} ({sites})"
        if ctx.cuda:
            line += f"; CUDA sync debug {len(seen)}" + (f" ({', '.join(sorted(set(seen)))})" if seen else "")
        r.lines.append(line)
        if c.total != 0:
            r.fail(f"{mode.name}: {c.total} host syncs per layer step at EP=1 (target 0): {sites}")
        if ctx.cuda and len(seen) > c.total:
            r.fail(f"{mode.name}: CUDA saw {len(seen)} syncs, the census counted {c.total}")
    r.summary = f"EP=1 dropless training step: {totals} host syncs (s2moe k1, s2moe k2, smoe k2; target 0)"


def check_collectives(ctx: Ctx, r: Result) -> None:
    import torch.distributed as dist

    from s2moe_dist.parallel.all_to_all import all_to_all, exchange_counts
    from s2moe_dist.train.metrics import gather_moe_stats
    from s2moe_dist.train.signals import SignalFlags
    backend = dist.get_backend()
    x = torch.randn(10, 16, device=ctx.device, requires_grad=True)
    y = all_to_all(x, [10], [10])
    y.sum().backward()
    if not (torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x)) and y.device == x.device):
        r.fail("all_to_all at one rank is not the identity (forward or backward)")
    counts = torch.arange(4, device=ctx.device)
    if not torch.equal(exchange_counts(counts), counts):
        r.fail("exchange_counts at one rank is not the identity")
    flags = SignalFlags()
    flags.requests = 1
    if flags.agreed(ctx.device if ctx.cuda else None) != (True, False):
        r.fail("SignalFlags.agreed did not report the pending checkpoint request")
    layer = gp.build_layer(gp.Mode("s2moe", 2, True, False, torch.float32)).to(ctx.device)
    layer(torch.randn(gp.T, gp.D, device=ctx.device))
    stats = gather_moe_stats([(0, layer)], ctx.device)
    if not math.isclose(float(stats[0]["expert_fraction"].sum()), 1.0, rel_tol=1e-6):
        r.fail("gather_moe_stats: expert fractions do not sum to 1")
    t = torch.ones(3, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    if not torch.equal(t.cpu(), torch.ones(3, dtype=torch.float64)):
        r.fail("float64 all_reduce at one rank changed the values")
    r.summary = f"all_to_all (+backward), exchange_counts, signal flags, MoE stats, float64 all_reduce on {backend}"


def check_ep(ctx: Ctx, r: Result) -> None:
    from s2moe_dist.testing.local_ranks import run_on_local_ranks
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    modes = [gp.Mode("s2moe", 2, True, False, dtype), gp.Mode("s2moe", 1, True, True, dtype),
             gp.Mode("smoe", 2, False, False, dtype)]
    results = run_on_local_ranks(gp.ep_worker, 2, args=(ctx.device.type, modes), timeout=240)
    for rank, res in enumerate(results):
        for name, v in res.items():
            syncs = v["syncs"]
            extra = "" if syncs is None else f"; host syncs {syncs['total']} " \
                f"({', '.join(f'{s} x{n}' for s, n in sorted(syncs['by_site'].items())) or 'none'})"
            r.lines.append(f"rank {rank} {name}: worst {v['worst']} {v['max_error']:.1e} on {v['device']}{extra}")
            limit = gp.TOL[dtype]
            if not v["max_error"] <= limit:
                r.fail(f"rank {rank} {name}: EP=2 differs from EP=1 ({v['worst']} {v['max_error']:.2e} > {limit:g})")
            if ctx.cuda and not v["device"].startswith("cuda"):
                r.fail(f"rank {rank} {name}: output on {v['device']}")
            if syncs is not None and "dropless" in name and syncs["total"] > 1:
                r.fail(f"rank {rank} {name}: {syncs['total']} host syncs per layer step at EP=2 (target 1)")
    r.summary = f"{len(modes)} modes x 2 ranks match EP=1 ({'gloo on CUDA tensors' if ctx.cuda else 'gloo, CPU'})"


def check_layer_speed(ctx: Ctx, r: Result) -> None:
    import bench_layer as bl
    shape = dict(d=256, h=512, E=16, tokens=8192) if not ctx.dry_run else dict(d=64, h=128, E=8, tokens=256)
    d, h, n_exp, tokens = shape["d"], shape["h"], shape["E"], shape["tokens"]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    torch.manual_seed(0)
    contestants = {"ds_top2": bl.ds_moe(d, h, n_exp, 1, 2, True), "s2moe_top1": bl.s2moe(d, h, n_exp, 1, 1),
                   "s2moe_top2": bl.s2moe(d, h, n_exp, 1, 2), "smoe_top2": bl.s2moe(d, h, n_exp, 1, 2, moe_type="smoe")}
    x = torch.randn(tokens, d, device=ctx.device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=ctx.device, dtype=dtype)
    repeats, warmup = (20, 3) if ctx.cuda else (2, 1)
    times = {}
    r.lines.append(f"shape d={d} h={h} E={n_exp} tokens={tokens}, {str(dtype).replace('torch.', '')}, "
                   f"forward+backward, median of {repeats}")
    for name, module in contestants.items():
        module.to(device=ctx.device, dtype=dtype).train()
        step = bl.train_step(module, x, g)
        times[name] = time_steps(ctx, step, repeats, warmup)
        try:
            busy = busy_fraction(ctx, step, 5)
        except Exception as e:  # noqa: BLE001 - a profiler API change must not hide the timings
            busy = float("nan")
            r.lines.append(f"{name}: GPU-busy fraction unavailable ({type(e).__name__}: {e})")
        r.lines.append(f"{name:11s} {times[name] * 1e3:8.3f} ms  {times[name] / times['ds_top2']:5.2f}x ds_top2  "
                       f"GPU busy {'n/a' if math.isnan(busy) else f'{busy:.0%}'}")
        if not math.isfinite(times[name]) or times[name] <= 0:
            r.fail(f"{name}: no valid step time")
    r.summary = ("S2MoE top-1 {:.2f}x, top-2 {:.2f}x, SMoE top-2 {:.2f}x DeepSpeed top-2".format(
        times["s2moe_top1"] / times["ds_top2"], times["s2moe_top2"] / times["ds_top2"],
        times["smoe_top2"] / times["ds_top2"]))


def _single_process_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(args: List[str], r: Result, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "s2moe_dist.cli"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=_single_process_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-8:]
        r.fail(f"{' '.join(args[:1])} exited {p.returncode}: " + " | ".join(tail))
    return p


TINY = ["model.seq_len=32", "model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.moe.num_experts=4",
        "model.moe.ffn_hidden_size=64", "train.batch_size=8", "train.eval_windows=16", "train.log_every=2",
        "train.eval_every=0", "train.ckpt_every=3", "train.progress=false", "train.warmup_steps=2"]


def check_train_resume_eval(ctx: Ctx, r: Result) -> None:
    if ctx.run_dir:
        os.makedirs(ctx.run_dir, exist_ok=True)
        return _train_resume_eval(ctx, r, ctx.run_dir)
    out = tempfile.mkdtemp(prefix="gpu_check_run_")
    try:
        _train_resume_eval(ctx, r, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _train_resume_eval(ctx: Ctx, r: Result, out: str) -> None:
    common = ["--config", "configs/model/tiny.yaml", "--deepspeed", "configs/deepspeed/zero1_bf16.json",
              "--output", out]
    p = _cli(["train"] + common + ["--set"] + TINY + ["train.steps=6"], r, 150)
    if r.status == "FAIL":
        return
    p = _cli(["train"] + common + ["--resume", "auto", "--set"] + TINY + ["train.steps=9"], r, 150)
    if r.status == "FAIL":
        return
    if "resumed from" not in p.stdout or "at step 6" not in p.stdout:
        r.fail("the second s2moe-train did not resume from step 6: " + p.stdout[-300:])
    with open(os.path.join(out, "final_eval.json")) as f:
        final = json.load(f)
    if final["step"] != 9:
        r.fail(f"final_eval.json step {final['step']}, expected 9")
    p = _cli(["eval", "--checkpoint", out, "--split", "valid", "--max-windows", "16", "--json"], r, 120)
    if r.status == "FAIL":
        return
    ev = json.loads(p.stdout.strip().splitlines()[-1])
    bpc = {int(k): v for k, v in ev["bpc"].items()}
    r.lines.append(f"trained 6 steps, resumed to 9 (bf16, ZeRO-1); s2moe-eval {ev['dtype']}: "
                   + ", ".join(f"BPC k={k} {v:.3f}" for k, v in bpc.items()))
    if ev["dtype"] != "bfloat16":
        r.fail(f"s2moe-eval evaluated a bf16-trained checkpoint in {ev['dtype']}")
    if not all(math.isfinite(v) and 0 < v < 8 for v in bpc.values()):
        r.fail(f"implausible BPC {bpc}")
    train_bpc = {int(k): v for k, v in final["bpc_valid"].items()}
    r.lines.append(f"s2moe-train's own final eval of the same windows: {train_bpc}")
    # the same 16 validation windows in the same dtype: the two must agree
    if any(not math.isclose(bpc[k], train_bpc[k], abs_tol=2e-3) for k in train_bpc if k in bpc):
        r.fail(f"s2moe-eval {bpc} differs from s2moe-train's final eval {train_bpc} of the same windows")
    r.summary = f"train 6 + resume to 9 steps + eval in {ev['dtype']}: BPC " + \
        ", ".join(f"k={k} {v:.3f}" for k, v in bpc.items())


CHECKS = [("build", check_build), ("grouped_mm", check_grouped_mm), ("layer_parity", check_layer_parity),
          ("sync_census", check_sync_census), ("collectives", check_collectives), ("ep2_vs_ep1", check_ep),
          ("layer_speed", check_layer_speed), ("train_resume_eval", check_train_resume_eval)]


# ---- driver --------------------------------------------------------------------------------------
def init_one_rank(ctx: Ctx) -> None:
    """A 1-rank process group (NCCL on the GPU, gloo in --dry-run) with DeepSpeed's comm on it."""
    import deepspeed

    from s2moe_dist.train.distributed import free_port
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    if ctx.cuda:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if ctx.cuda else "gloo", verbose=False)


def write_summary(ctx: Ctx, results: List[Result], total_s: float) -> str:
    os.makedirs(ctx.out, exist_ok=True)
    head = f"gpu_check{' --dry-run (CPU)' if ctx.dry_run else ''}: {total_s:.0f} s"
    md = [f"### {head}", "", "| check | result | seconds | summary |", "|---|---|---|---|"]
    md += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.summary} |" for r in results]
    for r in results:
        md += ["", f"#### {r.name}", "", "```"] + r.lines + ["```"]
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(ctx.out, "summary.json"), "w") as f:
        json.dump({"dry_run": ctx.dry_run, "device": str(ctx.device), "seconds": total_s,
                   "checks": [vars(r) for r in results]}, f, indent=2)
    return os.path.join(ctx.out, "summary.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true",
                   help="run every check on CPU with small shapes (CI; no GPU needed)")
    p.add_argument("--out", default=None, help="folder for summary.md / summary.json (default $OUT or gpu_check_out)")
    p.add_argument("--run-dir", default="", help="keep train_resume_eval's run folder there (default: a "
                                                  "temporary folder, so that --out holds only the summary)")
    p.add_argument("--only", nargs="+", choices=[n for n, _ in CHECKS], default=None, help="run only these checks")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="time budget: checks not started by then are reported FAIL (default 420 s)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: error: no CUDA device visible to torch {torch.__version__} (CUDA build "
              f"{torch.version.cuda or 'none: a CPU build'}); run it on a GPU machine with a CUDA torch "
              "(launch_scripts/setup_env.sh), or pass --dry-run", file=sys.stderr)
        return 2
    ctx = Ctx(torch.device("cpu") if args.dry_run else torch.device("cuda", 0), args.dry_run, out,
              os.path.abspath(args.run_dir) if args.run_dir else "")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if not args.dry_run else 1)
    start = time.perf_counter()
    init_one_rank(ctx)
    results = []
    for name, fn in CHECKS:
        if args.only and name not in args.only:
            continue
        r = Result(name)
        t0 = time.perf_counter()
        if t0 - start > args.budget_s:
            r.fail(f"not run: the time budget of {args.budget_s:.0f} s was spent")
        else:
            try:
                fn(ctx, r)
            except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                r.fail(f"{type(e).__name__}: {e}")
                r.lines.extend(traceback.format_exc().rstrip().splitlines()[-12:])
        r.seconds = time.perf_counter() - t0
        results.append(r)
        print(f"[gpu_check] {r.status} {name} ({r.seconds:.0f} s): {r.summary}", flush=True)
        for line in r.lines:
            print(f"[gpu_check]     {line}", flush=True)
    total = time.perf_counter() - start
    path = write_summary(ctx, results, total)
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"[gpu_check] {'FAIL' if failed else 'PASS'}: {len(results) - len(failed)}/{len(results)} checks passed "
          f"or skipped in {total:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; summary {path}", flush=True)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
