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

The trainer calls every hook through one ``FaultInjector``; with the variable unset each hook returns
at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

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


def router_biases(faults: List[Fault]) -> List[Tuple[int, int, float, Optional[int]]]:
    """(block, expert, value, ramp steps) from ``router_bias=L/E/V[/RAMP],...``."""
    out = []
    for f in faults:
        if f.kind == "router_bias" and f.arg:
            for part in f.arg.split(","):
                bits = part.split("/")
                out.append((int(bits[0]), int(bits[1]), float(bits[2]), int(bits[3]) if len(bits) > 3 else None))
    return out


def _say(msg: str) -> None:
    print(f"[s2moe-train] FAULT INJECTED (t={time.time():.3f}): {msg}", flush=True)


class FaultInjector:
    """The trainer's one seam for injected faults: every hook below is called by the trainer, and
    nothing else in the package injects faults. Built once per process from ``S2MOE_FAULTS``
    (``from_env``); with the variable unset every hook returns at once."""

    def __init__(self, faults: List[Fault], rank: int):
        self.faults, self.rank = faults, rank

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjector":
        return cls(parse(os.environ.get(ENV, "")), rank)

    def find(self, kind: str, step: Optional[int]) -> Optional[Fault]:
        for f in self.faults:
            if f.kind == kind and (f.step is None or f.step == step) and (f.rank is None or f.rank == self.rank):
                return f
        return None

    # ---- start-up ----------------------------------------------------------------------------
    def at_start(self) -> None:
        """Right after the process group is up."""
        if self.faults and self.find("sigterm_at_start", None):
            _say(f"rank {self.rank} sends itself SIGTERM during start-up")
            os.kill(os.getpid(), signal.SIGTERM)

    def install_router_bias(self, moe_layers, step_of: Callable[[], int]) -> None:
        """Shift router logits of the chosen experts (``step_of()``: the step being trained)."""
        import torch

        biases = router_biases(self.faults)
        for block, layer in moe_layers:
            mine = [(e, v, ramp) for b, e, v, ramp in biases if b == block]
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

    # ---- the step ----------------------------------------------------------------------------
    def before_step(self, step: int, model) -> None:
        """Faults that act before step ``step``'s forward."""
        if not self.faults:
            return
        import torch

        if self.find("hang_in_step", step):
            _say(f"rank {self.rank} hangs in step {step}")
            while True:
                time.sleep(3600)
        f = self.find("nan_param", step)
        if f:
            with torch.no_grad():
                dict(model.named_parameters())[f.arg].view(-1)[0] = float("nan")
            _say(f"rank {self.rank}: parameter {f.arg} poisoned (NaN) before step {step}")

    def after_forward(self, step: int, loss, model):
        """The loss to back-propagate (NaN for ``nan_loss``, + an inf-gradient term for ``inf_grad``);
        SIGKILL for ``kill_in_step``."""
        if not self.faults:
            return loss
        if self.find("kill_in_step", step):
            _say(f"rank {self.rank} SIGKILLs itself in step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.find("nan_loss", step):
            _say(f"rank {self.rank}: loss of step {step} is NaN")
            return loss * float("nan")
        f = self.find("inf_grad", step)
        if f:
            _say(f"rank {self.rank}: gradient of {f.arg} gets +inf in step {step} (the loss stays finite)")
            return loss + _inf_grad(dict(model.named_parameters())[f.arg])
        return loss

    # ---- checkpoint writes -------------------------------------------------------------------
    @contextlib.contextmanager
    def checkpoint_writes(self, engine, step: int) -> Iterator[None]:
        """Around a checkpoint save: the engine's file writer (``engine.checkpoint_engine.save``,
        called by ``save_checkpoint`` only) is wrapped for the faults of this step and rank."""
        kill = self.find("kill_in_save", step) if self.faults else None
        enospc = self.find("enospc_in_save", step) if self.faults else None
        if not (kill or enospc):
            yield
            return
        writer = engine.checkpoint_engine
        plain = writer.save

        def save(state_dict, path):
            if enospc:
                import torch
                _say(f"rank {self.rank}: checkpoint file {os.path.basename(path)} written to /dev/full")
                torch.save(state_dict, "/dev/full")  # write fails with ENOSPC, as on a full disk
                return
            plain(state_dict, path)
            _say(f"rank {self.rank} SIGKILLs itself in save_checkpoint after writing {os.path.basename(path)}")
            os.kill(os.getpid(), signal.SIGKILL)

        writer.save = save
        try:
            yield
        finally:
            writer.__dict__.pop("save", None)  # back to the class's method


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
