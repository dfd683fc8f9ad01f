"""SIGTERM / SIGUSR1: the handler only records the signal; the loop acts at the next step boundary.

SIGUSR1 (Slurm's preemption warning, ``#SBATCH --signal=USR1@N``): checkpoint, keep training.
SIGTERM (preemption, ``scancel``): checkpoint, then exit 0. The flags are OR-ed over ranks (in
the training step's one flags all-reduce), so a signal that reached one rank is acted on by all.
"""
from __future__ import annotations

import signal
from typing import NamedTuple, Sequence, Tuple


class AgreedSignals(NamedTuple):
    """The signal flags OR-ed over ranks: ``checkpoint`` (SIGUSR1 or SIGTERM seen by some rank
    since the last decision), ``exit`` (SIGTERM seen by some rank)."""
    checkpoint: bool
    exit: bool


class SignalFlags:
    """The handler only counts; ``agreed`` compares with what it acted on. (Clearing a boolean
    after the all-reduce lost every signal that arrived while a rank waited in it.)"""

    def __init__(self):
        self.requests = 0  # SIGTERM / SIGUSR1 received (only the handler writes it)
        self.acted = 0  # requests already turned into a checkpoint decision
        self.exit = False
        self.leaving = False  # the ranks agreed to exit after a SIGTERM (on any of them)
        self._previous = {}

    @property
    def checkpoint(self) -> bool:
        return self.requests > self.acted

    def install(self) -> "SignalFlags":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers; after a SIGTERM (here or on another rank), SIGTERM and
        SIGUSR1 stay ignored: a signal sent to every node reaches them at different times, and a late
        copy killed a rank (-15) that was leaving after the checkpoint all ranks had agreed on; a
        Slurm USR1 warning arriving then killed it the same way ("User defined signal 1")."""
        leaving = self.exit or self.leaving
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if leaving else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requests += 1
        if signum == signal.SIGTERM:
            self.exit = True

    def local(self) -> Tuple[int, Tuple[float, float]]:
        """(requests seen, this rank's [checkpoint, exit] flags): to be summed over ranks by the
        caller's own all-reduce (the trainer merges them into the step's one flags all-reduce)."""
        seen = self.requests
        return seen, (float(seen > self.acted), float(self.exit))

    def settle(self, seen: int, summed: Sequence[float]) -> AgreedSignals:
        """(checkpoint, exit) from the flags summed over ranks; the requests seen are marked handled
        (a signal that arrived during the all-reduce counts at the next step)."""
        self.leaving = self.leaving or summed[1] > 0  # another rank's SIGTERM: this one's may come late
        self.acted = seen
        return AgreedSignals(summed[0] > 0, summed[1] > 0)

    def agreed(self, device=None) -> AgreedSignals:
        """(checkpoint, exit) OR-ed over all ranks (collective, its own all-reduce); the checkpoint
        requests seen are marked handled."""
        import torch
        import torch.distributed as dist

        seen, flags = self.local()
        t = torch.tensor(flags, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return self.settle(seen, t.tolist())
