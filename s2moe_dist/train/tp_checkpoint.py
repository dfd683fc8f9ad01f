"""Old import path, kept for users: a thin re-export of ``s2moe_dist.checkpoint.tp_merge`` (a
tensor-parallel checkpoint merged into one TP=1 state dict)."""
from ..checkpoint.tp_merge import merged_state_dict

__all__ = ["merged_state_dict"]
