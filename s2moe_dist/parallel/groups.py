"""Expert-parallel process groups in DeepSpeed's layout, made here when DeepSpeed is not used.

With world size W and expert-parallel size ep (TP = 1):
- expert-parallel (EP) groups are contiguous blocks of ranks: [0..ep-1], [ep..2ep-1], ...;
  the experts of a layer are split over the ranks of a block;
- expert-data-parallel (EDP) groups are strided: {r, r+ep, r+2ep, ...}; they hold replicas of the
  same experts and reduce expert gradients among themselves.
This is the layout of ``deepspeed.utils.groups._create_expert_and_data_parallel`` (names
``ep_size_N``), so a run that later moves onto DeepSpeed's groups keeps its expert placement.
``torch.distributed.new_group`` is collective: every rank creates every group, in one order.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.distributed as dist

_GROUPS: Dict[int, Tuple[object, object]] = {}


def expert_parallel_ranks(world_size: int, ep_size: int) -> List[List[int]]:
    return [list(range(i * ep_size, (i + 1) * ep_size)) for i in range(world_size // ep_size)]


def expert_data_parallel_ranks(world_size: int, ep_size: int) -> List[List[int]]:
    return [list(range(j, world_size, ep_size)) for j in range(ep_size)]


def check_ep_size(world_size: int, ep_size: int) -> None:
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size ({world_size}); "
                         f"choose one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")


def new_group_of_this_rank(layout: List[List[int]]):
    """Create every group of ``layout`` (a partition of the ranks) and return the one holding this
    rank. ``new_group`` is collective: every rank must create every group, in the same order."""
    rank, mine = dist.get_rank(), None
    for ranks in layout:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def get_expert_groups(ep_size: int):
    """(EP group, EDP group) of this rank for ``ep_size``; made on first call, on every rank."""
    if ep_size not in _GROUPS:
        world = dist.get_world_size()
        check_ep_size(world, ep_size)
        _GROUPS[ep_size] = (new_group_of_this_rank(expert_parallel_ranks(world, ep_size)),
                            new_group_of_this_rank(expert_data_parallel_ranks(world, ep_size)))
    return _GROUPS[ep_size]


def get_expert_parallel_group(ep_size: int):
    return get_expert_groups(ep_size)[0]


def get_expert_data_parallel_group(ep_size: int):
    return get_expert_groups(ep_size)[1]
