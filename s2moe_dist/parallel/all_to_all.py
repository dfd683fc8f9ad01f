"""Autograd all-to-all with variable split sizes (gloo and NCCL).

Backward is the same exchange with the splits swapped, so a gradient takes the reverse path.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def exchange(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group=None) -> torch.Tensor:
    """One ``all_to_all_single`` on rows of ``x`` (no autograd)."""
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(output_splits),
                           input_split_sizes=list(input_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return exchange(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group=None) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: rows ``input_splits[r]`` go to rank r, rows
    ``output_splits[r]`` come from rank r (ranks of ``group``)."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def exchange_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Equal-split all-to-all of a small int tensor [world * n] -> [world * n] (no autograd)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
