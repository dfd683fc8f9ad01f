"""S2MoE on Megatron-core: tensor-parallel groups, DeepSpeed's ``mpu``, and a layer spec.

- ``megatron_parallel_plan(config)``: the ``ParallelPlan`` of an S2MoE layer on Megatron's TP group
  (its input taken as replicated over TP; with ``enable_expert_tensor_parallelism`` each expert
  split over TP): ``S2MoE(config=cfg, plan=megatron_parallel_plan(cfg))``. ``S2MoEMLP`` passes it.
- ``use_megatron_parallel_state()``: after ``parallel_state.initialize_model_parallel(...)``,
  registers Megatron's TP group for the call sites that ask for it: layers with
  ``enable_expert_tensor_parallelism=True`` and ``ParallelPlan.from_registered_groups()``. A
  layer built without either stays a plain (not tensor-parallel) layer.
- ``megatron_mpu()``: ``megatron.core.parallel_state`` as ``deepspeed.initialize(mpu=...)`` needs it.
  megatron-core 0.16 dropped ``get_model_parallel_rank/world_size`` and
  ``get_data_parallel_group_ranks``, which DeepSpeed 0.19 calls (engine, checkpoint names, grad
  norm), so passing the module itself fails in ``deepspeed.initialize``; this adds them.
- ``S2MoEMLP`` and ``get_s2moe_layer_spec()``: S2MoE as the MLP of a Megatron-core
  ``TransformerLayer`` (so ``GPTModel`` can use it).

Imports megatron-core (a few seconds); ``s2moe_dist`` itself never imports this module.
"""
from __future__ import annotations

import types
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from ..config import S2MoEConfig, moe_config_from_dict
from ..parallel.plan import ParallelPlan, plan_for_config
from ..parallel.tensor_parallel import register_tensor_parallel_group


def use_megatron_parallel_state():
    """Register Megatron's TP group (``megatron_tensor_parallel_group()``) for the S2MoE call sites
    that ask for it (module docstring); returns it."""
    group = megatron_tensor_parallel_group()
    register_tensor_parallel_group(group)
    return group


def megatron_parallel_plan(config: S2MoEConfig) -> ParallelPlan:
    """The plan of an S2MoE layer of ``config`` on Megatron's TP group (TP size 1: no TP); EP over
    ``config.ep_size`` ranks in DeepSpeed's layout around it."""
    return plan_for_config(config, tp_group=megatron_tensor_parallel_group())


def megatron_tensor_parallel_group():
    """Megatron's TP group. Raises ValueError if Megatron's model parallelism is not initialised or
    uses what S2MoE does not support (PP, CP, Megatron's own expert parallelism: S2MoE's expert
    parallelism is its ``ep_size``)."""
    ps = parallel_state
    if not ps.model_parallel_is_initialized():
        raise ValueError("megatron.core.parallel_state is not initialised: call "
                         "parallel_state.initialize_model_parallel(tensor_model_parallel_size=N) "
                         "(after torch.distributed.init_process_group) before use_megatron_parallel_state()")
    for what, size in (("pipeline_model_parallel_size", ps.get_pipeline_model_parallel_world_size()),
                       ("context_parallel_size", ps.get_context_parallel_world_size()),
                       ("expert_model_parallel_size", ps.get_expert_model_parallel_world_size())):
        if size != 1:
            raise ValueError(f"Megatron {what}={size} is not supported with S2MoE: use 1 (S2MoE's expert "
                             "parallelism is S2MoEConfig.ep_size, on DeepSpeed's expert groups)")
    return ps.get_tensor_model_parallel_group()


def megatron_mpu():
    """``megatron.core.parallel_state`` plus the functions DeepSpeed 0.19 still calls on an ``mpu``:
    ``deepspeed.initialize(model=..., mpu=megatron_mpu())``. Model parallel = tensor parallel
    (pipeline parallelism is not supported here)."""
    ps = parallel_state
    mpu = types.SimpleNamespace(**{k: getattr(ps, k) for k in dir(ps) if k.startswith(("get_", "is_", "model_"))})
    mpu.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
    mpu.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
    mpu.get_model_parallel_group = ps.get_tensor_model_parallel_group
    mpu.get_data_parallel_group_ranks = lambda: dist.get_process_group_ranks(ps.get_data_parallel_group())
    return mpu


# ---- S2MoE as the MLP of a Megatron-core TransformerLayer -----------------------------------------
def _moe_config(moe_config: Union[S2MoEConfig, Mapping[str, Any]], config) -> S2MoEConfig:
    """S2MoEConfig for a layer of hidden size ``config.hidden_size``; a dict gets hidden_size and
    ffn_hidden_size from the Megatron config unless it sets them."""
    if isinstance(moe_config, S2MoEConfig):
        cfg = moe_config
    else:
        data = {"hidden_size": config.hidden_size, "ffn_hidden_size": config.ffn_hidden_size, **dict(moe_config)}
        cfg = moe_config_from_dict(data)
    if cfg.hidden_size != config.hidden_size:
        raise ValueError(f"S2MoEConfig.hidden_size={cfg.hidden_size} is invalid: the Megatron TransformerConfig "
                         f"has hidden_size={config.hidden_size}; they must be equal")
    return cfg


class S2MoEMLP(MegatronModule):
    """S2MoE in the MLP slot of a Megatron-core ``TransformerLayer``.

    ``forward(hidden_states [s, b, h], padding_mask=None) -> (output [s, b, h], None)``: Megatron's
    MLP contract (output, bias). In training the layer's ``alpha * L_bal + beta * L_u`` is attached
    to the output with Megatron's ``MoEAuxLossAutoScaler``: its gradient joins the backward pass, so
    Megatron's loss function needs no change (pass ``attach_aux_loss=False`` when the training loop
    adds ``s2moe_aux_loss(model)`` itself). Megatron's schedules scale that gradient only when
    ``config.num_moe_experts`` is set; otherwise, with several micro-batches, call
    ``MoEAuxLossAutoScaler.set_loss_scale(1 / num_microbatches)``. ``padding_mask`` is accepted and
    not used: padding tokens count in the S2MoE losses, as in DeepSpeed's MoE.

    TP group: ``parallel_state``'s when model parallelism is initialised (``megatron_parallel_plan``).
    Sequence parallelism is not supported (S2MoE takes its input replicated over TP).
    ``layer_cls``: ``S2MoELayer`` by default; ``s2moe_dist.S2MoE`` (a ``deepspeed.moe.layer.MoE``)
    when the model is trained with DeepSpeed's engine.
    """

    def __init__(self, config, moe_config, layer_cls=None, attach_aux_loss: bool = True, **unused):
        super().__init__(config=config)
        if getattr(config, "sequence_parallel", False):
            raise ValueError("TransformerConfig.sequence_parallel=True is invalid with the S2MoE MLP: S2MoE takes "
                             "its input replicated over tensor-parallel ranks; set sequence_parallel=False")
        if layer_cls is None:
            from ..moe.layer import S2MoELayer as layer_cls
        cfg = _moe_config(moe_config, config)
        plan = megatron_parallel_plan(cfg) if parallel_state.model_parallel_is_initialized() else None
        self.moe = layer_cls(config=cfg, plan=plan)
        # this adapter (or the caller's s2moe_aux_loss, attach_aux_loss=False) carries beta * L_u, with
        # Megatron's loss scale: the layer must not attach it a second time
        self.moe.attach_uncertainty_grad = False
        self.attach_aux_loss = attach_aux_loss
        self.layer_number = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **unused):
        out, _, _ = self.moe(hidden_states)
        if self.attach_aux_loss and self.training and torch.is_grad_enabled():
            out = MoEAuxLossAutoScaler.apply(out, self.moe.aux_loss())
        return out, None


def _gpt_layer_spec(use_transformer_engine: bool, **spec_kwargs):
    """Megatron's GPT layer spec: local (pure PyTorch) or Transformer Engine."""
    from megatron.core.models.gpt import gpt_layer_specs
    if not use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_local_spec(**spec_kwargs)
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        raise ValueError("use_transformer_engine=True needs NVIDIA Transformer Engine (transformer_engine), "
                         "which is not installed; use the local spec (use_transformer_engine=False)") from e
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)


def get_s2moe_layer_spec(moe_config: Union[S2MoEConfig, Mapping[str, Any]], *, use_transformer_engine: bool = False,
                         base_spec=None, layer_cls=None, attach_aux_loss: bool = True, **spec_kwargs):
    """``ModuleSpec`` of a Megatron-core ``TransformerLayer`` whose MLP is S2MoE.

    The rest of the layer is Megatron's GPT layer: ``get_gpt_layer_local_spec(**spec_kwargs)``, or
    ``get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)`` with ``use_transformer_engine``
    (GPU), or ``base_spec``. TE specs fuse the pre-MLP norm into their MLP's first linear, so it is
    put back here as a ``TENorm``. ``moe_config``: an ``S2MoEConfig`` or a dict of its fields
    (hidden_size / ffn_hidden_size default to the TransformerConfig's)."""
    import dataclasses

    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    if base_spec is None:
        base_spec = _gpt_layer_spec(use_transformer_engine, **spec_kwargs)
    sub = base_spec.submodules
    pre_mlp_norm = sub.pre_mlp_layernorm
    if pre_mlp_norm is IdentityOp:  # the norm lived inside the dense MLP (TE's fused LayerNormLinear)
        from megatron.core.extensions.transformer_engine import TENorm
        pre_mlp_norm = TENorm
    keys_map = {k: v for k, v in (sub.sharded_state_dict_keys_map or {}).items()
                if not k.startswith(("pre_mlp_layernorm", "mlp."))}
    mlp = ModuleSpec(module=S2MoEMLP, params={"moe_config": moe_config, "layer_cls": layer_cls,
                                               "attach_aux_loss": attach_aux_loss})
    sub = dataclasses.replace(sub, pre_mlp_layernorm=pre_mlp_norm, mlp=mlp, sharded_state_dict_keys_map=keys_map)
    return ModuleSpec(module=base_spec.module, params=dict(base_spec.params or {}), submodules=sub)


def get_s2moe_block_spec(num_layers: int, moe_config: Union[S2MoEConfig, Mapping[str, Any]], moe_every: int = 1,
                         *, use_transformer_engine: bool = False, base_spec=None, layer_cls=None,
                         attach_aux_loss: bool = True, **spec_kwargs):
    """``TransformerBlockSubmodules`` for ``GPTModel(transformer_layer_spec=...)``: layer i (from 0)
    has an S2MoE MLP when ``(i + 1) % moe_every == 0`` (the project's LM convention), Megatron's
    dense MLP otherwise."""
    from ..config import check_int
    check_int("get_s2moe_block_spec", "moe_every", moe_every, 1)
    check_int("get_s2moe_block_spec", "num_layers", num_layers, 1)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    if base_spec is None:
        base_spec = _gpt_layer_spec(use_transformer_engine, **spec_kwargs)
    moe = get_s2moe_layer_spec(moe_config, base_spec=base_spec, layer_cls=layer_cls, attach_aux_loss=attach_aux_loss)
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import LNImpl as final_norm  # Megatron's local choice
    specs = [moe if (i + 1) % moe_every == 0 else base_spec for i in range(num_layers)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
