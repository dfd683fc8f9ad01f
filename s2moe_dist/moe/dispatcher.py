"""Token dispatchers: (token, expert) slots -> expert-sorted rows -> experts -> weighted sum back.

``Dispatcher`` is the call every dispatcher implements; ``build_dispatcher(plan, num_experts)`` picks
one from the layer's ``ParallelPlan``: ``LocalDispatcher`` (ep_size 1) holds all experts,
``a2a_dispatcher.AllToAllDispatcher`` exchanges tokens over the EP group (and shares the
permutation helpers below), ``tp_dispatcher.TensorParallelDispatcher`` wraps either under TP. Dropless: rows are
sorted by expert and run with variable group sizes; nothing is padded to a capacity and no
[tokens, experts, capacity] one-hot tensor exists.

When no slot is dropped (dropless, the default) the expert order is a permutation of all N*k
slots, so both the gather of token rows and the combine are gathers by a permutation whose
backward is a gather by its inverse: no zero-filled [N, d] gradient and no scatter-add, which
on CPU cost ~5 ms per [16k, 256] buffer (first-touch page faults). With capacity drops the
general index_select / index_add path runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from .router import expert_counts


@runtime_checkable
class Dispatcher(Protocol):
    """Runs the experts on the tokens routed to them, wherever the experts live.

    ``tokens`` [N, d], ``dispatch_idx`` [N, k] global expert of each slot (-1: dropped), ``weights``
    [N, k], ``experts(rows, counts)`` the local experts; ``num_dropped``: the routing's count of -1
    slots (the int 0 when dropless: no host read needed). Returns ``(out [N, d], counts [E])``:
    the weighted sum of each token's expert outputs, and the kept slots per global expert."""
    num_experts: int

    def __call__(self, tokens: torch.Tensor, dispatch_idx: torch.Tensor, weights: torch.Tensor, experts,
                 num_dropped=None) -> Tuple[torch.Tensor, torch.Tensor]:
        ...


class _PermuteRows(torch.autograd.Function):
    """rows -> rows[perm] for a permutation: the backward is a gather by the inverse permutation,
    not index_select's zero-fill + scatter-add."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _PermuteRows.apply(x, perm, inverse)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _GatherAllSlots(torch.autograd.Function):
    """rows[i] = tokens[order[i] // k] for a permutation ``order`` of ALL N*k slots: each token's k
    slot gradients are gathered back by the inverse permutation and summed (no scatter)."""

    @staticmethod
    def forward(ctx, tokens, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return tokens.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return _sum_over_slots(g, ctx.k), None, None, None


def _sum_over_slots(rows: torch.Tensor, k: int) -> torch.Tensor:
    """[N*k, d] token-major -> [N, d]: sum of each token's k rows (slice adds: a strided
    ``sum(dim=1)`` over [N, k, d] is ~2.5x slower on CPU)."""
    if k == 1:
        return rows
    r = rows.view(rows.shape[0] // k, k, rows.shape[-1])
    out = r[:, 0] + r[:, 1]
    for j in range(2, k):
        out.add_(r[:, j])
    return out


class _WeightedSlotSum(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * rows[t*k + j] for token-major rows [N*k, d] and weights [N, k];
    the backward writes each slot's gradient into one [N*k, d] buffer (no zero fill, no ``out=`` into
    strided views, which torch.compile refuses)."""

    @staticmethod
    def forward(ctx, rows, w):
        k = w.shape[1]
        r = rows.view(w.shape[0], k, rows.shape[-1])
        out = r[:, 0] * w[:, 0:1]
        for j in range(1, k):
            out.addcmul_(r[:, j], w[:, j:j + 1])
        ctx.save_for_backward(rows, w)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, w = ctx.saved_tensors
        n, k = w.shape
        r = rows.view(n, k, rows.shape[-1])
        grad_rows = grad_w = None
        if ctx.needs_input_grad[0]:  # one broadcast multiply into the [N, k, d] buffer
            grad_rows = (grad.unsqueeze(1) * w.unsqueeze(-1)).view(n * k, rows.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([(grad * r[:, j]).sum(dim=-1) for j in range(k)], dim=1)
        return grad_rows, grad_w


@dataclass
class SortedSlots:
    order: torch.Tensor      # [R] slot id (token * k + choice) of each kept slot, in expert order
    counts: torch.Tensor     # [E] kept slots per (global) expert
    k: int
    token_weights: torch.Tensor  # [N, k] combine weights in token order
    inverse: Optional[torch.Tensor] = None  # inverse of ``order`` when no slot was dropped

    # the general (capacity-drop) path's views of the kept slots; the permutation path needs neither
    @property
    def token_idx(self) -> torch.Tensor:
        """[R] token row of each kept slot, in expert order."""
        return torch.div(self.order, self.k, rounding_mode="floor")

    @property
    def weights(self) -> torch.Tensor:
        """[R] combine weight of each kept slot, in expert order."""
        return self.token_weights.reshape(-1)[self.order]


def sort_slots(dispatch_idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
               num_dropped: Optional[Union[int, torch.Tensor]] = None) -> SortedSlots:
    """Sort the [N, k] slots by expert (stable: token order within an expert); drop -1 slots.

    ``num_dropped``: the routing's count of -1 slots (``Routing.num_dropped``). The int 0 (dropless)
    costs no host sync; a tensor, or None (counted here), is read once to size the kept slots."""
    n, k = dispatch_idx.shape
    flat_e = dispatch_idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    counts = expert_counts(flat_e, num_experts)
    if num_dropped is None:
        num_dropped = flat_e.numel() - counts.sum()
    dropped = int(num_dropped)  # a host sync unless the routing is dropless (a Python int)
    if dropped:
        order = order[dropped:]  # -1 (dropped) slots sort first
    return SortedSlots(order=order, counts=counts, k=k, token_weights=weights,
                       inverse=None if dropped else inverse_permutation(order))


def gather_tokens(tokens: torch.Tensor, slots: SortedSlots) -> torch.Tensor:
    """The token row of every kept slot, in expert order."""
    if slots.inverse is not None:
        return _GatherAllSlots.apply(tokens, slots.order, slots.inverse, slots.k)
    return tokens.index_select(0, slots.token_idx)


def combine(expert_out: torch.Tensor, slots: SortedSlots, num_tokens: int) -> torch.Tensor:
    """out[t] = sum over t's kept slots of weight * expert output."""
    if slots.inverse is not None:  # every slot kept: back to token order by the inverse permutation
        rows = permute_rows(expert_out, slots.inverse, slots.order)  # [N*k, d], token-major
        return _WeightedSlotSum.apply(rows, slots.token_weights.to(rows.dtype))
    weighted = expert_out * slots.weights.unsqueeze(-1).to(expert_out.dtype)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, slots.token_idx, weighted)


class LocalDispatcher(Dispatcher):
    """All experts on this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(self, tokens: torch.Tensor, dispatch_idx: torch.Tensor, weights: torch.Tensor, experts,
                 num_dropped=None):
        slots = sort_slots(dispatch_idx, weights, self.num_experts, num_dropped)
        expert_out = experts(gather_tokens(tokens, slots), slots.counts)
        return combine(expert_out, slots, tokens.shape[0]), slots.counts


def build_dispatcher(plan, num_experts: int) -> Dispatcher:
    """The dispatcher of a layer laid out by ``plan`` (a ``parallel.plan.ParallelPlan``). Makes the
    plan's default EP group if it has none (collective: call it where every rank does)."""
    if plan.ep_size == 1:
        inner: Dispatcher = LocalDispatcher(num_experts)
    else:
        from .a2a_dispatcher import AllToAllDispatcher  # imports this module
        inner = AllToAllDispatcher(num_experts, plan.ep_size, group=plan.dispatch_group())
    if not plan.tensor_parallel:
        return inner
    from .tp_dispatcher import TensorParallelDispatcher
    return TensorParallelDispatcher(inner, plan.tp_group, plan.shard_experts)
