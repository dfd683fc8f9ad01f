"""S2MoE on Megatron-core: tensor-parallel groups, DeepSpeed's ``mpu``, and a layer spec.

- ``use_megatron_parallel_state()``: after ``parallel_state.initialize_model_parallel(...)``,
  registers Megatron's TP group for S2MoE layers built afterwards (their input is taken as
  replicated over TP; with ``enable_expert_tensor_parallelism`` each expert is split over TP).
- ``megatron_mpu()``: ``megatron.core.parallel_state`` as ``deepspeed.initialize(mpu=...)`` needs it.
  megatron-core 0.16 dropped ``get_model_parallel_rank/world_size`` and
  ``get_data_parallel_group_ranks``, which DeepSpeed 0.19 calls (engine, checkpoint names, grad
  norm), so passing the module itself fails in ``deepspeed.initialize``; this adds them.
- ``S2MoEMLP`` and ``get_s2moe_layer_spec()``: S2MoE as the MLP of a Megatron-core
  ``TransformerLayer`` (so ``GPTModel`` can use it).

Megatron is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import types
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..config import S2MoEConfig
from ..parallel.tensor_parallel import set_tensor_parallel_group


def _parallel_state():
    from megatron.core import parallel_state
    return parallel_state


def use_megatron_parallel_state():
    """Register Megatron's TP group for S2MoE layers; returns it. Raises ValueError if Megatron's
    model parallelism is not initialised or uses what S2MoE does not support (PP, CP, Megatron's
    own expert parallelism: S2MoE's expert parallelism is its ``ep_size``)."""
    ps = _parallel_state()
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
    group = ps.get_tensor_model_parallel_group()
    set_tensor_parallel_group(group)
    return group


def megatron_mpu():
    """``megatron.core.parallel_state`` plus the functions DeepSpeed 0.19 still calls on an ``mpu``:
    ``deepspeed.initialize(model=..., mpu=megatron_mpu())``. Model parallel = tensor parallel
    (pipeline parallelism is not supported here)."""
    ps = _parallel_state()
    mpu = types.SimpleNamespace(**{k: getattr(ps, k) for k in dir(ps) if k.startswith(("get_", "is_", "model_"))})
    mpu.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
    mpu.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
    mpu.get_model_parallel_group = ps.get_tensor_model_parallel_group
    mpu.get_data_parallel_group_ranks = lambda: dist.get_process_group_ranks(ps.get_data_parallel_group())
    return mpu
