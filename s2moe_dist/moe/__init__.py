"""The S2MoE layer in pure PyTorch: no DeepSpeed, no Megatron, no models."""
from .layer import S2MoELayer, s2moe_aux_loss

__all__ = ["S2MoELayer", "s2moe_aux_loss"]
