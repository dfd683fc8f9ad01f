"""s2moe_dist: S2MoE layers for DeepSpeed / Megatron pre-training.

``S2MoE`` is the layer as DeepSpeed's engine must see it (a ``deepspeed.moe.layer.MoE`` to
``isinstance``: ``s2moe_dist.integrations.deepspeed.DeepSpeedS2MoE``) when DeepSpeed is installed,
and the pure PyTorch ``S2MoELayer`` when it is not. It is resolved on first access, so
``import s2moe_dist`` does not import DeepSpeed.
"""
__version__ = "0.1.0"

from .config import S2MoEConfig
from .moe.layer import S2MoELayer, s2moe_aux_loss


def __getattr__(name):  # PEP 562: resolve S2MoE lazily
    if name == "S2MoE":
        try:
            from .integrations.deepspeed import DeepSpeedS2MoE as layer
        except ModuleNotFoundError as e:
            if e.name is None or not e.name.startswith("deepspeed"):
                raise
            layer = S2MoELayer
        globals()["S2MoE"] = layer
        return layer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["S2MoE", "S2MoEConfig", "S2MoELayer", "s2moe_aux_loss", "__version__"]
