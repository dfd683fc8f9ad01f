"""PR-MoE's residual path (``use_residual=True``; Rajbhandari et al. 2022, arXiv 2201.05596), as
DeepSpeed's ``MoE`` computes it:

    coef = softmax(coefficient(x))                  # [..., 2], coefficient = nn.Linear(d, 2)
    y    = moe(x) * coef[..., 0:1] + mlp(x) * coef[..., 1:]

``mlp`` is the expert module the caller passed (DeepSpeed uses that very module; S2MoE's experts
are deep copies of it) or, with S2MoE's built-in experts, a dense MLP of the experts' shape
(``fc1``, activation, ``fc2``). The residual MLP and the coefficient are dense parameters (reduced
over all data-parallel ranks). With S2MoE's two streams, ``moe(x)`` is the gated mix
``g * SMoE(x) + (1 - g) * SMoE(x_hat)``; the residual MLP and the coefficient see the clean input.
Parameter names (``mlp.*``, ``coefficient.*``) are DeepSpeed's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    """Dense ``fc2(act(fc1(x)))``; swiglu: ``fc1`` gives the gate half then the up half."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.activation = activation
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.fc1 = nn.Linear(hidden_size, width, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        for lin, fan_in in ((self.fc1, hidden_size), (self.fc2, ffn_hidden_size)):
            nn.init.uniform_(lin.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return self.fc2(h)


def residual_mix(moe_out: torch.Tensor, x: torch.Tensor, mlp: nn.Module, coefficient: nn.Module) -> torch.Tensor:
    """``moe_out * coef[..., 0:1] + mlp(x) * coef[..., 1:]``, ``coef = softmax(coefficient(x))``."""
    dense = mlp(x)
    if isinstance(dense, tuple):  # Megatron-style (output, bias): the bias is ignored, as DeepSpeed does
        dense = dense[0]
    coef = F.softmax(coefficient(x), dim=-1)
    return moe_out * coef[..., 0:1] + dense * coef[..., 1:]
