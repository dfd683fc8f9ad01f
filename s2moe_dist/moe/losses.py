"""Auxiliary losses of S2MoE (docs/design.md 1.6): Switch balance loss (sampled InfoNCE: infonce.py)."""
from __future__ import annotations

import torch

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


# InfoNCE lives in infonce.py; re-exported for existing imports
from .infonce import infonce_accuracy, infonce_loss, infonce_loss_stacked, sample_token_rows  # noqa: E402,F401
