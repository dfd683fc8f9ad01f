"""Adapters to training frameworks: ``deepspeed`` (drop-in for ``deepspeed.moe.layer.MoE``,
configs, checkpoints), ``megatron`` (tensor parallelism). Import the submodule you need; nothing
is imported here so ``import s2moe_dist`` stays light."""
