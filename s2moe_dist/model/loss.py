"""LM loss with the S2MoE auxiliary terms: ``total = task + s2moe_aux_loss(model)``."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.layer import S2MoELayer, s2moe_aux_loss


class LossParts(NamedTuple):
    total: torch.Tensor        # task + balance + uncertainty (what is back-propagated)
    task: torch.Tensor         # mean next-character cross-entropy, nats
    balance: torch.Tensor      # sum over MoE layers of balance_coef * L_bal
    uncertainty: torch.Tensor  # sum over MoE layers of uncertainty_coef * L_u (InfoNCE)


def lm_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> LossParts:
    """Call right after ``model(idx)``: the layers hold the auxiliary losses of that forward."""
    task = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    balance = task.new_zeros(())
    uncertainty = task.new_zeros(())
    for m in model.modules():
        if isinstance(m, S2MoELayer):
            balance = balance + m.config.balance_coef * m.l_aux
            uncertainty = uncertainty + m.config.uncertainty_coef * m.uncertainty_loss
    return LossParts(task + s2moe_aux_loss(model), task, balance, uncertainty)
