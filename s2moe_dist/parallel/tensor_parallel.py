"""The tensor-parallel (TP) group S2MoE layers use, and expert groups laid out around it.

A layer learns about TP only through ``set_tensor_parallel_group``: Megatron users call
``s2moe_dist.integrations.megatron.use_megatron_parallel_state()`` (the spec builder does), which
registers ``megatron.core.parallel_state``'s TP group here. Layers built afterwards treat their
input as replicated over that group (Megatron without sequence parallelism).

Expert groups (layout in ``topology.py``): experts split over TP use DeepSpeed's E+M+D layout,
made here; experts whole on every rank use the TP-blind layout of ``groups.py``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch.distributed as dist

from .groups import new_group_of_this_rank
from .topology import expert_tp_ranks, tensor_parallel_ranks

_TP_GROUP = None
_EXPERT_TP_GROUPS: Dict[Tuple[int, int], Tuple[object, object]] = {}


def set_tensor_parallel_group(group) -> None:
    """Register the TP group (TP ranks must be contiguous blocks: Megatron's default order).
    ``None`` unregisters it."""
    global _TP_GROUP
    if group is not None:
        world, rank = dist.get_world_size(), dist.get_rank()
        tp = dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group)
        expected = tensor_parallel_ranks(world, tp)[rank // tp] if world % tp == 0 else None
        if ranks != expected:
            raise ValueError(f"tensor-parallel group ranks {ranks} are invalid for rank {rank}: S2MoE needs "
                             f"TP groups of contiguous ranks ({expected}), Megatron's default rank order "
                             "(order='tp-cp-ep-dp-pp')")
    _TP_GROUP = group


def get_tensor_parallel_group():
    return _TP_GROUP


def get_expert_tp_groups(ep_size: int, tp_size: int):
    """(EP group, EDP group) of this rank in the E+M+D layout; made on first call, on every rank
    (``new_group`` is collective: every rank creates every group, in one order)."""
    key = (ep_size, tp_size)
    if key not in _EXPERT_TP_GROUPS:
        ep_ranks, edp_ranks = expert_tp_ranks(dist.get_world_size(), tp_size, ep_size)
        _EXPERT_TP_GROUPS[key] = (new_group_of_this_rank(ep_ranks), new_group_of_this_rank(edp_ranks))
    return _EXPERT_TP_GROUPS[key]
