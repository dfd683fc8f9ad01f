"""Expert-collapse diagnostics: how alike the experts of each MoE layer are.

Representation collapse (experts learning the same function) is what S2MoE's noise stream and
InfoNCE loss are meant to prevent. Every expert of a layer is applied to the SAME probe tokens
(the layer's inputs on a fixed probe batch, whatever the router would pick), and two numbers
summarise the [E, N, d] outputs:

- ``expert_cosine``: mean over token and expert pairs (i != j) of cos(out_i(x), out_j(x)).
  1 for identical experts, about 0 for unrelated ones.
- ``expert_effective_rank``: the entropy effective rank (Roy & Vetterli 2007) of the [E, N*d]
  matrix of each expert's flattened, unit-normalised outputs: exp(H(s / sum s)) of its singular
  values s. 1 for identical experts, up to E for experts with orthogonal outputs.

Under expert parallelism every rank measures its local experts and the outputs are gathered
over all ranks (one all-gather per layer), so the numbers cover all experts of the layer.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .layer import S2MoELayer

MEASURES = ("expert_cosine", "expert_effective_rank")


def expert_outputs(layer: S2MoELayer, x: torch.Tensor) -> torch.Tensor:
    """[E_local, N, d] float32: every local expert of ``layer`` applied to all N rows of ``x`` [N, d]."""
    E, N = layer.num_local_experts, x.shape[0]
    counts = torch.full((E,), N, dtype=torch.long, device=x.device)
    out = layer.experts(x.repeat(E, 1), counts)
    return out.reshape(E, N, -1).float()


def mean_pairwise_cosine(outs: torch.Tensor) -> float:
    """Mean of cos(outs[i, t], outs[j, t]) over tokens t and expert pairs i != j (NaN for E < 2)."""
    E = outs.shape[0]
    if E < 2:
        return float("nan")
    u = F.normalize(outs.double(), dim=-1)
    s = u.sum(dim=0)  # sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2, per token
    pair_sum = (s * s).sum(dim=-1) - (u * u).sum(dim=(0, -1))
    return float(pair_sum.mean() / (E * (E - 1)))


def effective_rank(outs: torch.Tensor) -> float:
    """Entropy effective rank of the [E, N*d] matrix of unit-normalised flattened expert outputs."""
    m = F.normalize(outs.double().reshape(outs.shape[0], -1), dim=1)
    s = torch.linalg.svdvals(m)
    s = s[s > s.max() * 1e-12] if s.numel() and float(s.max()) > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(math.exp(float(-(p * p.log()).sum())))


def _all_experts(layer: S2MoELayer, local: torch.Tensor) -> torch.Tensor:
    """[E, N, d]: the local outputs of every rank, ordered by global expert id (collective under EP)."""
    import torch.distributed as dist

    if layer.ep_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    firsts = [None] * dist.get_world_size()
    dist.all_gather(every, local.contiguous())
    dist.all_gather_object(firsts, int(layer.first_expert))
    by_first = {}
    for first, out in zip(firsts, every):  # data-parallel replicas hold the same experts: keep one
        by_first.setdefault(first, out)
    return torch.cat([by_first[f] for f in sorted(by_first)])


def measurable(layer: S2MoELayer) -> bool:
    """Tensor-parallel expert shards give partial sums per rank: those layers are not measured."""
    return not (layer.tp_plan is not None and layer.tp_plan.shard_experts)


def probe_batch(tokens, seq_len: int, device, sequences: int = 4) -> torch.Tensor:
    """The fixed probe: the first ``sequences`` windows of ``tokens`` (e.g. the validation split)."""
    n = min(sequences, max(1, (len(tokens) - 1) // seq_len))
    ids = torch.as_tensor(tokens[:n * seq_len], dtype=torch.long)
    return ids.reshape(n, seq_len).to(device)


@torch.no_grad()
def collapse_stats(model: torch.nn.Module, moe_layers: Sequence[Tuple[int, S2MoELayer]], probe: torch.Tensor,
                   max_tokens: int = 256) -> Dict[int, Dict[str, float]]:
    """{block index: {measure: value}} on the probe batch ``probe`` (token ids [B, T]).

    One eval-mode forward of ``model`` records each layer's input (every rank must call this
    under expert parallelism: the forward and the gather are collective). No random numbers
    are drawn, so training is unaffected."""
    layers = [(i, layer) for i, layer in moe_layers if measurable(layer)]
    inputs: Dict[int, torch.Tensor] = {}
    hooks: List = []
    for i, layer in layers:
        def keep(module, args, i=i):
            inputs[i] = args[0].reshape(-1, args[0].shape[-1])[:max_tokens].detach()
        hooks.append(layer.register_forward_pre_hook(keep))
    was_training = model.training
    model.eval()
    try:
        model(probe)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for i, layer in layers:
        outs = _all_experts(layer, expert_outputs(layer, inputs[i]))
        out[i] = {"expert_cosine": mean_pairwise_cosine(outs), "expert_effective_rank": effective_rank(outs)}
    return out
