"""Router baselines of the S2MoE paper, selected by ``S2MoEConfig.router_type`` (docs/design.md 1.2).

Every router returns a ``Routing`` through the same top-k / capacity / combine-weight code as
``TopKRouter`` (``TopKRouter.route_probs``), so both S2MoE streams, the dispatchers, eval_k and
capacity drops work unchanged. Only how the token-expert scores are made differs.

``topk`` (default): ``TopKRouter``, ``logits = x W_r``; parameter ``router.weight`` [E, d].

``xmoe``: X-MoE, Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts"
(arXiv 2204.09179). Tokens are projected to a low dimension r (``router_dim``, paper: 16), and
``logits_e = cos(P x, e_e) / tau``: both the projected token and the expert embedding are
L2-normalised, tau a learnable temperature (``router_temperature``, paper init 0.07). Softmax,
top-k, Switch balance loss on those probabilities. Parameters ``router.proj.weight`` [r, d],
``router.expert_embeddings`` [E, r] (orthogonal init, gain 0.32, as the authors' code),
``router.temperature`` [1]. Differences from the authors' code (microsoft/torchscale
``component/xmoe/routing.py``; the S2MoE authors' SMoE family, giangdip2410/CompeteSMoE
``custom_gates.py``): there the token is not normalised, no temperature is applied and the expert
embeddings are rescaled in place to norm 1.5 at every forward; here we follow the paper (which
normalises both and learns tau) and never write parameters during a forward. tau is clamped at
``MIN_TEMPERATURE`` so logits stay bounded.

``stablemoe``: StableMoE, Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture of
Experts" (arXiv 2204.08396; authors' code Hunter-DDM/stablemoe ``fairseq/modules/moe_layer.py``).
Implemented: training stage 1 -- affinities ``s = x E^T`` with expert centroids
``router.expert_centroids`` [E, d] (orthogonal init, gain 0.1, as the authors' code), top-k by
affinity (a dot product as in the paper; the S2MoE authors' baseline takes a cosine), combine
weight ``sigmoid(s)`` of the chosen expert at k = 1 (the paper's gate; its layers are top-1), and
at k >= 2 the softmax of the chosen affinities (as the S2MoE authors'
StableMoE baseline at top-2), and the paper's balance loss

    L_bal = 1/T * sum_e (n_e - n_avg) / n_avg * sum_{t routed to e} sigmoid(s_{t,e})

(n_e slots routed to e, n_avg = T k / E; the paper sums over tokens, we divide by T so the
scale does not grow with the batch). Stage 2 (``freeze_router_after`` = N): training forwards
(micro-batches) 1..N route with the live centroids; at forward N+1 the centroids are copied into
the buffer ``router.frozen_centroids`` and routing DECISIONS use that frozen copy from then on,
while the combine weights keep using the live centroids (still trained through the gate, as in
the paper) and the balance loss is off. ``freeze_router_after=0``: frozen at the initial
centroids. Not implemented: the paper's distilled router (a word-embedding / CNN /
small-transformer router on token ids, distilled from stage 1 by cross-entropy): an FFN-slot
layer sees hidden states, not token ids. Our stage 2 therefore freezes the router's map from
hidden states to experts: routing still follows the hidden states, which keep changing as lower
layers train. Activation recomputation re-runs forwards and would advance the count twice.
The number of training forwards seen is saved in the state dict (``router._extra_state``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .router import Router, Routing, TopKRouter, expert_counts

ROUTER_TYPES = ("topk", "xmoe", "stablemoe")
MIN_TEMPERATURE = 0.01  # X-MoE: |logits| <= 1 / MIN_TEMPERATURE


@dataclass
class ScoredRouting(Routing):
    logits: Optional[torch.Tensor] = None  # [T, E] fp32 live affinities (StableMoE balance loss)
    balance_on: bool = True


class _ScoreRouter(Router):
    """Selection and drops by ``Router.route_probs``; combine weights from ``weight_scores``."""

    def _routing(self, select_logits, weight_scores, k, renormalize, **options) -> ScoredRouting:
        probs = torch.softmax(select_logits, dim=-1)
        r = self.route_probs(probs, select_logits, k, False, **options)
        weights = weight_scores.gather(1, r.expert_idx)
        if not r.dropless:
            weights = weights * (r.dispatch_idx >= 0)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return ScoredRouting(probs=probs, expert_idx=r.expert_idx, dispatch_idx=r.dispatch_idx,
                             weights=weights, num_dropped=r.num_dropped)


class XMoERouter(_ScoreRouter):
    def __init__(self, hidden_size: int, num_experts: int, router_dim: int = 16, temperature: float = 0.07):
        super().__init__(num_experts)
        self.proj = nn.Linear(hidden_size, router_dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, router_dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)
        self.temperature = nn.Parameter(torch.full((1,), float(temperature)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(F.linear(x.float(), self.proj.weight.float()), dim=-1)
            e = F.normalize(self.expert_embeddings.float(), dim=-1)
            return (z @ e.t()) / self.temperature.float().clamp_min(MIN_TEMPERATURE)

    def forward(self, x, k, renormalize, **options) -> ScoredRouting:
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        return self._routing(logits, probs, k, renormalize, **options)


class StableMoERouter(_ScoreRouter):
    def __init__(self, hidden_size: int, num_experts: int, freeze_after: Optional[int] = None):
        super().__init__(num_experts)
        self.expert_centroids = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.orthogonal_(self.expert_centroids, gain=0.1)
        self.register_buffer("frozen_centroids", self.expert_centroids.detach().clone())
        self.freeze_after = freeze_after
        self.num_updates = 0

    # ---- two-stage schedule -------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """Stage 2: training forwards 1..N route with the live centroids, N+1.. with the frozen copy."""
        return self.freeze_after is not None and self.num_updates > self.freeze_after

    def step(self) -> None:
        """A training forward of the layer starts (``Router.step``, called by ``S2MoELayer``)."""
        self.num_updates += 1
        if self.freeze_after is not None and self.num_updates == self.freeze_after + 1:
            with torch.no_grad():  # stage 2 starts: the centroids after N updates fix the routing
                self.frozen_centroids.copy_(self.expert_centroids)

    def get_extra_state(self):
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state) -> None:
        self.num_updates = int(state["num_updates"])

    # ---- routing ------------------------------------------------------------------------
    @staticmethod
    def affinities(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), centroids.float())

    def forward(self, x, k, renormalize, **options) -> ScoredRouting:
        live = self.affinities(x, self.expert_centroids)
        select = self.affinities(x, self.frozen_centroids) if self.frozen else live
        weight_scores = torch.softmax(live, dim=-1) if renormalize else torch.sigmoid(live)
        r = self._routing(select, weight_scores, k, renormalize, **options)
        r.logits, r.balance_on = live, not self.frozen
        return r

    def balance_loss(self, r: ScoredRouting) -> torch.Tensor:
        """StableMoE's balance loss (module docstring); zero in stage 2."""
        T = r.logits.shape[0]
        if not r.balance_on or T == 0:
            return r.logits.sum() * 0.0
        idx = r.expert_idx
        counts = expert_counts(idx, self.num_experts).to(r.logits.dtype)
        n_avg = idx.numel() / self.num_experts
        scale = (counts - n_avg) / n_avg  # > 0: overloaded expert, its scores are pushed down
        chosen = torch.sigmoid(r.logits.gather(1, idx))
        return (scale[idx] * chosen).sum() / T


def build_router(cfg) -> Router:
    """The router of ``cfg.router_type`` (``S2MoEConfig``), with DeepSpeed's ``noisy_gate_policy``
    on the top-k router (``moe/noisy_gate.py``)."""
    if cfg.noisy_gate_policy is not None:
        from .noisy_gate import NoisyGateRouter
        return NoisyGateRouter(cfg.hidden_size, cfg.num_experts, cfg.noisy_gate_policy)
    if cfg.router_type == "xmoe":
        return XMoERouter(cfg.hidden_size, cfg.num_experts, cfg.router_dim, cfg.router_temperature)
    if cfg.router_type == "stablemoe":
        return StableMoERouter(cfg.hidden_size, cfg.num_experts, cfg.freeze_router_after)
    return TopKRouter(cfg.hidden_size, cfg.num_experts)
