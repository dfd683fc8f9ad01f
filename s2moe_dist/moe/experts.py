"""Expert banks. Both take expert-sorted tokens and per-expert counts.

``ExpertBank``: all local experts as one weight tensor per matrix, run as a grouped GEMM
(``torch.nn.functional.grouped_mm``). Layout (stable; checkpoints depend on it):
``w1`` [E_local, d, h] ([E_local, d, 2h] for swiglu: gate half then up half), ``w2`` [E_local, h, d],
optional ``b1`` [E_local, h|2h], ``b2`` [E_local, d].

``ModuleExperts``: a user-supplied expert module (DeepSpeed style), deep-copied per local expert
and run in a loop: slower, kept for drop-in compatibility.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects
    expanded (stride-0) gradients such as the one ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte aligned strides (fp32: multiples of 4 elements, bf16: of 8)
    return (t.shape[-1] * t.element_size()) % 16 == 0


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # grouped_mm wants matching dtypes; under autocast cast to the autocast dtype ourselves.
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dt), w.to(dt)
    elif w.dtype != x.dtype:
        x = x.to(w.dtype)
    if _aligned(x) and _aligned(w):
        return _ContiguousGrad.apply(F.grouped_mm(x.contiguous(), w, offs=offs))
    # odd sizes (tiny test shapes): one matmul per expert
    return torch.cat([c @ w[i] for i, c in enumerate(torch.split(x, counts.tolist()))], dim=0)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


class ExpertBank(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "gelu", bias: bool = False, first_expert: int = 0,
                 tp_size: int = 1, tp_rank: int = 0):
        """``tp_size > 1``: hold TP rank ``tp_rank``'s shard of each expert (layout: tp_shards.py):
        w1 [E_local, d, h/tp] (swiglu: 2h/tp), w2 [E_local, h/tp, d]; b2 whole."""
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.ffn_hidden_size = ffn_hidden_size  # full size, whatever tp_size
        self.tp_size, self.tp_rank = tp_size, tp_rank
        local = ffn_hidden_size // tp_size
        width = 2 * local if activation == "swiglu" else local
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden_size, width))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, local, hidden_size))
        self.b1 = nn.Parameter(torch.zeros(num_local_experts, width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_local_experts, hidden_size)) if bias else None
        self.reset_parameters(first_expert)

    def reset_parameters(self, first_expert: int = 0) -> None:
        """nn.Linear-style uniform init, one generator per GLOBAL expert id, seeded from the
        default RNG: the same experts come out whatever the expert- and tensor-parallel sizes
        (the full expert is drawn, then this TP rank's shard kept)."""
        from .tp_shards import shard_tensor
        base = int(torch.randint(0, 2**62, (1,)).item())
        d, h = self.w2.shape[2], self.ffn_hidden_size
        width = 2 * h if self.activation == "swiglu" else h
        shard = (lambda name, w: shard_tensor(name, w, self.tp_rank, self.tp_size, self.activation == "swiglu"))
        with torch.no_grad():
            for i in range(self.num_local_experts):
                g = torch.Generator().manual_seed(base + first_expert + i)
                w1 = torch.empty(d, width).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=g)
                w2 = torch.empty(h, d).uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h), generator=g)
                self.w1[i].copy_(shard("w1", w1))
                self.w2[i].copy_(shard("w2", w2))

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return F.silu(a) * b
        return F.gelu(h) if self.activation == "gelu" else F.relu(h)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, add_b2: bool = True) -> torch.Tensor:
        """x: [S, d] sorted by local expert; counts: [E_local] rows per expert (sum == S).
        ``add_b2=False``: leave b2 out (TP adds it once to the partial sums it reduces)."""
        if x.shape[0] == 0:
            # keep the parameters in the graph so every rank produces (zero) expert gradients
            zero = self.w1.sum() * 0 + self.w2.sum() * 0
            return x.new_zeros(0, self.w2.shape[2]) + zero.to(x.dtype)
        offs = _offsets(counts)
        h = _grouped_mm(x, self.w1, offs, counts)
        if self.b1 is not None:
            h = h + torch.repeat_interleave(self.b1, counts, dim=0, output_size=x.shape[0]).to(h.dtype)
        h = _grouped_mm(self._act(h), self.w2, offs, counts)
        if self.b2 is not None and add_b2:
            h = h + torch.repeat_interleave(self.b2, counts, dim=0, output_size=x.shape[0]).to(h.dtype)
        return h


class ModuleExperts(nn.Module):
    """DeepSpeed-style experts: ``expert`` deep-copied ``num_local_experts`` times."""

    def __init__(self, expert: nn.Module, num_local_experts: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x, counts.tolist(), dim=0)
        outs = []
        for expert, chunk in zip(self.experts, chunks):
            out = expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        if x.shape[0] == 0:
            zero = sum(p.sum() * 0 for p in self.parameters())
            return x.new_zeros(x.shape) + zero
        return torch.cat(outs, dim=0)
