"""Autograd row collectives over a tensor-parallel (TP) group, with uneven row counts.

The same regions as ``megatron.core.tensor_parallel.mappings`` (scatter / gather / reduce-scatter
along the first dimension), rewritten because Megatron's allocate their outputs with
``torch.cuda.current_device()`` and its uneven variants use list collectives that gloo refuses
for unequal sizes. Here rows are padded to the largest share and moved with
``all_gather_into_tensor`` / ``reduce_scatter``, which both gloo and NCCL provide.

``sizes[r]`` is the number of rows TP rank r holds; every rank passes the same ``sizes``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

# torch >= 2.13 names (the *_tensor ones warn there); older torch has only the *_tensor ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def split_sizes(num_rows: int, world: int) -> List[int]:
    """Row counts of ``torch.tensor_split(x, world)``: the first ``num_rows % world`` get one more."""
    base, extra = divmod(num_rows, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))], dim=0)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (no autograd)."""
    world, most = len(sizes), max(sizes)
    if world == 1:
        return x
    if most == 0:
        return x.new_empty((0,) + tuple(x.shape[1:]))
    out = x.new_empty((world * most,) + tuple(x.shape[1:]))
    _all_gather(out, _pad_rows(x.contiguous(), most), group=group)
    if all(s == most for s in sizes):
        return out
    return torch.cat([out[r * most:r * most + s] for r, s in enumerate(sizes)], dim=0)


def reduce_scatter_rows_(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Sum ``x`` [sum(sizes), ...] over the ranks and keep this rank's rows (no autograd)."""
    world, most = len(sizes), max(sizes)
    if world == 1:
        return x
    me = dist.get_rank(group)
    if most == 0:
        return x.new_empty((0,) + tuple(x.shape[1:]))
    if any(s != most for s in sizes):
        x = torch.cat([_pad_rows(c, most) for c in torch.split(x, list(sizes), dim=0)], dim=0)
    out = x.new_empty((most,) + tuple(x.shape[1:]))
    _reduce_scatter(out, x.contiguous(), group=group)
    return out[:sizes[me]]


def _own_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    me = dist.get_rank(group)
    start = sum(sizes[:me])
    return x[start:start + sizes[me]]


class _Scatter(torch.autograd.Function):
    """Forward: keep this rank's rows of a tensor replicated over TP. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _own_rows(x, sizes, group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad, ctx.sizes, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """Forward: all-gather rows. Backward: this rank's rows of the gradient, summed over TP first
    when ``reduce_grad`` (the gathered rows fed a TP-split computation, each rank holding a part
    of their gradient), taken as they are otherwise (the computation after was replicated)."""

    @staticmethod
    def forward(ctx, x, sizes, group, reduce_grad):
        ctx.sizes, ctx.group, ctx.reduce_grad = sizes, group, reduce_grad
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return reduce_scatter_rows_(grad, ctx.sizes, ctx.group), None, None, None
        return _own_rows(grad, ctx.sizes, ctx.group).contiguous(), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: sum partial rows over TP, keep this rank's rows. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return reduce_scatter_rows_(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


class _FirstRankOnly(torch.autograd.Function):
    """Forward: ``x`` on TP rank 0, zeros elsewhere (a term added once to partial sums that are
    then reduced). Backward: the gradient unchanged on every rank, so a replicated parameter gets
    the same, complete gradient on all TP ranks."""

    @staticmethod
    def forward(ctx, x, first):
        return x.clone() if first else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def scatter_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return _Scatter.apply(x, list(sizes), group)


def gather_rows(x: torch.Tensor, sizes: Sequence[int], group, reduce_grad: bool) -> torch.Tensor:
    return _Gather.apply(x, list(sizes), group, reduce_grad)


def reduce_scatter_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return _ReduceScatter.apply(x, list(sizes), group)


def first_rank_only(x: torch.Tensor, group) -> torch.Tensor:
    return _FirstRankOnly.apply(x, dist.get_rank(group) == 0)


def all_gather_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """[n] ints from every rank -> [world, n] (no autograd)."""
    world = dist.get_world_size(group)
    out = counts.new_empty(world * counts.numel())
    _all_gather(out, counts.contiguous().view(-1), group=group)
    return out.view((world,) + tuple(counts.shape))
