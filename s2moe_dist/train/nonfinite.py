"""NaN/Inf guard: a step whose loss or gradients are not finite on ANY rank is skipped on EVERY rank.

Each rank flags its own micro-batch losses and its own gradients as backward produces them
(before any reduction, whatever the ZeRO stage: ZeRO 1/2 move gradients into flat partitions
after the hooks ran). A tensor hook per parameter only queues the gradient; the queue is checked
in buckets by one fused ``torch._foreach_norm`` (a non-finite value makes its tensor's norm
non-finite, the criterion of DeepSpeed's own overflow check) instead of ~3 kernels per parameter.
Before the optimizer step one all-reduce of ``[loss bad, grad bad]`` per rank (plus the caller's
flags, e.g. the signal flags: one all-reduce per step for all of them) decides for all ranks, and
one copy to the host reads it: the one host sync per step the guard needs. A skipped step calls
``engine.step()`` as usual (DeepSpeed's counters, gradient buffers and zeroing stay in step) with
the torch optimizer's ``step`` replaced by a no-op: no parameter, moment or step-count changes.

After ``limit`` skipped steps in a row the run stops with ``NonFiniteError`` naming the step and,
per rank, the first parameter holding NaN/Inf (a poisoned weight), else the first parameter
whose gradient did (in ``named_parameters`` order), with its block and (for expert tensors) the
global expert. The trainer writes no checkpoint while steps are being skipped.
"""
from __future__ import annotations

import contextlib
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint.keys import is_bank_key


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/Inf loss or gradients; nothing was saved after them.
    Raised by every rank at the same step (``agreed``)."""
    agreed = True


def base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16/fp16)."""
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def describe_param(name: str, tensor: torch.Tensor, first_expert: Optional[int] = None) -> str:
    """``blocks.1.ffn.moe.experts.w1 (block 1, expert 5): 1 of 16384 values non-finite (nan)``."""
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    where = []
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        where.append(f"block {m.group(1)}")
    if first_expert is not None and is_bank_key(name) and tensor.dim() >= 3:  # [E_local, ...]
        local = int(bad.reshape(tensor.shape[0], -1).any(dim=1).nonzero()[0, 0])
        where.append(f"expert {first_expert + local}")
    first = tensor.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
    return (f"{name}" + (f" ({', '.join(where)})" if where else "")
            + f": {count} of {tensor.numel()} values non-finite (first: {first})")


class NonFiniteGuard:
    def __init__(self, model: torch.nn.Module, engine, limit: int, rank: int, world: int, device):
        self.model, self.engine, self.limit = model, engine, limit
        self.rank, self.world, self.device = rank, world, device
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._pending: List[torch.Tensor] = []  # gradients queued by the hooks, checked per bucket
        self._pending_idx: List[int] = []
        self._pending_numel = 0
        self._checked: List[Tuple[List[int], torch.Tensor]] = []  # (param indices, finite [n]) this step
        self._streak_checked: List[Tuple[List[int], torch.Tensor]] = []  # over the current streak (diagnosis)
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        self.streak = 0  # consecutive skipped steps
        self.skipped = 0  # skipped steps of this process
        self.first_bad_step: Optional[int] = None
        self._first_expert = {}
        for _, layer in getattr(model, "moe_layers", lambda: [])():
            for n, p in layer.named_parameters():
                self._first_expert[id(p)] = getattr(layer, "first_expert", None)
        for i, (_, p) in enumerate(self.named):
            p.register_hook(self._grad_hook(i))

    BUCKET_NUMEL = 1 << 24  # queued gradient elements checked at once (bounds what the queue keeps alive)

    def _grad_hook(self, i: int):
        def hook(grad):
            self._pending.append(grad)
            self._pending_idx.append(i)
            self._pending_numel += grad.numel()
            if self._pending_numel >= self.BUCKET_NUMEL:
                self._check_pending()
        return hook

    def _check_pending(self) -> None:
        """One fused norm over the queued gradients; on the device: no host sync."""
        if not self._pending:
            return
        with torch.no_grad():
            finite = torch.isfinite(torch.stack(torch._foreach_norm(self._pending)))
        self._checked.append((self._pending_idx, finite))
        self._pending, self._pending_idx, self._pending_numel = [], [], 0

    def _grad_bad(self) -> torch.Tensor:
        """Any gradient of this step non-finite (0-dim bool on the device)."""
        self._check_pending()
        if not self._checked:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return ~torch.cat([f for _, f in self._checked]).all()

    def check_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss |= ~torch.isfinite(loss.detach()).all()

    def decide(self, extra: Sequence[float] = ()) -> Dict[str, List[int]]:
        """Collective. {"loss": ranks with a non-finite loss, "grad": ranks with non-finite
        gradients}; both empty: take the step. Clears this step's flags. ``extra``: the caller's
        per-rank numbers, summed over ranks in the same all-reduce (``self.extra`` after)."""
        import torch.distributed as dist

        mine = torch.stack([self.bad_loss.float(), self._grad_bad().float()])
        if dist.is_initialized() and self.world > 1:
            flags = torch.zeros(2 * self.world + len(extra), dtype=torch.float32, device=self.device)
            flags[2 * self.rank:2 * self.rank + 2] = mine
            if extra:
                flags[2 * self.world:] = torch.tensor(list(extra), dtype=torch.float32).to(self.device,
                                                                                           non_blocking=True)
            dist.all_reduce(flags)
        else:
            flags = torch.cat([mine, torch.tensor(list(extra), dtype=torch.float32).to(self.device, non_blocking=True)])
        host = flags.tolist()  # the one host sync of the step
        f, self.extra = host[:2 * self.world], host[2 * self.world:]
        self.bad_loss.zero_()
        self._streak_checked += self._checked
        self._checked = []
        return {"loss": [r for r in range(self.world) if f[2 * r] > 0],
                "grad": [r for r in range(self.world) if f[2 * r + 1] > 0]}

    @contextlib.contextmanager
    def skipping(self, skip: bool):
        """Around ``engine.step()``: with ``skip`` the torch optimizer step is a no-op."""
        opt = base_optimizer(self.engine) if skip else None
        if opt is not None:
            opt.step = lambda *a, **k: None
        try:
            yield
        finally:
            if opt is not None:
                del opt.step  # back to the class's method

    def record(self, step: int, skipped: bool) -> None:
        if skipped:
            self.streak += 1
            self.skipped += 1
            if self.streak == 1:
                self.first_bad_step = step
        else:
            self.streak = 0
            self._streak_checked = []

    def diagnose(self) -> str:
        """This rank's first non-finite parameter value, else gradient (flagged this streak)."""
        with torch.no_grad():
            for name, p in self.named:
                if not torch.isfinite(p).all():
                    return "parameter " + describe_param(name, p.detach(), self._first_expert.get(id(p)))
        bad = set()
        for idx, finite in self._streak_checked:  # read only when the run stops
            bad.update(i for i, ok in zip(idx, finite.tolist()) if not ok)
        flagged = sorted(bad)  # named_parameters order
        if flagged:
            name = self.named[flagged[0]][0]
            more = f" ({len(flagged) - 1} more tensors)" if len(flagged) > 1 else ""
            return f"gradient of {name}{more}"
        return "loss only (parameters and gradients finite)"

    def stop_error(self, step: int, causes: Dict[str, List[int]], last_good: Optional[str]) -> NonFiniteError:
        """Collective (gathers every rank's diagnosis): the error all ranks raise."""
        import torch.distributed as dist

        mine = self.diagnose()
        every = [mine]
        if dist.is_initialized() and self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        order = sorted(range(self.world), key=lambda r: (not every[r].startswith("parameter"),
                                                         not every[r].startswith("gradient"), r))
        first = order[0]
        others = "; ".join(f"rank {r}: {every[r]}" for r in order[1:])
        saved = (f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written")
        return NonFiniteError(
            f"step {step}: {self.streak} steps in a row (steps {self.first_bad_step}-{step}) had a non-finite "
            f"loss or gradient (train.max_consecutive_nonfinite={self.limit}); loss non-finite on ranks "
            f"{causes['loss']}, gradients on ranks {causes['grad']}. First non-finite tensor: rank {first}: "
            f"{every[first]}" + (f" [{others}]" if others else "") + f". Nothing was saved after the last good "
            f"step; {saved}. Lower train.lr, set train.grad_clip, or check the data, then resume with "
            "--resume auto")
