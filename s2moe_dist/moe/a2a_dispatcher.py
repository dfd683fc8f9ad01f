"""Expert-parallel dispatcher: both S2MoE streams in ONE all-to-all there and ONE back.

Per forward (training: the clean and noisy slots already concatenated by the layer):
  1. sort the kept (token, expert) slots by global expert: since rank r owns the contiguous experts
     [r*E_l, (r+1)*E_l), this is also the order of destination ranks;
  2. exchange per-expert counts (one small equal-split all-to-all);
  3. ONE all-to-all of token rows to the expert owners (variable splits, dropless);
  4. regroup the received rows from (source rank, expert) to (expert, source rank) order and run the
     local experts as one grouped GEMM;
  5. undo the regrouping, ONE all-to-all back, weighted sum into token rows.
Backward mirrors 3 and 5: two all-to-alls. Every rank joins every collective whatever the routing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..parallel.all_to_all import all_to_all, exchange_counts
from .dispatcher import Dispatcher, combine, gather_tokens, inverse_permutation, permute_rows, sort_slots


def source_to_expert_order(recv_counts: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Row permutation taking rows ordered (source rank, local expert) to (local expert, source rank).

    recv_counts: [ep, E_local] rows received from each source for each local expert;
    total: their sum when the caller knows it on the host (else read from the device: a sync).
    """
    ep, e_local = recv_counts.shape
    if total is None:
        total = int(recv_counts.sum())
    chunk = torch.repeat_interleave(torch.arange(ep * e_local, device=recv_counts.device),
                                    recv_counts.reshape(-1), output_size=total)
    key = (chunk % e_local) * ep + torch.div(chunk, e_local, rounding_mode="floor")
    return torch.argsort(key, stable=True)


class AllToAllDispatcher(Dispatcher):
    """Experts split over the ranks of ``group`` (None: the default EP group of ``ep_size``, made on
    first use; layers pass their plan's, ``build_dispatcher``)."""

    def __init__(self, num_experts: int, ep_size: int, group=None):
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self._group = group

    @property
    def group(self):
        if self._group is None:  # no DeepSpeed: our own groups, DeepSpeed's layout
            from ..parallel.groups import get_expert_parallel_group
            self._group = get_expert_parallel_group(self.ep_size)
        return self._group

    def __call__(self, tokens: torch.Tensor, dispatch_idx: torch.Tensor, weights: torch.Tensor, experts,
                 num_dropped=None):
        group, ep, e_local = self.group, self.ep_size, self.num_local_experts
        slots = sort_slots(dispatch_idx, weights, self.num_experts, num_dropped)
        send = gather_tokens(tokens, slots)
        if torch.is_grad_enabled() and not send.requires_grad:
            # every rank must run both backward all-to-alls, or the ranks that do wait forever
            send = send.detach().requires_grad_()

        recv_counts = exchange_counts(slots.counts, group).view(ep, e_local)     # a2a #1 (counts)
        # the one host sync of a dropless step: the split sizes are data-dependent, as in every
        # dropless MoE; both directions' sizes come back in ONE device-to-host copy
        splits = torch.cat([slots.counts.view(ep, e_local).sum(1), recv_counts.sum(1)]).tolist()
        input_splits, output_splits = splits[:ep], splits[ep:]
        recv = all_to_all(send, output_splits, input_splits, group)              # a2a #2 (there)

        perm = source_to_expert_order(recv_counts, total=sum(output_splits))
        inverse = inverse_permutation(perm)
        local_out = experts(permute_rows(recv, perm, inverse), recv_counts.sum(0))
        if recv.shape[0] == 0:
            # nothing arrived: keep `recv` in the graph so this rank's backward joins the exchange
            local_out = local_out + recv.sum() * 0
        back = all_to_all(permute_rows(local_out, inverse, perm), input_splits, output_splits, group)  # a2a #3
        return combine(back, slots, tokens.shape[0]), slots.counts
