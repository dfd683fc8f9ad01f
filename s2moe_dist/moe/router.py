"""Top-k router (docs/design.md 1.2): fp32 logits, softmax, top-k, combine weights, capacity drops.

Combine weights: renormalised over the kept experts for layers trained with k >= 2 (also at
another eval_k), the raw top-1 probability for k = 1 (Switch / DeepSpeed), so the router learns
from the task loss.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    probs: torch.Tensor       # [T, E] fp32 router probabilities
    expert_idx: torch.Tensor  # [T, k] chosen experts before capacity drops (for the balance loss)
    dispatch_idx: torch.Tensor  # [T, k] experts to dispatch to; -1 marks a dropped slot
    weights: torch.Tensor     # [T, k] fp32 combine weights (0 for dropped slots)
    # dropped slots: the int 0 for a dropless routing (known without reading the device), a 0-dim
    # tensor when capacity was applied (reading it is a host sync, left to whoever needs the value)
    num_dropped: Union[int, torch.Tensor] = 0

    @property
    def dropless(self) -> bool:
        """No capacity applied: every slot is dispatched (decided without a host sync)."""
        return not torch.is_tensor(self.num_dropped) and self.num_dropped == 0

    def rows(self, start: int, end: int) -> "Routing":
        """The routing of tokens [start, end) of a dropless routing (capacity couples the rows)."""
        if not self.dropless:
            raise ValueError("Routing.rows: a routing with capacity drops cannot be split by rows")
        return Routing(probs=self.probs[start:end], expert_idx=self.expert_idx[start:end],
                       dispatch_idx=self.dispatch_idx[start:end], weights=self.weights[start:end])


def expert_counts(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 slots per expert of ``expert_idx`` (any shape; -1 entries, dropped slots, ignored).

    ``torch.bincount`` would give the same, but on CUDA it reads the input's min and max back to
    the host (two syncs) and its output size depends on the data (a torch.compile graph break);
    a scatter-add into E+1 bins (bin 0 collects the -1 slots) does neither."""
    flat = expert_idx.reshape(-1)
    bins = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    bins.scatter_add_(0, flat + 1, torch.ones_like(flat, dtype=torch.long))
    return bins[1:]


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's rule, generalised to k: ceil(T * k / E * capacity_factor), at least min_capacity."""
    return max(int(math.ceil(num_tokens * k / num_experts * capacity_factor)), int(min_capacity))


def capacity_keep_mask(expert_idx: torch.Tensor, num_experts: int, cap: int,
                       random_first: bool = False) -> torch.Tensor:
    """[T, k] bool: which slots fit in their expert's capacity.

    Priority as DeepSpeed's top-2 gate: every first choice before any second choice, token order
    within a choice (random order among first choices with ``random_first``, DeepSpeed's RTS).
    Computed by sorting, so no [T, E, capacity] tensor is ever made.
    """
    T, k = expert_idx.shape
    prio_tok = torch.arange(T, device=expert_idx.device)
    if random_first:
        prio_tok = torch.randperm(T, device=expert_idx.device)
    # slot (t, j) gets priority j*T + rank(t); sort slots by (expert, priority)
    prio = (torch.arange(k, device=expert_idx.device).unsqueeze(0) * T + prio_tok.unsqueeze(1)).reshape(-1)
    experts = expert_idx.reshape(-1)
    key = experts * (k * T) + prio
    order = torch.argsort(key)
    sorted_e = experts[order]
    counts = expert_counts(sorted_e, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(order.numel(), device=order.device) - starts[sorted_e]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return (pos < cap).reshape(T, k)


class Router(nn.Module, abc.ABC):
    """What the S2MoE layer calls on a router; every router variant implements it.

    ``forward(x, k, renormalize, *, capacity_factor, min_capacity, use_rts,
    second_expert_sampling) -> Routing`` routes the tokens ``x`` [T, d]; ``step()`` marks the
    start of a training forward (a no-op unless the router has a schedule, as StableMoE's
    freeze); ``balance_loss(routing)`` is the router's balance loss (Switch's by default).
    ``routes_streams_jointly``: both S2MoE streams may be routed by ONE call on the stacked
    [2T, d] rows when no capacity applies (without capacity each row routes on its own); off
    for routers whose per-stream calls must stay separate (a noise draw per stream)."""

    routes_streams_jointly: bool = False

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, k: int, renormalize: bool, *, capacity_factor: Optional[float] = None,
                min_capacity: int = 0, use_rts: bool = False, second_expert_sampling: bool = False) -> Routing:
        """The routing of the rows of ``x`` [T, d] to ``k`` experts each."""

    def step(self) -> None:
        """A training forward of the layer starts (StableMoE counts them for its freeze)."""

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """Switch balance loss ``E * sum_e f_e * P_e`` of ``r`` (``moe/losses.py``)."""
        from .losses import balance_loss
        return balance_loss(r.probs, r.expert_idx, self.num_experts)

    def route_probs(self, probs, logits, k, renormalize, *, capacity_factor=None, min_capacity=0,
                    use_rts=False, second_expert_sampling=False) -> Routing:
        """Top-k of ``probs`` [T, E] (or the Gumbel second choice), capacity drops, combine weights:
        the selection every router variant shares."""
        if second_expert_sampling and k == 2:
            # DeepSpeed's top2_2nd_expert_sampling: Gumbel noise picks the second expert.
            first = logits.argmax(dim=-1, keepdim=True)
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)).clamp_min(1e-20))
            noisy = (logits + gumbel).scatter(1, first, float("-inf"))
            idx = torch.cat([first, noisy.argmax(dim=-1, keepdim=True)], dim=1)
        else:
            idx = torch.topk(probs, k, dim=-1).indices
        top_p = probs.gather(1, idx)
        dispatch_idx, num_dropped = idx, 0
        if capacity_factor is not None and idx.shape[0] > 0:
            cap = capacity(idx.shape[0], self.num_experts, k, capacity_factor, min_capacity)
            keep = capacity_keep_mask(idx, self.num_experts, cap, random_first=use_rts)
            # masked unconditionally: branching on "anything dropped?" would read the device
            num_dropped = (~keep).sum()
            top_p = top_p * keep
            dispatch_idx = torch.where(keep, idx, torch.full_like(idx, -1))
        if renormalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny)
        return Routing(probs=probs, expert_idx=idx, dispatch_idx=dispatch_idx, weights=top_p,
                       num_dropped=num_dropped)


class TopKRouter(Router):
    """``weight``: [E, d], no bias. Logits in fp32 even under bf16 autocast."""

    routes_streams_jointly = True  # one logits GEMM, softmax and top-k for both streams

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor, k: int, renormalize: bool, *, capacity_factor: Optional[float] = None,
                min_capacity: int = 0, use_rts: bool = False, second_expert_sampling: bool = False) -> Routing:
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        return self.route_probs(probs, logits, k, renormalize, capacity_factor=capacity_factor,
                                min_capacity=min_capacity, use_rts=use_rts,
                                second_expert_sampling=second_expert_sampling)


class StreamRouting(NamedTuple):
    """The routing of S2MoE's two streams in one forward: the clean rows ``tokens[:T]`` and the
    noisy rows ``tokens[T:]``, the [2T, k] experts and weights all rows are dispatched with.

    ``shared``: the noisy stream reuses the clean routing (``noisy_routing="shared"``; ``noisy``
    is then the clean routing itself and its slots are dispatched twice). ``joint``: the routing
    of all 2T rows when one router call routed both streams, else None."""

    clean: Routing
    noisy: Routing
    dispatch_idx: torch.Tensor  # [2T, k]
    weights: torch.Tensor       # [2T, k]
    joint: Optional[Routing]
    shared: bool
