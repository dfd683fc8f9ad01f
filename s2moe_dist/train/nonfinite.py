"""NaN/Inf guard: a step whose loss or gradients are not finite on ANY rank is skipped on EVERY rank.

Each rank flags its own micro-batch losses and, through a tensor hook per parameter, its own
gradients as backward produces them (before any reduction, whatever the ZeRO stage: ZeRO 1/2
move gradients into flat partitions after the hooks ran). Before the optimizer step one
all-reduce of ``[loss bad, grad bad]`` per rank decides for all ranks. A skipped step calls
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
from typing import Dict, List, Optional

import torch


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
    if first_expert is not None and ".experts." in name and tensor.dim() >= 3:
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
        self.bad_grad = torch.zeros(len(self.named), dtype=torch.bool, device=device)  # this step
        self.streak_bad_grad = torch.zeros_like(self.bad_grad)  # over the current streak (diagnosis)
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

    def _grad_hook(self, i: int):
        def hook(grad):
            self.bad_grad[i] |= ~torch.isfinite(grad).all()  # on the device: no host sync
        return hook

    def check_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss |= ~torch.isfinite(loss.detach()).all()

    def decide(self) -> Dict[str, List[int]]:
        """Collective. {"loss": ranks with a non-finite loss, "grad": ranks with non-finite
        gradients}; both empty: take the step. Clears this step's flags."""
        import torch.distributed as dist

        flags = torch.zeros(2 * self.world, dtype=torch.float32, device=self.device)
        flags[2 * self.rank] = self.bad_loss.float()
        flags[2 * self.rank + 1] = self.bad_grad.any().float()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flags)
        f = flags.view(self.world, 2).cpu()
        self.bad_loss.zero_()
        self.streak_bad_grad |= self.bad_grad
        self.bad_grad.zero_()
        return {"loss": [r for r in range(self.world) if f[r, 0] > 0],
                "grad": [r for r in range(self.world) if f[r, 1] > 0]}

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
            self.streak_bad_grad.zero_()

    def diagnose(self) -> str:
        """This rank's first non-finite parameter value, else gradient (flagged this streak)."""
        with torch.no_grad():
            for name, p in self.named:
                if not torch.isfinite(p).all():
                    return "parameter " + describe_param(name, p.detach(), self._first_expert.get(id(p)))
        flagged = self.streak_bad_grad.nonzero().flatten().tolist()
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
