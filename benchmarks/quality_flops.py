"""Training FLOPs of one quality contestant, counted over one real training step.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul / attention op of one forward +
backward (dense layers, attention, router, gate, InfoNCE similarity matrix, LM head). It counts
``aten._grouped_mm`` (the expert GEMMs) as 0, so those are counted from the rows the step really
routed (``last_stats["expert_counts"]`` of each MoE layer, both streams): 2 FLOPs per
multiply-add, forward + the two backward GEMMs (input and weight gradients) = 3 x forward.
Optimizer updates and elementwise ops are not counted (FlopCounterMode counts neither).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _experts_counted(layer) -> bool:
    """Does FlopCounterMode see this layer's expert GEMMs (per-expert matmul path), or are they
    grouped_mm (counted as 0)?"""
    d = layer.config.hidden_size
    x = torch.randn(4 * layer.num_local_experts, d, requires_grad=True)
    counts = torch.full((layer.num_local_experts,), 4, dtype=torch.long)

    def step():
        out = layer.experts(x, counts)
        out.backward(torch.randn_like(out))
    return _counted_flops(step) > 0


def expert_gemm_flops_per_row(layer) -> int:
    """Forward FLOPs of one routed row through one expert (two GEMMs), from the weight shapes."""
    macs = sum(p[0].numel() for p in (layer.experts.w1, layer.experts.w2))  # [d, h(*2)] + [h, d]
    return 2 * macs


def training_step_flops(run_cfg, seed: int = 0) -> Dict[str, float]:
    """{"counted": FlopCounterMode total, "experts": expert GEMMs from routed rows, "total": sum,
    "expert_rows": routed rows per step (all MoE layers, both streams)} for one training step of
    ``run_cfg`` (global batch on one process)."""
    from s2moe_dist.model import CharLM
    from s2moe_dist.moe.layer import s2moe_aux_loss

    torch.manual_seed(seed)
    m, t = run_cfg.model, run_cfg.train
    model = CharLM(m).train()
    layers = [layer for _, layer in model.moe_layers()]
    x = torch.randint(0, m.vocab_size, (t.batch_size, m.seq_len))
    y = torch.randint(0, m.vocab_size, (t.batch_size, m.seq_len))

    def step():
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + s2moe_aux_loss(model)
        loss.backward()
    counted = _counted_flops(step)
    experts, rows = 0, 0
    for layer in layers:
        r = int(layer.last_stats["expert_counts"].sum())
        rows += r
        if not _experts_counted(layer):
            experts += 3 * r * expert_gemm_flops_per_row(layer)
    return {"counted": float(counted), "experts": float(experts), "total": float(counted + experts),
            "expert_rows": float(rows)}
