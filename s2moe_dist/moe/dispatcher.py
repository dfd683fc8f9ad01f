"""Token dispatchers: (token, expert) slots -> expert-sorted rows -> experts -> weighted sum back.

``LocalDispatcher`` (ep_size 1) holds all experts. The expert-parallel one lives in
``s2moe_dist.moe.a2a_dispatcher`` and shares the permutation helpers below. Dropless: rows are
sorted by expert and run with variable group sizes; nothing is padded to a capacity and no
[tokens, experts, capacity] one-hot tensor exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SortedSlots:
    token_idx: torch.Tensor  # [S] token row of each kept slot, in expert order
    weights: torch.Tensor    # [S] combine weight of each kept slot, in expert order
    counts: torch.Tensor     # [E] kept slots per (global) expert


def sort_slots(dispatch_idx: torch.Tensor, weights: torch.Tensor, num_experts: int) -> SortedSlots:
    """Sort the [N, k] slots by expert (stable: token order within an expert); drop -1 slots."""
    n, k = dispatch_idx.shape
    flat_e = dispatch_idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e[flat_e >= 0], minlength=num_experts)
    dropped = flat_e.numel() - int(counts.sum())
    order = order[dropped:]  # -1 (dropped) slots sort first
    return SortedSlots(token_idx=torch.div(order, k, rounding_mode="floor"),
                       weights=weights.reshape(-1)[order], counts=counts)


def combine(expert_out: torch.Tensor, slots: SortedSlots, num_tokens: int) -> torch.Tensor:
    """out[t] = sum over t's kept slots of weight * expert output."""
    weighted = expert_out * slots.weights.unsqueeze(-1).to(expert_out.dtype)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, slots.token_idx, weighted)


class LocalDispatcher:
    """All experts on this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(self, tokens: torch.Tensor, dispatch_idx: torch.Tensor, weights: torch.Tensor, experts):
        slots = sort_slots(dispatch_idx, weights, self.num_experts)
        expert_out = experts(tokens.index_select(0, slots.token_idx), slots.counts)
        return combine(expert_out, slots, tokens.shape[0]), slots.counts
