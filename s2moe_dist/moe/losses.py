"""Auxiliary losses of S2MoE (docs/design.md 1.6): Switch balance loss and sampled InfoNCE."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .router import expert_counts


def balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style ``E * sum_e f_e * P_e``.

    probs: [T, E] router probabilities (fp32); expert_idx: [T, k] chosen experts.
    f_e: fraction of the T*k routed slots that go to expert e (no gradient);
    P_e: mean router probability of expert e (carries the gradient).
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    counts = expert_counts(expert_idx, num_experts).to(probs.dtype)  # no host sync (bincount has two)
    f = counts / expert_idx.numel()
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def sample_token_rows(num_tokens: int, max_tokens: int, device, generator: Optional[torch.Generator] = None):
    """Indices of at most ``max_tokens`` distinct tokens, or None when all tokens fit."""
    if num_tokens <= max_tokens:
        return None
    return torch.randperm(num_tokens, device=device, generator=generator)[:max_tokens]


def infonce_loss(z: torch.Tensor, z_hat: torch.Tensor, temperature: float,
                 max_tokens: int = 1024, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """InfoNCE between clean and noisy views of the same tokens.

    Rows of z / z_hat ([T, d]) are L2-normalised; logits = z z_hat^T / tau; cross-entropy with
    the diagonal (same token) as target. A random sample of at most ``max_tokens`` tokens bounds
    the logits matrix to max_tokens^2 whatever T is.
    """
    rows = sample_token_rows(z.shape[0], max_tokens, z.device, generator)
    if rows is not None:
        z, z_hat = z.index_select(0, rows), z_hat.index_select(0, rows)
    return _infonce(z, z_hat, temperature)


def infonce_loss_stacked(streams: torch.Tensor, temperature: float, max_tokens: int = 1024,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``infonce_loss(streams[:T], streams[T:])`` for the layer's [2T, d] stack of clean and noisy
    rows (same sample for the same generator state). Both views' sampled rows are gathered with ONE
    index_select, so the backward zero-fills one [2T, d] gradient instead of two [T, d] ones."""
    T = streams.shape[0] // 2
    rows = sample_token_rows(T, max_tokens, streams.device, generator)
    if rows is None:
        return _infonce(streams[:T], streams[T:], temperature)
    both = streams.index_select(0, torch.cat([rows, rows + T]))
    return _infonce(both[:rows.numel()], both[rows.numel():], temperature)


def _infonce(z: torch.Tensor, z_hat: torch.Tensor, temperature: float) -> torch.Tensor:
    if z.shape[0] < 2:
        return z.sum() * 0.0
    z = F.normalize(z.float(), dim=-1)
    z_hat = F.normalize(z_hat.float(), dim=-1)
    logits = z @ z_hat.t() / temperature
    target = torch.arange(z.shape[0], device=z.device)
    return F.cross_entropy(logits, target)


def infonce_accuracy(z: torch.Tensor, z_hat: torch.Tensor, max_tokens: int = 1024) -> float:
    """Fraction of sampled tokens whose nearest noisy view is their own (a health metric)."""
    with torch.no_grad():
        rows = sample_token_rows(z.shape[0], max_tokens, z.device)
        if rows is not None:
            z, z_hat = z[rows], z_hat[rows]
        if z.shape[0] < 2:
            return 1.0
        sim = F.normalize(z.float(), dim=-1) @ F.normalize(z_hat.float(), dim=-1).t()
        return (sim.argmax(dim=1) == torch.arange(z.shape[0], device=z.device)).float().mean().item()
