"""S2MoE under Megatron tensor parallelism (TP), as Megatron-DeepSpeed combines TP with expert
parallelism (EP).

The layer's input is replicated over the TP group. Routing, the gate and the noise are computed on
every TP rank on all tokens (identical results: same weights, same tokens, and the noise drawn
from the default RNG, which Megatron keeps identical over TP since its own dropout on the
replicated residual stream relies on that; no broadcast is needed). Then
``TensorParallelDispatcher``:

1. splits the (token, expert) rows over the TP ranks (``tensor_split`` order): each token goes
   through the EP all-to-all from ONE TP rank, not from all of them;
2. runs the inner dispatcher (``LocalDispatcher`` at EP=1, ``AllToAllDispatcher`` on the EP group;
   ``dispatcher.build_dispatcher`` builds both from the layer's ``ParallelPlan``) on its share;
3. all-gathers the combined rows, so every TP rank holds the full output again.

With ``enable_expert_tensor_parallelism`` each expert is split over TP (w1 column-, w2
row-parallel, layout in ``tp_shards.py``) and ``TensorParallelExperts`` runs them: the rows that
reached this rank's expert shards are all-gathered over TP (each TP rank received other tokens for
the same experts), every rank computes its slice of the hidden layer on all of them, and the
partial outputs are reduce-scattered back to the rank that received each row. Without it, every
rank holds whole experts (EP groups may then contain TP peers, DeepSpeed's TP-blind layout) and
computes only the rows it received.

Backward: the split's gradient is all-gathered (a replicated tensor gets its full gradient on every
TP rank); the final gather's is split (the gradient arriving is replicated over TP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.tp_mappings import (all_gather_counts, first_rank_only, gather_rows, reduce_scatter_rows,
                                    scatter_rows, split_sizes)
from .a2a_dispatcher import source_to_expert_order
from .dispatcher import Dispatcher
from .router import expert_counts

NO_TP_GROUP_ERROR = (
    "S2MoEConfig.enable_expert_tensor_parallelism=True is invalid here: no tensor-parallel group is "
    "registered. With Megatron, call megatron.core.parallel_state.initialize_model_parallel("
    "tensor_model_parallel_size=N) and then s2moe_dist.integrations.megatron.use_megatron_parallel_state() "
    "before building the layer (or pass plan=s2moe_dist.parallel.plan.make_parallel_plan(ep_size, tp_group=group, "
    "shard_experts=True)); without tensor parallelism set enable_expert_tensor_parallelism=False")


class TensorParallelExperts:
    """Runs an ``ExpertBank`` holding this TP rank's shard of every local expert on the rows that
    reached any TP rank of the group (see module docstring). Same call as the bank."""

    def __init__(self, bank, group):
        self.bank = bank
        self.group = group

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        group = self.group
        if torch.is_grad_enabled() and not x.requires_grad:
            # every TP rank must run the backward collectives, whatever reached it
            x = x.detach().requires_grad_()
        all_counts = all_gather_counts(counts, group)          # [tp, E_local], tiny
        sizes = all_counts.sum(1).tolist()
        rows = gather_rows(x, sizes, group, reduce_grad=True)  # (TP source, expert) order
        perm = source_to_expert_order(all_counts, total=sum(sizes))
        expert_counts = all_counts.sum(0)
        out = self.bank(rows.index_select(0, perm), expert_counts, add_b2=False)
        if self.bank.b2 is not None:  # added once (TP rank 0) to the partial sums, full gradient on all
            b2 = first_rank_only(self.bank.b2, group)
            out = out + torch.repeat_interleave(b2, expert_counts, dim=0, output_size=out.shape[0]).to(out.dtype)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return reduce_scatter_rows(out.index_select(0, inverse), sizes, group)


class TensorParallelDispatcher(Dispatcher):
    """Same call as the other dispatchers: ``(tokens, dispatch_idx, weights, experts) -> (out, counts)``;
    ``tokens`` [N, d] and the routing are replicated over the TP group, ``out`` is too."""

    def __init__(self, inner, group, shard_experts: bool):
        self.inner = inner
        self.group = group
        self.shard_experts = shard_experts
        self.num_experts = inner.num_experts

    def __call__(self, tokens: torch.Tensor, dispatch_idx: torch.Tensor, weights: torch.Tensor, experts,
                 num_dropped=None):
        group = self.group
        sizes = split_sizes(tokens.shape[0], dist.get_world_size(group))
        start = sum(sizes[:dist.get_rank(group)])
        mine = slice(start, start + sizes[dist.get_rank(group)])
        own_tokens = scatter_rows(tokens, sizes, group)
        own_weights = scatter_rows(weights, sizes, group)
        runner = TensorParallelExperts(experts, group) if self.shard_experts else experts
        # dropless stays dropless on this rank's rows; a capacity count is of all rows (recounted there)
        own_dropped = 0 if isinstance(num_dropped, int) and num_dropped == 0 else None
        out, _ = self.inner(own_tokens, dispatch_idx[mine], own_weights, runner, num_dropped=own_dropped)
        out = gather_rows(out, sizes, group, reduce_grad=False)
        flat = dispatch_idx.reshape(-1)
        counts = expert_counts(flat, self.num_experts)  # all rows, no collective
        return out, counts
