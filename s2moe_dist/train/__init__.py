"""Training on the DeepSpeed engine: run config, launcher environments, checkpoints, signals,
TensorBoard metrics, BPC evaluation. Entry points: ``s2moe_dist.cli`` (s2moe-train, s2moe-eval).
Names resolved lazily (s2moe_dist._lazy): ``s2moe_dist.train.signals`` imports without torch."""
from .._lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {name: ".config" for name in (
    "DataConfig", "RunConfig", "TrainConfig", "load_run_config", "run_config_from_dict")})

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "load_run_config", "run_config_from_dict"]
