"""SIGTERM / SIGUSR1: the handler only records the signal; the loop acts at the next step boundary.

SIGUSR1 (Slurm's preemption warning, ``#SBATCH --signal=USR1@N``): checkpoint, keep training.
SIGTERM (preemption, ``scancel``): checkpoint, then exit 0. The flags are OR-ed over ranks
(one tiny all-reduce per step), so a signal that reached one rank is acted on by all.
"""
from __future__ import annotations

import signal
from typing import Tuple


class SignalFlags:
    """The handler only counts; ``agreed`` compares with what it acted on. (Clearing a boolean
    after the all-reduce lost every signal that arrived while a rank waited in it.)"""

    def __init__(self):
        self.requests = 0  # SIGTERM / SIGUSR1 received (only the handler writes it)
        self.acted = 0  # requests already turned into a checkpoint decision
        self.exit = False
        self._previous = {}

    @property
    def checkpoint(self) -> bool:
        return self.requests > self.acted

    def install(self) -> "SignalFlags":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requests += 1
        if signum == signal.SIGTERM:
            self.exit = True

    def agreed(self, device=None) -> Tuple[bool, bool]:
        """(checkpoint, exit) OR-ed over all ranks (collective); the checkpoint requests seen are
        marked handled."""
        import torch
        import torch.distributed as dist

        seen = self.requests
        t = torch.tensor([float(seen > self.acted), float(self.exit)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.acted = seen  # a signal that arrived during the all-reduce counts at the next step
        return bool(t[0]), bool(t[1])
