"""DeepSpeed's ``noisy_gate_policy`` on the top-k router (``deepspeed/moe/sharded_moe.py``, 0.19.8).

- ``"Jitter"`` (training, any k): the router input is multiplied elementwise by U(1 - 1e-2, 1 + 1e-2)
  before the logits, so the choice AND the combine weights come from the jittered logits
  (DeepSpeed's ``multiplicative_jitter`` in ``TopKGate.forward``); the experts get the input unjittered.
- ``"RSample"`` (training, k = 1): the expert is ``argmax(logits + Gumbel(0, 1))``, while the
  combine weight and the balance loss use the probabilities of the un-noised logits (DeepSpeed's
  ``top1gating``). DeepSpeed's top-2 / top-k gates ignore the policy; so does this router at k >= 2
  (the layer warns at construction).
- ``None`` / ``"None"``: no noise. Evaluation is never noisy.

Both S2MoE streams are routed by this router, each with its own noise draw. The noise draws
consume the RNG in the order DeepSpeed's do (one ``torch.rand`` of the logits' / input's shape).
"""
from __future__ import annotations

import torch

from .router import Routing, TopKRouter

JITTER_EPS = 1e-2


def multiplicative_jitter(x: torch.Tensor, eps: float = JITTER_EPS) -> torch.Tensor:
    low = torch.tensor(1.0 - eps, device=x.device, dtype=x.dtype)
    high = torch.tensor(1.0 + eps, device=x.device, dtype=x.dtype)
    return x * (low + torch.rand(x.shape, device=x.device, dtype=x.dtype) * (high - low))


def gumbel_like(logits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples from U(tiny, 1 - eps), as ``torch.distributions.Gumbel``."""
    finfo = torch.finfo(logits.dtype)
    u = torch.rand(logits.shape, device=logits.device, dtype=logits.dtype)
    u = finfo.tiny + u * ((1 - finfo.eps) - finfo.tiny)
    return -torch.log(-torch.log(u))


class NoisyGateRouter(TopKRouter):
    """``TopKRouter`` (same ``weight`` parameter) with DeepSpeed's noisy gate policy."""

    routes_streams_jointly = False  # each stream draws its own noise, in DeepSpeed's RNG order

    def __init__(self, hidden_size: int, num_experts: int, policy: str):
        super().__init__(hidden_size, num_experts)
        if policy not in ("Jitter", "RSample"):
            raise ValueError(f"NoisyGateRouter.policy={policy!r} is invalid: must be 'Jitter' or 'RSample'")
        self.policy = policy

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.policy == "Jitter" and self.training:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return super().logits(multiplicative_jitter(x.float()))
        return super().logits(x)

    def forward(self, x: torch.Tensor, k: int, renormalize: bool, **kwargs) -> Routing:
        if not (self.policy == "RSample" and self.training and k == 1):
            return super().forward(x, k, renormalize, **kwargs)
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        noisy = logits + gumbel_like(logits)
        # choice (and capacity) from the noisy logits; weights and balance loss from the clean probs
        r = self.route_probs(torch.softmax(noisy, dim=-1), noisy, k, renormalize, **kwargs)
        weights = probs.gather(1, r.expert_idx) * (r.dispatch_idx >= 0)
        return Routing(probs=probs, expert_idx=r.expert_idx, dispatch_idx=r.dispatch_idx, weights=weights,
                       num_dropped=r.num_dropped)
