"""s2moe-train ranks as plain processes with the variables a launcher sets (torchrun's RANK/...,
or srun's SLURM_PROCID/...), so tests can signal and kill each rank like Slurm does; their
metrics.jsonl read back. The default run is 2 CPU ranks, ZeRO-2, expert parallel 2, 24 steps.

    ranks = Ranks(tmp_path / "run"); assert ranks.wait() == [0, 0]; losses(tmp_path / "run")
"""
import json
import os
import subprocess
import sys
import time

from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
ZERO2 = os.path.join(ROOT, "configs", "deepspeed", "zero2_fp32.json")
STEPS = 24
SETTINGS = [f"train.steps={STEPS}", "model.seq_len=64", "model.d_model=64", "model.moe.ffn_hidden_size=128",
            "model.moe.ep_size=2", "train.batch_size=8", "train.warmup_steps=4", "train.log_every=1",
            "train.eval_every=12", "train.eval_windows=8", "train.ckpt_every=4", "train.progress=false"]
TIMEOUT = 240


def _env(rank, world, port, style):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    if style == "slurm":  # what srun gives each task (MASTER_PORT set: no job-id port in tests)
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                   SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID="1")
    else:  # torchrun / deepspeed launcher
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return env


class Ranks:
    def __init__(self, out, extra=(), resume=False, world=2, style="env", steps=None, name="run", base=None):
        port = free_port()
        base = base or ["--config", TINY, "--deepspeed", ZERO2, "--set", *SETTINGS]
        args = [sys.executable, "-m", "s2moe_dist.cli", "train", "--output", str(out), *base, *extra]
        if steps is not None:
            args += [f"train.steps={steps}"]
        if resume:
            args += ["--resume", "auto"]
        self.logs = [open(os.path.join(os.path.dirname(str(out)), f"{name}.rank{r}.log"), "w+") for r in range(world)]
        self.procs = [subprocess.Popen(args, env=_env(r, world, port, style), cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT) for r, log in enumerate(self.logs)]

    def wait(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in self.procs]
        finally:
            self.kill()

    def signal(self, sig):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, rank=0):
        self.logs[rank].flush()
        with open(self.logs[rank].name) as f:
            return f.read()


def metrics(out):
    path = os.path.join(str(out), "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
    return rows


def losses(out):
    """step -> (total, task, balance, uncertainty); a re-run step keeps its last value."""
    return {r["step"]: (r["train/loss_total"], r["train/loss_task"], r["train/loss_balance"],
                        r["train/loss_uncertainty"]) for r in metrics(out) if "train/loss_total" in r}


def wait_for(cond, ranks, timeout=TIMEOUT, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        if any(p.poll() is not None for p in ranks.procs):
            raise AssertionError(f"a rank exited while waiting for {what}:\n{ranks.output()[-3000:]}")
        if time.monotonic() > deadline:
            ranks.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
