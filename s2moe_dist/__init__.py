"""s2moe_dist: S2MoE layers for DeepSpeed / Megatron pre-training.

``S2MoE`` is the layer as DeepSpeed's engine must see it (a ``deepspeed.moe.layer.MoE`` to
``isinstance``: ``s2moe_dist.integrations.deepspeed.DeepSpeedS2MoE``) when DeepSpeed is installed,
and the pure PyTorch ``S2MoELayer`` when it is not.

Every public name is resolved on first access (PEP 562): ``import s2moe_dist`` imports neither
torch nor DeepSpeed, so the console scripts install their SIGTERM / SIGUSR1 handlers within
milliseconds of start instead of after torch's 2-3 s import (a preemption signal in that window
killed the rank).

Package map (imports run downwards; ``tests/test_import_rule.py`` checks it from the source):

    config.py            S2MoEConfig: every layer field, validated, errors name the field
    deepspeed_args.py    DeepSpeed's call conventions (positional order, defaults) -> S2MoEConfig
    moe/                 the layer in pure PyTorch, one job per file
      layer.py             S2MoELayer: noise -> route both streams -> dispatch once -> experts -> gate/mix
      noise.py router.py router_variants.py noisy_gate.py experts.py mix.py infonce.py losses.py
      stream_balance.py stats.py aux_grad.py residual.py collapse.py
      dispatcher.py        the Dispatcher protocol, LocalDispatcher, build_dispatcher(plan)
      a2a_dispatcher.py tp_dispatcher.py   expert-parallel / tensor-parallel dispatch
      layer_plan.py        the plan a layer gets when none is passed in
    parallel/            process groups and collectives, nothing of training
      plan.py              ParallelPlan: EP/TP groups, sizes, ranks, decided once, passed in
      all_to_all.py tp_mappings.py groups.py tensor_parallel.py topology.py
    checkpoint/          the expert key scheme (keys.py) and everything that reads or writes checkpoints
    integrations/        deepspeed.py (the drop-in S2MoE), megatron*.py; thin re-exports of old paths
    model/ data/         the character LM and its corpora
    train/               s2moe-train: run_setup.py (checks before any process group), trainer.py (the
                         loop), loop_policy.py (pure decisions), state.py, signals.py, faults.py,
                         checkpoint.py, distributed.py, metrics.py
    testing/             instruments for tests and benchmarks (multi-process harness, host-sync counter)
    cli.py               s2moe-train / s2moe-eval / s2moe-ckpt
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
