"""The registered tensor-parallel (TP) group, and expert groups laid out around it.

A layer is tensor-parallel when its ``ParallelPlan`` says so (``parallel/plan.py``). The group
registered here is a convenience read only where a call site asks for it:

- ``register_tensor_parallel_group(group)`` (what ``integrations.megatron.use_megatron_parallel_state()``
  calls): read by ``ParallelPlan.from_registered_groups()`` and by layers whose config asks for
  experts split over TP (``enable_expert_tensor_parallelism=True``). A plain layer built while it
  is registered stays plain.
- ``set_tensor_parallel_group(group)``: the older switch, kept for existing callers: registers the
  group AND makes every layer built afterwards without a plan tensor-parallel over it.

Expert groups (layout in ``topology.py``): experts split over TP use DeepSpeed's E+M+D layout,
made here; experts whole on every rank use the TP-blind layout of ``groups.py``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch.distributed as dist

from .groups import new_group_of_this_rank
from .topology import expert_tp_ranks, tensor_parallel_ranks

_TP_GROUP = None
_TP_FOR_EVERY_LAYER = False  # set_tensor_parallel_group: layers built without a plan take the group too
_EXPERT_TP_GROUPS: Dict[Tuple[int, int], Tuple[object, object]] = {}


def register_tensor_parallel_group(group) -> None:
    """Register the job's TP group (TP ranks must be contiguous blocks: Megatron's default order)
    for the call sites that ask for it (module docstring). ``None`` unregisters it."""
    global _TP_GROUP, _TP_FOR_EVERY_LAYER
    if group is not None:
        check_tensor_parallel_group(group)
    _TP_GROUP, _TP_FOR_EVERY_LAYER = group, False


def check_tensor_parallel_group(group) -> None:
    """TP ranks must be contiguous blocks (Megatron's default order): the expert layouts assume it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    expected = tensor_parallel_ranks(world, tp)[rank // tp] if world % tp == 0 else None
    if ranks != expected:
        raise ValueError(f"tensor-parallel group ranks {ranks} are invalid for rank {rank}: S2MoE needs "
                         f"TP groups of contiguous ranks ({expected}), Megatron's default rank order "
                         "(order='tp-cp-ep-dp-pp')")


def set_tensor_parallel_group(group) -> None:
    """Register ``group`` and make it the TP group of every layer built afterwards without a plan
    (the behaviour before plans; prefer ``S2MoELayer(..., plan=ParallelPlan.from_registered_groups(...))``).
    ``None`` unregisters it."""
    global _TP_FOR_EVERY_LAYER
    register_tensor_parallel_group(group)
    _TP_FOR_EVERY_LAYER = group is not None


def get_tensor_parallel_group():
    """The registered TP group, or None."""
    return _TP_GROUP


def default_tensor_parallel_group(enable_expert_tensor_parallelism: bool) -> Optional[object]:
    """The TP group of a layer built without a plan: the registered one when the layer's config asks
    for experts split over TP, or after ``set_tensor_parallel_group``; None otherwise."""
    return _TP_GROUP if enable_expert_tensor_parallelism or _TP_FOR_EVERY_LAYER else None


def get_expert_tp_groups(ep_size: int, tp_size: int):
    """(EP group, EDP group) of this rank in the E+M+D layout; made on first call, on every rank
    (``new_group`` is collective: every rank creates every group, in one order)."""
    key = (ep_size, tp_size)
    if key not in _EXPERT_TP_GROUPS:
        ep_ranks, edp_ranks = expert_tp_ranks(dist.get_world_size(), tp_size, ep_size)
        _EXPERT_TP_GROUPS[key] = (new_group_of_this_rank(ep_ranks), new_group_of_this_rank(edp_ranks))
    return _EXPERT_TP_GROUPS[key]
