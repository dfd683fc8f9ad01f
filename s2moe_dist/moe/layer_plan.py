"""How an S2MoE layer gets its ``ParallelPlan`` (``parallel/plan.py``; docs/design.md section 2.1):
the plan of a layer built without one, and the check that a plan passed in fits the layer."""
from __future__ import annotations

from ..config import S2MoEConfig
from ..parallel.plan import ParallelPlan, plan_for_config
from ..parallel.tensor_parallel import default_tensor_parallel_group
from .tp_dispatcher import NO_TP_GROUP_ERROR


def default_plan(cfg: S2MoEConfig) -> ParallelPlan:
    """The plan of a layer built without one: its experts split over ``ep_size`` ranks of the world in
    DeepSpeed's layout, and tensor parallelism only where asked for: ``enable_expert_tensor_parallelism``
    takes the registered TP group (``integrations.megatron.use_megatron_parallel_state``), and
    ``parallel.tensor_parallel.set_tensor_parallel_group`` makes its group every layer's default."""
    shard = bool(cfg.enable_expert_tensor_parallelism)
    tp_group = default_tensor_parallel_group(enable_expert_tensor_parallelism=shard)
    if shard and tp_group is None:
        raise ValueError(NO_TP_GROUP_ERROR)
    return plan_for_config(cfg, tp_group=tp_group)


def check_plan(plan: ParallelPlan, cfg: S2MoEConfig, user_expert: bool) -> None:
    """A plan fits a layer: the config's ep_size, and experts split over TP exactly when the config
    asks for it and the plan has TP."""
    if not isinstance(plan, ParallelPlan):
        raise ValueError(f"S2MoE(plan={plan!r}) is invalid: must be a s2moe_dist.parallel.plan.ParallelPlan "
                         "(make_parallel_plan(...)) or None")
    if plan.ep_size != cfg.ep_size:
        raise ValueError(f"S2MoE(plan=...) has ep_size={plan.ep_size} but S2MoEConfig.ep_size={cfg.ep_size}; "
                         "they must be equal: build the plan with make_parallel_plan(config.ep_size, ...)")
    if plan.shard_experts != (bool(cfg.enable_expert_tensor_parallelism) and plan.tensor_parallel):
        raise ValueError(f"S2MoE(plan=...) has shard_experts={plan.shard_experts} but "
                         f"S2MoEConfig.enable_expert_tensor_parallelism={cfg.enable_expert_tensor_parallelism} "
                         f"(TP size {plan.tp_size}); build the plan with shard_experts="
                         "config.enable_expert_tensor_parallelism")
    if plan.shard_experts and user_expert:
        raise ValueError("S2MoEConfig.enable_expert_tensor_parallelism=True is invalid with a user expert module: "
                         "S2MoE can only split its own expert bank over TP; pass expert=None (the bank: "
                         "ffn_hidden_size, activation, expert_bias) or set enable_expert_tensor_parallelism=False")
