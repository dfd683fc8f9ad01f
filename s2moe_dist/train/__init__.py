"""Training on the DeepSpeed engine: run config, launcher environments, checkpoints, signals,
TensorBoard metrics, BPC evaluation. Entry points: ``s2moe_dist.cli`` (s2moe-train, s2moe-eval)."""
from .config import DataConfig, RunConfig, TrainConfig, load_run_config, run_config_from_dict

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "load_run_config", "run_config_from_dict"]
