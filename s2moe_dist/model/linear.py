"""The one place the model's dense linear layers come from.

Every dense projection is built by ``make_linear(in, out, bias=..., parallel=...)`` where
``parallel`` says how a tensor-parallel implementation would split it: ``"column"`` (output
dim split: qkv, MLP up), ``"row"`` (input dim split: attention out, MLP down) or ``None``
(replicated: the LM head). The Megatron integration installs a factory that returns
``megatron.core.tensor_parallel`` layers with ``set_linear_factory``; the default is
``torch.nn.Linear``. A factory must return a module whose ``forward(x)`` returns a tensor.
"""
from __future__ import annotations

from typing import Callable, Optional

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


def make_linear(in_features: int, out_features: int, *, bias: bool = True,
                parallel: Optional[str] = None) -> nn.Module:
    if parallel not in PARALLEL_KINDS:
        raise ValueError(f"make_linear(parallel={parallel!r}) is invalid: must be one of {list(PARALLEL_KINDS)}")
    return _factory(in_features, out_features, bias=bias, parallel=parallel)
