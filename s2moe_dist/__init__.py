"""s2moe_dist: S2MoE layers for DeepSpeed / Megatron pre-training.

``S2MoE`` is the layer as DeepSpeed's engine must see it (a ``deepspeed.moe.layer.MoE`` to
``isinstance``) when DeepSpeed is installed, and the pure PyTorch layer when it is not.
"""
__version__ = "0.1.0"

from .config import S2MoEConfig
from .moe.layer import S2MoELayer, s2moe_aux_loss

S2MoE = S2MoELayer

__all__ = ["S2MoE", "S2MoEConfig", "S2MoELayer", "s2moe_aux_loss", "__version__"]
