"""Causal self-attention (``F.scaled_dot_product_attention``) with optional rotary positions.

The qkv projection's output is laid out per head as ``[head, (q, k, v), head_dim]`` so that a
column-parallel split of it gives each tensor-parallel rank whole heads; the number of heads
is read from the projection's output, so it is the local head count under TP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linear import make_linear


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, half-split form) for ``[B, H, T, hd]`` tensors."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [T, hd/2]
        # buffers, not parameters: recomputed from the config, never checkpointed
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, rotary: Rotary = None):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.qkv = make_linear(d_model, 3 * d_model, bias=True, parallel="column")
        self.proj = make_linear(d_model, d_model, bias=True, parallel="row")
        self.proj.residual_projection = True  # scaled init (GPT-2)
        self.dropout = dropout
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)  # [B, T, H_local, 3, hd]
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [B, H, T, hd]
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))
