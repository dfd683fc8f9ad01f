"""The one place the model's dense linear layers come from.

Every dense projection is built by ``make_linear(in, out, bias=..., parallel=...)`` where
``parallel`` says how a tensor-parallel implementation splits it: ``"column"`` (output dim
split: qkv, MLP up), ``"row"`` (input dim split: attention out, MLP down) or ``None``
(replicated: the LM head). The default factory returns ``torch.nn.Linear``; the trainer installs
``s2moe_dist.integrations.megatron_linear.MegatronLinearFactory`` (``megatron.core.tensor_parallel``
layers) with ``set_linear_factory`` when ``model.tp_size > 1``. A factory must return a module
whose ``forward(x)`` returns a tensor; a factory with a ``tp_size`` attribute builds layers for
that TP size (default 1). Every module made here carries ``tp_parallel`` (its ``parallel``).

Tensor-parallel layers hold one shard of the full ``[out, in]`` weight (``ShardedLinear``):
TP rank t of n holds rows ``[t*out/n, (t+1)*out/n)`` of a column-parallel weight and bias, and
columns ``[t*in/n, (t+1)*in/n)`` of a row-parallel weight (its bias is whole, added once after
the reduction). ``shard_linear_tensor`` / ``merge_linear_tensors`` are that layout;
``CharLM._init_weights`` draws every weight at full size and loads the shard, so a model has the
same weights for every TP size given the same seed.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

PARALLEL_KINDS = (None, "column", "row")

LinearFactory = Callable[..., nn.Module]


def torch_linear(in_features: int, out_features: int, *, bias: bool = True,
                 parallel: Optional[str] = None) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


_factory: LinearFactory = torch_linear


def set_linear_factory(factory: Optional[LinearFactory]) -> LinearFactory:
    """Install ``factory`` (``None``: back to ``torch.nn.Linear``); returns the previous one."""
    global _factory
    previous = _factory
    _factory = factory or torch_linear
    return previous


def linear_tp_size() -> int:
    """The TP size the installed factory builds layers for (1: plain ``torch.nn.Linear``)."""
    return int(getattr(_factory, "tp_size", 1))


def make_linear(in_features: int, out_features: int, *, bias: bool = True,
                parallel: Optional[str] = None) -> nn.Module:
    if parallel not in PARALLEL_KINDS:
        raise ValueError(f"make_linear(parallel={parallel!r}) is invalid: must be one of {list(PARALLEL_KINDS)}")
    module = _factory(in_features, out_features, bias=bias, parallel=parallel)
    module.tp_parallel = parallel  # read by checkpoint merging (which dim a shard splits)
    return module


# ---- the TP layout of a dense linear -------------------------------------------------------------
def _split_dim(parallel: Optional[str], name: str) -> Optional[int]:
    """Dim of the full tensor (``weight`` [out, in] or ``bias`` [out]) split over TP, or None."""
    if parallel == "column":
        return 0
    if parallel == "row" and name == "weight":
        return 1
    return None


def shard_linear_tensor(full: torch.Tensor, parallel: Optional[str], name: str, tp_rank: int,
                        tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of the full ``weight`` / ``bias`` of a ``parallel`` linear."""
    dim = _split_dim(parallel, name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(f"a {parallel}-parallel {name} of shape {tuple(full.shape)} cannot be split over "
                         f"tp_size={tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def merge_linear_tensors(shards: Sequence[torch.Tensor], parallel: Optional[str], name: str) -> torch.Tensor:
    """Inverse of ``shard_linear_tensor`` over all TP ranks (replicated tensors: rank 0's)."""
    dim = _split_dim(parallel, name)
    return shards[0] if dim is None or len(shards) == 1 else torch.cat(list(shards), dim=dim)


class ShardedLinear:
    """Mixin of tensor-parallel linear modules (``weight``/``bias`` hold this rank's shard).
    Subclasses set ``in_features``, ``out_features``, ``tp_parallel``, ``tp_rank``, ``tp_size``."""

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Copy this rank's shard of the full ``weight`` [out, in] (and ``bias`` [out])."""
        args = (self.tp_parallel, self.tp_rank, self.tp_size)
        self.weight.copy_(shard_linear_tensor(weight, args[0], "weight", *args[1:]))
        if self.bias is not None and bias is not None:
            self.bias.copy_(shard_linear_tensor(bias, args[0], "bias", *args[1:]))

    def reset_parameters_like_torch_(self) -> None:
        """``torch.nn.Linear``'s init at full size (same random draws), then this rank's shard: a
        model built under TP consumes the RNG as the TP=1 model does."""
        weight = torch.empty(self.out_features, self.in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bias = None
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            bias = torch.empty(self.out_features).uniform_(-bound, bound)
        self.load_full_(weight, bias)


@torch.no_grad()
def init_linear_(module: nn.Module, std: float) -> bool:
    """GPT-2 init of a dense linear made by ``make_linear``: weight N(0, std) drawn at full size,
    bias 0. Returns False if ``module`` is not such a linear."""
    if isinstance(module, ShardedLinear):
        module.load_full_(torch.empty(module.out_features, module.in_features).normal_(0.0, std),
                          torch.zeros(module.out_features))
        return True
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        return True
    return False
