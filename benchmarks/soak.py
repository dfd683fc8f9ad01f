"""Soak: 2 CPU ranks of s2moe-train for many steps, checkpoints every N steps, one SIGTERM +
``--resume auto`` in the middle; each rank's resident memory (VmRSS, read from /proc) sampled
every ``--rss-every`` steps and a straight line fitted per rank and process (the resumed run is
a new process). Flat: the fitted growth over the process's steps stays within noise.

    python benchmarks/soak.py                       # 2000 steps of the micro model (below)
    python benchmarks/soak.py --write-results       # and the "## Soak" section of RESULTS.md

Model: ``configs/model/tiny.yaml`` made smaller for CPU speed (the "micro" settings: d_model 32,
2 heads, seq 32, expert hidden 64, 8 experts, top-2, EP=2, batch 8), ZeRO-1 as in the quickstart.
The ranks are started as plain processes with the variables torchrun sets, so each can be
signalled like srun / torchrun forward a SIGTERM. ``tests/test_reliability.py`` runs a 50-step
version of it (``run_soak``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1_fp32.json")
MICRO = ["model.seq_len=32", "model.d_model=32", "model.n_heads=2", "model.moe.ffn_hidden_size=64",
         "model.moe.ep_size=2", "train.batch_size=8", "train.warmup_steps=4", "train.eval_windows=8",
         "train.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, faults: Optional[str] = None) -> Dict[str, str]:
    """What torchrun gives each rank (no Slurm/MPI variables leaking in from outside)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "S2MOE_FAULTS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    if faults:
        env["S2MOE_FAULTS"] = faults
    return env


class Ranks:
    """The ranks of one ``s2moe-train`` launch, each a plain process logging to NAME.rankR.log."""

    def __init__(self, out: str, settings: Sequence[str], resume: bool = False, world: int = 2,
                 name: str = "run", faults: Optional[str] = None, config: str = TINY, deepspeed: str = ZERO1):
        self.port = free_port()
        args = [sys.executable, "-m", "s2moe_dist.cli", "train", "--config", config, "--deepspeed", deepspeed,
                "--output", str(out), "--set", *settings] + (["--resume", "auto"] if resume else [])
        folder = os.path.dirname(os.path.abspath(str(out)))
        self.logs = [open(os.path.join(folder, f"{name}.rank{r}.log"), "w+") for r in range(world)]
        self.procs = [subprocess.Popen(args, env=rank_env(r, world, self.port, faults), cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT) for r, log in enumerate(self.logs)]
        self.started = time.monotonic()

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def codes(self) -> List[Optional[int]]:
        return [p.poll() for p in self.procs]

    def wait(self, timeout: float) -> List[Optional[int]]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
        return self.codes()

    def signal(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, rank: int = 0) -> str:
        self.logs[rank].flush()
        with open(self.logs[rank].name) as f:
            return f.read()


def rss_mib(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MetricsTail:
    """The highest step logged in ``metrics.jsonl`` so far, read incrementally."""

    def __init__(self, out: str):
        self.path = os.path.join(str(out), "metrics.jsonl")
        self.pos = 0
        self.step = 0

    def poll(self) -> int:
        if os.path.exists(self.path):
            with open(self.path) as f:
                f.seek(self.pos)
                for line in f:
                    if not line.endswith("\n"):
                        break
                    self.pos += len(line.encode())
                    row = json.loads(line)
                    if "train/loss_total" in row:
                        self.step = max(self.step, row["step"])
        return self.step


def fit_slope(points: Sequence[Sequence[float]]) -> float:
    """Least-squares slope of (x, y) points (0 with fewer than 2)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0


def run_soak(out: str, steps: int, ckpt_every: int, sigterm_at: int, rss_every: int,
             settings: Sequence[str] = MICRO, world: int = 2, warmup_samples: int = 2,
             timeout: float = 3600.0, log_every: Optional[int] = None, log=print) -> Dict:
    """Train ``steps`` steps in two processes per rank (SIGTERM once ``sigterm_at`` is logged, then
    ``--resume auto``), sampling RSS every ``rss_every`` logged steps. Returns codes, the SIGTERM /
    resume steps, samples ``(segment, step, rank, MiB)`` and per (segment, rank) the fitted growth
    (MiB per 1000 steps, the first ``warmup_samples`` of a process left out) and min / max."""
    base = list(settings) + [f"train.steps={steps}", f"train.ckpt_every={ckpt_every}",
                             f"train.log_every={log_every or min(10, rss_every)}", "train.eval_every=0"]
    t0 = time.monotonic()
    samples: List[tuple] = []
    result: Dict = {"codes": [], "steps": steps, "world": world}
    tail = MetricsTail(out)
    for segment in (0, 1):
        ranks = Ranks(out, base, resume=segment == 1, world=world, name=f"soak{segment}")
        next_sample = (tail.step // rss_every + 1) * rss_every
        signalled = False
        deadline = time.monotonic() + timeout
        while ranks.running():
            step = tail.poll()
            if step >= next_sample:
                for r, p in enumerate(ranks.procs):
                    mib = rss_mib(p.pid)
                    if mib is not None:
                        samples.append((segment, step, r, mib))
                next_sample = (step // rss_every + 1) * rss_every
            if segment == 0 and not signalled and step >= sigterm_at:
                ranks.signal(signal.SIGTERM)
                signalled = True
                log(f"[soak] SIGTERM at logged step {step}")
            if time.monotonic() > deadline:
                ranks.kill()
                raise TimeoutError(f"soak segment {segment} did not finish in {timeout:.0f}s")
            time.sleep(0.05)
        codes = ranks.wait(60)
        result["codes"].append(codes)
        text = ranks.output()
        if segment == 0:
            result["sigterm_checkpoint"] = _after(text, "SIGTERM: checkpointed at step ")
        else:
            result["resumed_at"] = _after(text, " at step ")
        result[f"log{segment}"] = text[-4000:]
        if codes != [0] * world:
            break
        log(f"[soak] segment {segment} done: codes {codes}, {time.monotonic() - t0:.0f}s")
    result["final_step"] = tail.poll()
    result["wall_s"] = time.monotonic() - t0
    result["samples"] = samples
    fits = {}
    for segment in (0, 1):
        for r in range(world):
            pts = [(s, m) for seg, s, rk, m in samples if seg == segment and rk == r]
            used = pts[warmup_samples:]
            if not pts:
                continue
            fits[f"{segment}/{r}"] = {"samples": len(pts), "first_step": pts[0][0], "last_step": pts[-1][0],
                                      "mib_per_1000_steps": 1000 * fit_slope(used),
                                      "min_mib": min(m for _, m in used or pts),
                                      "max_mib": max(m for _, m in used or pts),
                                      "first_mib": pts[0][1]}
    result["fits"] = fits
    return result


def _after(text: str, marker: str) -> Optional[int]:
    i = text.rfind(marker)
    if i < 0:
        return None
    digits = ""
    for ch in text[i + len(marker):]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def report(res: Dict, args) -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import command_line, git_revision, machine, markdown_table, now

    rows = []
    for key, f in sorted(res["fits"].items()):
        segment, rank = key.split("/")
        span = f["last_step"] - f["first_step"]
        rows.append([("first" if segment == "0" else "resumed") + " process", rank,
                     f"{f['first_step']}-{f['last_step']}", f["samples"], round(f["first_mib"], 1),
                     f"{f['min_mib']:.1f} / {f['max_mib']:.1f}", round(f["mib_per_1000_steps"], 2),
                     round(f["mib_per_1000_steps"] * span / 1000, 2)])
    growth = [abs(f["mib_per_1000_steps"]) * (f["last_step"] - f["first_step"]) / 1000 for f in res["fits"].values()]
    spread = [f["max_mib"] - f["min_mib"] for f in res["fits"].values()]
    level = min(f["min_mib"] for f in res["fits"].values())
    flat = all(g <= max(s, 0.02 * level) for g, s in zip(growth, spread))
    verdict = (f"- verdict: {'flat' if flat else 'GROWING'}: the largest fitted change over a process's sampled steps "
               f"is {max(growth):.1f} MiB ({100 * max(growth) / level:.1f} % of {level:.0f} MiB), "
               f"{'within' if flat else 'beyond'} the spread of the samples themselves (up to {max(spread):.1f} MiB)")
    table = markdown_table(["process", "rank", "steps sampled", "samples", "first MiB", "min / max MiB "
                            f"(after {args.warmup_samples} warm-up samples)", "fitted MiB / 1000 steps",
                            "fitted growth over the steps, MiB"], rows)
    return "\n".join([
        f"- machine: {machine()}",
        f"- date: {now()}; commit {git_revision()}; command: `{command_line()}`",
        f"- load average: before {res['load_before']}, after {res['load_after']}",
        f"- run: {res['world']} CPU ranks (plain processes with torchrun's variables, gloo), {res['steps']} steps of "
        "the micro model (configs/model/tiny.yaml with d_model 32, 2 heads, seq 32, expert hidden 64, 8 experts, "
        f"top-2, EP=2, batch 8; ZeRO-1 fp32), checkpoint every {args.ckpt_every} steps, SIGTERM to both ranks "
        f"once step {args.sigterm_at} was logged, then `--resume auto`",
        f"- result: exit codes {res['codes']}; SIGTERM checkpoint at step {res.get('sigterm_checkpoint')}, resumed "
        f"at step {res.get('resumed_at')}, last step {res['final_step']}; wall {res['wall_s']:.0f} s",
        f"- RSS (VmRSS from /proc) every {args.rss_every} steps, a least-squares line per rank and process",
        verdict, "", table])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--sigterm-at", type=int, default=1000)
    p.add_argument("--rss-every", type=int, default=100)
    p.add_argument("--warmup-samples", type=int, default=2)
    p.add_argument("--out", default=None, help="run folder (default: a new temporary folder)")
    p.add_argument("--write-results", action="store_true", help='write the "## Soak" section of RESULTS.md')
    args = p.parse_args(argv)
    import tempfile
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="s2moe-soak-"), "run")
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    res = run_soak(out, args.steps, args.ckpt_every, args.sigterm_at, args.rss_every,
                   warmup_samples=args.warmup_samples)
    res["load_before"] = load_before + " (1/5/15 min)"
    res["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    body = report(res, args)
    print(body)
    with open(os.path.join(os.path.dirname(out), "soak.json"), "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("log")}, f, indent=1)
    if args.write_results:
        from common import write_section
        write_section("Soak", body)
    ok = all(c == [0] * res["world"] for c in res["codes"]) and res["final_step"] == args.steps
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
