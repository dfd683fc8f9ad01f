"""Fault injection for the reliability tests: TEST USE ONLY, off unless ``S2MOE_FAULTS`` is set.

``S2MOE_FAULTS`` holds ``;``-separated faults, each ``KIND@STEP[:RANK][=ARG]`` (RANK: every rank
when left out; STEP: the optimizer step being trained, 1-based, as logged):

    kill_in_save@S:R     SIGKILL this rank inside save_checkpoint of step S, after its first file
    enospc_in_save@S:R   this rank's checkpoint files of step S go to /dev/full: the kernel's ENOSPC,
                         which torch.save(path) reports as on a full disk (RuntimeError "unexpected pos")
    kill_in_step@S:R     SIGKILL this rank in step S, between its forward and its backward
    hang_in_step@S:R     this rank sleeps (alive, silent) in step S before its forward
    nan_loss@S:R         the loss of step S is NaN on this rank (transient)
    inf_grad@S:R=NAME    one value of parameter NAME's gradient is +inf in step S, loss finite (transient)
    nan_param@S:R=NAME   one value of parameter NAME becomes NaN before step S (persistent)
    sigterm_at_start:R   SIGTERM to itself right after the process group is up (start-up)
    router_bias=L/E/V[/RAMP]   add V to expert E's router logit in MoE block L (every step; with
                         RAMP: V * min(1, step / RAMP)); V may be -inf. Several: comma-separated.

Each hook is one dictionary lookup when the variable is unset.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

ENV = "S2MOE_FAULTS"


@dataclass
class Fault:
    kind: str
    step: Optional[int]
    rank: Optional[int]
    arg: Optional[str]


def parse(spec: str) -> List[Fault]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        head, _, arg = item.partition("=")
        kind, _, where = head.partition("@")
        step = rank = None
        if ":" in (where or kind):
            if where:
                where, _, r = where.partition(":")
            else:
                kind, _, r = kind.partition(":")
            rank = int(r)
        if where:
            step = int(where)
        out.append(Fault(kind.strip(), step, rank, arg or None))
    return out


_FAULTS: List[Fault] = parse(os.environ.get(ENV, ""))


def active() -> bool:
    return bool(_FAULTS)


def find(kind: str, step: Optional[int], rank: int) -> Optional[Fault]:
    for f in _FAULTS:
        if f.kind == kind and (f.step is None or f.step == step) and (f.rank is None or f.rank == rank):
            return f
    return None


def _say(msg: str) -> None:
    print(f"[s2moe-train] FAULT INJECTED (t={time.time():.3f}): {msg}", flush=True)


# ---- start-up --------------------------------------------------------------------------------
def at_start(rank: int) -> None:
    if find("sigterm_at_start", None, rank):
        _say(f"rank {rank} sends itself SIGTERM during start-up")
        os.kill(os.getpid(), signal.SIGTERM)


def router_biases() -> List[Tuple[int, int, float, Optional[int]]]:
    """(block, expert, value, ramp steps) from ``router_bias=L/E/V[/RAMP],...``."""
    out = []
    for f in _FAULTS:
        if f.kind == "router_bias" and f.arg:
            for part in f.arg.split(","):
                bits = part.split("/")
                out.append((int(bits[0]), int(bits[1]), float(bits[2]), int(bits[3]) if len(bits) > 3 else None))
    return out


def install_router_bias(moe_layers, step_of) -> None:
    """Shift router logits of the chosen experts (``step_of()``: the step being trained)."""
    import torch

    for block, layer in moe_layers:
        mine = [(e, v, ramp) for b, e, v, ramp in router_biases() if b == block]
        if not mine:
            continue
        router = layer.router
        plain = router.logits

        def logits(x, plain=plain, mine=mine):
            out = plain(x)
            bias = torch.zeros(out.shape[-1], dtype=out.dtype, device=out.device)
            for e, v, ramp in mine:
                bias[e] = v * (min(1.0, step_of() / ramp) if ramp else 1.0)
            return out + bias

        router.logits = logits
        _say(f"router bias on block {block}: " + ", ".join(f"expert {e} {v:+g}" + (f" ramped over {r} steps"
                                                                                   if r else "")
                                                            for e, v, r in mine))


# ---- the step --------------------------------------------------------------------------------
def before_step(step: int, rank: int, model) -> List:
    """Faults that act before step ``step``'s forward. Returns hook handles to remove after it."""
    import torch

    handles = []
    if find("hang_in_step", step, rank):
        _say(f"rank {rank} hangs in step {step}")
        while True:
            time.sleep(3600)
    f = find("nan_param", step, rank)
    if f:
        with torch.no_grad():
            dict(model.named_parameters())[f.arg].view(-1)[0] = float("nan")
        _say(f"rank {rank}: parameter {f.arg} poisoned (NaN) before step {step}")
    return handles


def _inf_grad(param):
    """A term that is 0 in the loss and puts +inf into one value of ``param``'s gradient."""
    import torch

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p):
            return p.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            g = torch.zeros_like(param)
            g.view(-1)[0] = float("inf")
            return g

    return InfGrad.apply(param)


def after_forward(step: int, rank: int, loss, model=None):
    """The loss to back-propagate (NaN for ``nan_loss``, + an inf-gradient term for ``inf_grad``);
    SIGKILL for ``kill_in_step``."""
    if find("kill_in_step", step, rank):
        _say(f"rank {rank} SIGKILLs itself in step {step}")
        os.kill(os.getpid(), signal.SIGKILL)
    if find("nan_loss", step, rank):
        _say(f"rank {rank}: loss of step {step} is NaN")
        return loss * float("nan")
    f = find("inf_grad", step, rank)
    if f and model is not None:
        _say(f"rank {rank}: gradient of {f.arg} gets +inf in step {step} (the loss stays finite)")
        return loss + _inf_grad(dict(model.named_parameters())[f.arg])
    return loss


# ---- checkpoint writes -----------------------------------------------------------------------
class CheckpointWriteFaults:
    """Context around ``engine.save_checkpoint``: wraps the engine's file writer for the faults of
    this step and rank, restores it after."""

    def __init__(self, engine, step: int, rank: int):
        self.engine, self.step, self.rank = engine, step, rank
        self.kill = find("kill_in_save", step, rank)
        self.enospc = find("enospc_in_save", step, rank)

    def __enter__(self):
        if not (self.kill or self.enospc):
            return self
        ce = self.engine.checkpoint_engine
        plain = ce.save

        def save(state_dict, path):
            if self.enospc:
                import torch
                _say(f"rank {self.rank}: checkpoint file {os.path.basename(path)} written to /dev/full")
                torch.save(state_dict, "/dev/full")  # write fails with ENOSPC, as on a full disk
                return
            plain(state_dict, path)
            _say(f"rank {self.rank} SIGKILLs itself in save_checkpoint after writing {os.path.basename(path)}")
            os.kill(os.getpid(), signal.SIGKILL)

        ce.save = save
        self._restore = lambda: ce.__dict__.pop("save", None)
        return self

    def __exit__(self, *exc):
        restore = getattr(self, "_restore", None)
        if restore:
            restore()
        return False
