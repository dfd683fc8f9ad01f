"""Process groups and autograd collectives. Knows nothing of DeepSpeed or Megatron."""
from .all_to_all import all_to_all, exchange, exchange_counts
from .groups import (expert_data_parallel_ranks, expert_parallel_ranks, get_expert_data_parallel_group,
                     get_expert_groups, get_expert_parallel_group)

__all__ = ["all_to_all", "exchange", "exchange_counts", "expert_parallel_ranks", "expert_data_parallel_ranks",
           "get_expert_groups", "get_expert_parallel_group", "get_expert_data_parallel_group"]
