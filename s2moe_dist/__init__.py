"""s2moe_dist: S2MoE layers for DeepSpeed / Megatron pre-training.

``S2MoE`` is the layer as DeepSpeed's engine must see it (a ``deepspeed.moe.layer.MoE`` to
``isinstance``: ``s2moe_dist.integrations.deepspeed.DeepSpeedS2MoE``) when DeepSpeed is installed,
and the pure PyTorch ``S2MoELayer`` when it is not.

Every public name is resolved on first access (PEP 562): ``import s2moe_dist`` imports neither
torch nor DeepSpeed, so the console scripts install their SIGTERM / SIGUSR1 handlers within
milliseconds of start instead of after torch's 2-3 s import (a preemption signal in that window
killed the rank).
"""
from ._lazy import lazy_exports

__version__ = "0.1.0"

_exports = lazy_exports(__name__, {"S2MoEConfig": ".config", "S2MoELayer": ".moe.layer",
                                   "s2moe_aux_loss": ".moe.layer"})


def __getattr__(name):
    if name == "S2MoE":
        try:
            from .integrations.deepspeed import DeepSpeedS2MoE as value
        except ModuleNotFoundError as e:
            if e.name is None or not e.name.startswith("deepspeed"):
                raise
            value = _exports("S2MoELayer")
        globals()[name] = value
        return value
    return _exports(name)


__all__ = ["S2MoE", "S2MoEConfig", "S2MoELayer", "s2moe_aux_loss", "__version__"]
