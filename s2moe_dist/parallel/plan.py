"""Which ranks a layer's experts and tokens are split over: one frozen plan, made once, passed in.

A layer gets a ``ParallelPlan`` before it builds its experts; its dispatcher is built from it
(``s2moe_dist.moe.dispatcher.build_dispatcher``). Every plan comes from ``make_parallel_plan``:

    explicit groups (DeepSpeed's EP group, Megatron's TP group)  --+
    or the defaults: the world, ep_size, DeepSpeed's layout        --+--> make_parallel_plan --> ParallelPlan
                                                                       (validated; EP rank computed here)

The EP rank is the rank inside the EP group passed in, else the position the default layout gives
(``topology.expert_parallel_rank``): EP groups of contiguous ranks without TP (DeepSpeed's
``ep_size_N``), DeepSpeed's E+M+D layout with experts split over TP, its TP-blind layout with
whole experts under TP. An EP group left out is made on first use (``ParallelPlan.expert_groups``:
``new_group`` is collective, so it runs where every rank runs it, at the first dispatch).

``plan_for_config(config, ...)`` is the same builder fed from an ``S2MoEConfig``. A TP group
registered by the Megatron integration is read only where a call site asks for it:
``ParallelPlan.from_registered_groups``. Knows nothing of DeepSpeed or Megatron.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch.distributed as dist

from .groups import get_expert_groups
from .tensor_parallel import check_tensor_parallel_group, get_expert_tp_groups, get_tensor_parallel_group
from .topology import expert_parallel_rank, validate_topology


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelPlan:
    """How one MoE layer is laid out over expert (EP) and tensor (TP) parallelism.

    Attributes:
        ep_size: ranks the experts are split over; each holds ``num_experts / ep_size``.
        ep_rank: this rank's place in its EP group: it holds experts
            ``[ep_rank * E_local, (ep_rank + 1) * E_local)``.
        ep_group: the EP process group; None with ``ep_size > 1`` means the default layout's group,
            made on first use by ``expert_groups()``.
        tp_size: tensor-parallel ranks the layer's (replicated) input is split over; 1: no TP.
        tp_rank: this rank's place in its TP group.
        tp_group: the TP process group; None without TP.
        shard_experts: each expert split over the TP group (``enable_expert_tensor_parallelism``);
            False: every rank holds whole experts.
    """
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    shard_experts: bool = False

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_size > 1

    def first_expert(self, num_local_experts: int) -> int:
        """Global id of this rank's first expert."""
        return self.ep_rank * num_local_experts

    def expert_groups(self, ep_size: Optional[int] = None):
        """(EP group, EDP group) of this plan's default layout, made without DeepSpeed on first call
        (collective: every rank calls it). ``ep_size``, if given, must be the plan's (an older call)."""
        if ep_size is not None and ep_size != self.ep_size:
            raise ValueError(f"ParallelPlan.expert_groups(ep_size={ep_size}) is invalid: the plan has "
                             f"ep_size={self.ep_size}; call expert_groups() without an argument")
        if self.shard_experts:
            return get_expert_tp_groups(self.ep_size, self.tp_size)
        return get_expert_groups(self.ep_size)

    def dispatch_group(self):
        """The EP group tokens are exchanged over: the one passed in, else the default layout's."""
        return self.ep_group if self.ep_group is not None else self.expert_groups()[0]

    @classmethod
    def from_registered_groups(cls, config, owner: str = "S2MoEConfig") -> "ParallelPlan":
        """``plan_for_config`` on the TP group registered by
        ``s2moe_dist.integrations.megatron.use_megatron_parallel_state()`` (or
        ``parallel.tensor_parallel.register_tensor_parallel_group``); refuses when none is."""
        group = get_tensor_parallel_group()
        if group is None:
            raise ValueError("ParallelPlan.from_registered_groups(): no tensor-parallel group is registered; call "
                             "s2moe_dist.integrations.megatron.use_megatron_parallel_state() after megatron.core."
                             "parallel_state.initialize_model_parallel(...), or pass tp_group= to "
                             "make_parallel_plan")
        return plan_for_config(config, tp_group=group, owner=owner)


def plan_for_config(config, *, tp_group=None, ep_group=None, owner: str = "S2MoEConfig") -> ParallelPlan:
    """``make_parallel_plan`` for a layer of ``config`` (an ``S2MoEConfig``): its ep_size, sizes and
    ``enable_expert_tensor_parallelism``."""
    return make_parallel_plan(config.ep_size, ep_group=ep_group, tp_group=tp_group,
                              shard_experts=bool(config.enable_expert_tensor_parallelism),
                              num_experts=config.num_experts, hidden_size=config.hidden_size,
                              ffn_hidden_size=config.ffn_hidden_size, owner=owner)


def make_parallel_plan(ep_size: int = 1, *, ep_group=None, tp_group=None, shard_experts: bool = False,
                       num_experts: Optional[int] = None, hidden_size: Optional[int] = None,
                       ffn_hidden_size: Optional[int] = None, owner: str = "make_parallel_plan") -> ParallelPlan:
    """The one builder of a ``ParallelPlan``, checked before any process group is made.

    ``ep_group``: the EP group to use (DeepSpeed's); None: the default layout's, made on first use.
    ``tp_group``: the TP group (Megatron's); None or a group of one rank: no TP (``shard_experts``
    is then a no-op). ``num_experts`` / ``hidden_size`` / ``ffn_hidden_size``, when given, are
    checked against the sizes. ``owner`` prefixes the argument names in errors (``S2MoEConfig``
    for a layer's own plan). Raises ValueError naming the argument and the fix."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"{owner}.ep_size={ep_size!r} is invalid: must be an integer >= 1")
    if ep_size == 1 and ep_group is None and tp_group is None:
        return ParallelPlan()  # one process holds every expert: no torch.distributed needed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{owner}.ep_size={ep_size} needs torch.distributed initialized before the layer is built "
                         "(call deepspeed.init_distributed() or torch.distributed.init_process_group() first), "
                         "or use ep_size=1")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    if tp_size == 1:
        tp_group, shard_experts = None, False
    shard_experts = bool(shard_experts)
    if tp_size > 1:
        validate_topology(world, tp_size, ep_size, num_experts or ep_size, hidden_size or tp_size,
                          ffn_hidden_size or tp_size, enable_expert_tensor_parallelism=shard_experts)
        check_tensor_parallel_group(tp_group)
    elif world % ep_size:
        raise ValueError(f"{owner}.ep_size={ep_size} is invalid: must divide the world size ({world}); "
                         f"choose ep_size among {_divisors(world)}")
    elif num_experts is not None and num_experts % ep_size:
        raise ValueError(f"{owner}.num_experts={num_experts} is invalid: must be divisible by ep_size ({ep_size}); "
                         f"choose ep_size among {_divisors(num_experts)}")
    if ep_group is None:
        ep_rank = expert_parallel_rank(rank, tp_size, ep_size, shard_experts)
    else:
        size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        if size != ep_size:
            raise ValueError(f"{owner}: ep_group has {size} ranks but ep_size={ep_size}; pass the EP group of "
                             f"ep_size ranks (DeepSpeed's 'ep_size_{ep_size}'), or set ep_size={size}")
        if ep_rank < 0:
            raise ValueError(f"{owner}: ep_group does not contain this rank ({rank}); pass the EP group this "
                             "rank belongs to (new_group is collective: every rank makes every group)")
    return ParallelPlan(ep_size=ep_size, ep_rank=ep_rank, ep_group=ep_group, tp_size=tp_size,
                        tp_rank=dist.get_rank(tp_group) if tp_size > 1 else 0, tp_group=tp_group,
                        shard_experts=shard_experts)

