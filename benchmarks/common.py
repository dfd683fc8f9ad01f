"""Shared helpers of the benchmarks: process launch, interleaved timing, medians, peak memory,
collective counting and the results table / RESULTS.md sections.

Timing rule: every contestant gets its warm-up first, then the repeats are interleaved
(contestant order rotated each round), so a load change on a shared machine hits all of them
alike; the figure reported is the median. Under several ranks each timed step starts after a
barrier and counts as the slowest rank's time.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist

from s2moe_dist.testing.local_ranks import run_on_local_ranks
from s2moe_dist.train.distributed import free_port  # noqa: F401 (quality.py)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


# ---- processes --------------------------------------------------------------------------------
def spawn(fn, world: int, args: tuple = (), threads: int = 1, timeout: float = 3600.0) -> List:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (spawned, free port, DeepSpeed's comm
    initialised: its MoE needs it); per-rank results."""
    return run_on_local_ranks(fn, world, args, timeout=timeout, use_deepspeed=True, threads=threads)


# ---- collectives --------------------------------------------------------------------------------
class CollectiveCounter:
    """Counts calls and payload bytes of torch.distributed collectives while installed.

    Wraps the ``torch.distributed`` functions themselves, which DeepSpeed's ``deepspeed.comm`` and
    our ``s2moe_dist.parallel`` both call at call time. Bytes: the input tensor of each call
    (what this rank hands to the collective, its own chunk included)."""

    NAMES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor")

    def __init__(self):
        self.calls: Dict[str, int] = defaultdict(int)
        self.bytes: Dict[str, int] = defaultdict(int)
        self._orig = {}

    def install(self) -> "CollectiveCounter":
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _name=name, _orig=orig, **kwargs):
                self.calls[_name] += 1
                self.bytes[_name] += _payload(_name, args, kwargs)
                return _orig(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def snapshot(self) -> Dict[str, Dict[str, int]]:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _payload(name, args, kwargs) -> int:
    if name == "all_to_all_single":
        return _nbytes(kwargs.get("input", args[1] if len(args) > 1 else None))
    if name == "all_to_all":
        return _nbytes(kwargs.get("input_tensor_list", args[1] if len(args) > 1 else None))
    if name in ("all_gather", "all_gather_into_tensor"):
        return _nbytes(kwargs.get("tensor", kwargs.get("input_tensor", args[1] if len(args) > 1 else None)))
    return _nbytes(kwargs.get("tensor", args[0] if args else None))


# ---- timing ---------------------------------------------------------------------------------------
def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def across_ranks(seconds: float, op) -> float:
    """Combine one float over ranks (collective: every rank calls it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t)


def time_once(step: Callable[[], None]):
    """(wall seconds of the slowest rank, CPU seconds of this process averaged over ranks).

    CPU time (``time.process_time``: user + sys of all threads) leaves out time spent waiting for
    a core, so it is the steadier figure on an oversubscribed machine; wall time is the real one."""
    barrier()
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return across_ranks(wall, dist.ReduceOp.MAX), across_ranks(cpu, dist.ReduceOp.SUM) / world


def interleaved(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1):
    """Per contestant, ``repeats`` timings, taken round-robin with a rotating order after
    ``warmup`` untimed steps each; same order on every rank. Returns ``{"wall": {name: [s]},
    "cpu": {name: [s]}}`` (see ``time_once``)."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    barrier()
    out: Dict[str, Dict[str, List[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            wall, cpu = time_once(steps[name])
            out["wall"][name].append(wall)
            out["cpu"][name].append(cpu)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """Interquartile range over the median (relative noise of a figure)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


# ---- memory ----------------------------------------------------------------------------------------
def peak_memory_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes allocated by torch on CPU during ONE call of ``step``, above what was live
    when it started (activations, saved tensors, temporaries, gradients made inside), from the
    torch profiler's allocation events: the running sum of +alloc / -free, in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def profile_table(step: Callable[[], None], rows: int = 20, sort_by: str = "self_cpu_time_total") -> str:
    """torch.profiler CPU breakdown of one call of ``step``: the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


# ---- reporting --------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        if names:
            cpu = names[0].strip()
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


def git_revision() -> str:
    """Short commit of the code measured, ``+dirty`` when the tracked code the benchmarks import
    differs from it."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        paths = ["s2moe_dist/moe", "s2moe_dist/parallel", "s2moe_dist/integrations", "s2moe_dist/config.py",
                 "benchmarks/*.py"]  # what the benchmarks import
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", *paths],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, path: str = RESULTS) -> None:
    """Replace the ``## title`` section of ``path`` (up to the next ``## ``), or append it."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
