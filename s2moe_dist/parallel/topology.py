"""Rank layout of tensor (TP) x data (DP) x expert (EP) parallelism, and its validation.

Megatron's order: TP groups are contiguous blocks of ranks, ``rank = dp_index * tp + tp_rank``;
data-parallel groups are strided, ``{i, i+tp, i+2tp, ...}``. Expert groups follow DeepSpeed:

- experts split over TP (``enable_expert_tensor_parallelism``): DeepSpeed's E+M+D layout
  (``deepspeed.utils.groups._get_expert_parallel_ranks``): EP groups are consecutive slices of
  a DP group, so EP must divide DP; TP peers hold the same experts, each a slice of them.
- experts whole on each rank: DeepSpeed's layout without ``mpu``: EP groups are contiguous
  blocks of the world (they may contain TP peers, which then hold different experts), EP
  divides the world.

Pure functions: nothing here touches torch.distributed, so the trainer can validate a topology
before any process group exists.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")


def validate_topology(world_size: int, tp_size: int, ep_size: int, num_experts: int, hidden_size: int,
                      ffn_hidden_size: int, enable_expert_tensor_parallelism: bool = True,
                      field_names: Optional[Mapping[str, str]] = None) -> None:
    """Raise ValueError naming the field, its value and the fix if the world cannot be laid out
    as TP x DP with EP experts groups. Call before creating any process group. ``field_names``:
    the caller's name of each argument in the messages (e.g. ``{"ep_size": "model.moe.ep_size"}``)."""
    def f(name: str) -> str:
        return (field_names or {}).get(name, name)

    for name, value in (("world_size", world_size), ("tp_size", tp_size), ("ep_size", ep_size),
                        ("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("ffn_hidden_size", ffn_hidden_size)):
        _check_positive_int(f(name), value)
    if world_size % tp_size:
        raise ValueError(f"{f('tp_size')}={tp_size} is invalid: it must divide the world size ({world_size}), "
                         f"which factors as TP x DP; choose tp_size among {_divisors(world_size)}")
    dp_size = world_size // tp_size
    if enable_expert_tensor_parallelism and tp_size > 1:
        if dp_size % ep_size:
            raise ValueError(f"{f('ep_size')}={ep_size} is invalid: with experts split over TP "
                             f"(enable_expert_tensor_parallelism) expert groups live inside a data-parallel "
                             f"group, so ep_size must divide the data-parallel size world_size/tp_size = "
                             f"{world_size}/{tp_size} = {dp_size}; choose ep_size among {_divisors(dp_size)}")
    elif world_size % ep_size:
        raise ValueError(f"{f('ep_size')}={ep_size} is invalid: it must divide the world size ({world_size}); "
                         f"choose ep_size among {_divisors(world_size)}")
    if num_experts % ep_size:
        raise ValueError(f"{f('num_experts')}={num_experts} is invalid: it must be divisible by ep_size ({ep_size}); "
                         f"choose ep_size among {_divisors(num_experts)}")
    if tp_size > 1 and hidden_size % tp_size:
        raise ValueError(f"{f('hidden_size')}={hidden_size} is invalid: it must be divisible by tp_size ({tp_size}) "
                         f"for the tensor-parallel layers; choose tp_size among {_divisors(hidden_size)}")
    if tp_size > 1 and enable_expert_tensor_parallelism and ffn_hidden_size % tp_size:
        raise ValueError(f"{f('ffn_hidden_size')}={ffn_hidden_size} is invalid: it must be divisible by tp_size "
                         f"({tp_size}) to split each expert over TP; choose tp_size among "
                         f"{_divisors(ffn_hidden_size)}")


def tensor_parallel_ranks(world_size: int, tp_size: int) -> List[List[int]]:
    return [list(range(i, i + tp_size)) for i in range(0, world_size, tp_size)]


def data_parallel_ranks(world_size: int, tp_size: int) -> List[List[int]]:
    return [list(range(i, world_size, tp_size)) for i in range(tp_size)]


def expert_tp_ranks(world_size: int, tp_size: int, ep_size: int) -> Tuple[List[List[int]], List[List[int]]]:
    """(EP groups, EDP groups) of DeepSpeed's E+M+D layout (experts split over TP, no pipeline)."""
    ep_groups, edp_groups = [], []
    for dp in data_parallel_ranks(world_size, tp_size):
        parts = [dp[i:i + ep_size] for i in range(0, len(dp), ep_size)]
        ep_groups.extend(parts)
        edp_groups.extend(list(r) for r in zip(*parts))
    return ep_groups, edp_groups


def expert_parallel_rank(rank: int, tp_size: int, ep_size: int, enable_expert_tensor_parallelism: bool) -> int:
    """Position of ``rank`` in its EP group (which block of experts it holds)."""
    if enable_expert_tensor_parallelism and tp_size > 1:
        return (rank // tp_size) % ep_size
    return rank % ep_size
