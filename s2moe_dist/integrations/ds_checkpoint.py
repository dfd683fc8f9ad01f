"""Old import path, kept for users: a thin re-export of ``s2moe_dist.checkpoint.state_dict`` (the
layer's state dict in DeepSpeed-MoE's per-expert layout)."""
from ..checkpoint.keys import DS_EXPERTS
from ..checkpoint.state_dict import batched_expert_state_dict, split_expert_state, stack_expert_state

__all__ = ["DS_EXPERTS", "batched_expert_state_dict", "split_expert_state", "stack_expert_state"]
