"""The character LM's dense layers from ``megatron.core.tensor_parallel`` (Megatron TP).

``MegatronLinearFactory()`` is a ``s2moe_dist.model.set_linear_factory`` factory: ``"column"``
layers are ``ColumnParallelLinear`` (output not gathered), ``"row"`` layers ``RowParallelLinear``
(input already split; output all-reduced over TP, bias added once), ``None`` a replicated
``torch.nn.Linear``. The attention's qkv output is laid out per head (``model/attention.py``), so
a column split gives each TP rank whole heads.

Weights are allocated on CPU (``use_cpu_initialization``; the engine moves the model to its
device) and Megatron's own initialisation is off (``perform_initialization=False``): on CPU it
would need the CUDA RNG tracker (``model_parallel_cuda_manual_seed``) on GPU. Each layer instead
draws ``torch.nn.Linear``'s init at FULL size from the default RNG and keeps its shard
(``model.linear.ShardedLinear``), and the model's GPT-2 init does the same, so the same seed
gives the same model at every TP size. Parameter names are ``weight``/``bias`` as with
``torch.nn.Linear``; state dicts also hold Megatron's ``_extra_state`` (None).

Needs ``megatron.core.parallel_state.initialize_model_parallel`` first (the TP group is read
from it). Sequence parallelism is not used.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from ..model.linear import ShardedLinear


def _unused_init(weight: torch.Tensor) -> None:  # perform_initialization=False: never called
    raise AssertionError("Megatron init is off; ShardedLinear initialises the weights")


def _setup(module, in_features: int, out_features: int, parallel: str) -> None:
    module.in_features, module.out_features, module.tp_parallel = in_features, out_features, parallel
    module.tp_rank = parallel_state.get_tensor_model_parallel_rank()
    module.tp_size = parallel_state.get_tensor_model_parallel_world_size()
    # Megatron sets these only when it initialises; DeepSpeed's grad norm counts TP shards by them
    set_tensor_model_parallel_attributes(module.weight, True, 0 if parallel == "column" else 1, 1)
    module.reset_parameters_like_torch_()


class MegatronColumnLinear(ShardedLinear, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose forward returns the (bias-added) output only."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, config: ModelParallelConfig):
        ColumnParallelLinear.__init__(self, in_features, out_features, config=config, init_method=_unused_init,
                                      bias=bias, gather_output=False, skip_bias_add=False)
        _setup(self, in_features, out_features, "column")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ColumnParallelLinear.forward(self, x)[0]


class MegatronRowLinear(ShardedLinear, RowParallelLinear):
    """``RowParallelLinear`` (input split over TP) whose forward returns the output only."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, config: ModelParallelConfig):
        RowParallelLinear.__init__(self, in_features, out_features, config=config, init_method=_unused_init,
                                   bias=bias, input_is_parallel=True, skip_bias_add=False)
        _setup(self, in_features, out_features, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RowParallelLinear.forward(self, x)[0]


class MegatronLinearFactory:
    """``make_linear`` factory for Megatron's TP group (``parallel_state`` must be initialised)."""

    def __init__(self, params_dtype: torch.dtype = torch.float32):
        if not parallel_state.model_parallel_is_initialized():
            raise ValueError("MegatronLinearFactory needs megatron.core.parallel_state.initialize_model_parallel("
                             "tensor_model_parallel_size=N) first")
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                          perform_initialization=False, gradient_accumulation_fusion=False,
                                          params_dtype=params_dtype)

    def __call__(self, in_features: int, out_features: int, *, bias: bool = True,
                 parallel: Optional[str] = None) -> nn.Module:
        if parallel == "column":
            return MegatronColumnLinear(in_features, out_features, bias=bias, config=self.config)
        if parallel == "row":
            return MegatronRowLinear(in_features, out_features, bias=bias, config=self.config)
        return nn.Linear(in_features, out_features, bias=bias)
