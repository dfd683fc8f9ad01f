"""Bits per character: mean next-character cross-entropy (nats) / ln 2 over held-out windows,
for each ``eval_k`` (experts per token at inference; the paper's Figure 1)."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..moe.layer import S2MoELayer


@contextlib.contextmanager
def eval_k_set(model: torch.nn.Module, k: int):
    """Eval mode with ``k`` experts per token on every S2MoE layer; restores both after.

    Compatibility path for code without a ``k`` argument down to the layers: it sets each layer's
    ``eval_k_override`` (what ``S2MoELayer.forward(x)`` uses at inference when no ``k`` is passed),
    never the layers' validated ``config``."""
    layers = [m for m in model.modules() if isinstance(m, S2MoELayer)]
    saved = [layer.eval_k_override for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.eval_k_override = k
    model.eval()
    try:
        yield
    finally:
        for layer, old in zip(layers, saved):
            layer.eval_k_override = old
        model.train(was_training)


@torch.no_grad()
def bpc(model: torch.nn.Module, batches: Iterable, eval_k: Sequence[int], device,
        autocast_dtype: Optional[torch.dtype] = None) -> Dict[int, float]:
    """BPC per k over ``batches`` (re-iterable, e.g. ``EvalBatches``), summed over all ranks.

    Collective when torch.distributed is initialised (one all-reduce per k); every rank must
    hold the same number of batches (an expert-parallel forward needs all of them)."""
    import torch.distributed as dist

    out = {}
    for k in eval_k:
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum nll (nats), targets]
        with eval_k_set(model, k):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                       if autocast_dtype is not None else contextlib.nullcontext())
                with ctx:
                    logits = model(x)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                      reduction="sum")
                total += torch.stack([nll.double(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                 device=device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        out[k] = float(total[0] / total[1].clamp_min(1) / math.log(2))
    return out
