"""SIGTERM / SIGUSR1: the handler only sets a flag; the loop acts at the next step boundary.

SIGUSR1 (Slurm's preemption warning, ``#SBATCH --signal=USR1@N``): checkpoint, keep training.
SIGTERM (preemption, ``scancel``): checkpoint, then exit 0. The flags are OR-ed over ranks
(one tiny all-reduce per step), so a signal that reached one rank is acted on by all.
"""
from __future__ import annotations

import signal
from typing import Tuple


class SignalFlags:
    def __init__(self):
        self.checkpoint = False
        self.exit = False
        self._previous = {}

    def install(self) -> "SignalFlags":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.checkpoint = True
        if signum == signal.SIGTERM:
            self.exit = True

    def agreed(self, device=None) -> Tuple[bool, bool]:
        """(checkpoint, exit) OR-ed over all ranks (collective), and clears the local flags."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(self.checkpoint), float(self.exit)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.checkpoint = False
        return bool(t[0]), bool(t[1])
