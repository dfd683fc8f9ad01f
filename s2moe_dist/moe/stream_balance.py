"""Switch balance loss of S2MoE's two streams routed together (docs/design.md 1.6).

The layer's loss is the mean of the clean and the noisy stream's balance losses. When one router
call routes both streams ([2T, E] probabilities, [2T, k] experts: dropless top-k), computing it
per stream means slicing the probabilities, and the backward of each [T, E] slice zero-fills a
[2T, E] gradient that autograd then adds up: here both streams are counted in one pass instead.
"""
from __future__ import annotations

import torch


def two_stream_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``0.5 * (balance_loss(probs[:T], idx[:T]) + balance_loss(probs[T:], idx[T:]))``.

    probs: [2T, E] router probabilities (fp32), clean rows then noisy rows; expert_idx: [2T, k].
    Per stream s: E * sum_e f_se * P_se with f_se = count_se / (T k) (no gradient) and
    P_se = mean_t probs (carries the gradient), so the mean over s is
    E / (2 T^2 k) * sum_{s,e} count_se * sum_t probs. Counts are summed in fp32: exact up to 2^24
    slots per expert and stream. No host sync (no bincount, no data-dependent shape).
    """
    two_t, k = expert_idx.shape
    T = two_t // 2
    if T == 0:
        return probs.sum() * 0.0
    E = num_experts
    ones = probs.new_ones(()).expand(2, T * k)
    counts = probs.new_zeros(2, E).scatter_add_(1, expert_idx.reshape(2, T * k), ones)
    # sum_t probs[s, t] . counts[s] as one bmm: its backward is one bmm too (a sum over t then a
    # dot would expand the gradient over [2, T, E] and copy it back to [2T, E])
    weighted = torch.bmm(probs.reshape(2, T, E), counts.unsqueeze(-1))
    return weighted.sum() * (E / (2.0 * T * T * k))
