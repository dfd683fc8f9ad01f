"""TensorBoard logging (rank 0) and the per-layer MoE statistics behind it.

The tag names below are the table in docs/training.md#tensorboard-tags (tests/test_docs.py compares
them); ``all_tags`` is what a run writes and what the tests read back from the event files.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import torch

TRAIN_TAGS = ("train/loss_total", "train/loss_task", "train/loss_balance", "train/loss_uncertainty",
              "train/lr", "train/grad_norm", "train/tokens_per_s", "train/skipped_steps")
EVAL_TAG = "eval/bpc_k{k}"
LAYER_SCALARS = ("expert_fraction_max_over_mean", "drop_fraction", "gate_mean", "infonce_accuracy", "balance_loss")
LAYER_HISTOGRAM = "expert_fraction"
COLLAPSE_SCALARS = ("expert_cosine", "expert_effective_rank")  # moe/collapse.py, logged at every eval


def layer_tag(i: int, name: str) -> str:
    return f"moe/layer{i}/{name}"


def all_tags(eval_k: Sequence[int], moe_blocks: Sequence[int], moe_type: str = "s2moe") -> List[str]:
    """Every tag a run writes (gate_mean / infonce_accuracy only exist for moe_type s2moe)."""
    tags = list(TRAIN_TAGS) + [EVAL_TAG.format(k=k) for k in eval_k]
    for i in moe_blocks:
        tags.append(layer_tag(i, LAYER_HISTOGRAM))
        for name in LAYER_SCALARS:
            if moe_type == "s2moe" or name not in ("gate_mean", "infonce_accuracy"):
                tags.append(layer_tag(i, name))
        tags += [layer_tag(i, name) for name in COLLAPSE_SCALARS]
    return tags


def collapse_scalars(stats: Dict[int, Dict[str, float]]) -> Dict[str, float]:
    """``moe/layer{i}/expert_cosine`` / ``expert_effective_rank`` from ``collapse.collapse_stats``."""
    return {layer_tag(i, name): v for i, st in stats.items() for name, v in st.items()}


def gather_moe_stats(moe_layers, device) -> Dict[int, Dict[str, object]]:
    """Per-layer statistics of the last forward, reduced over ranks (collective).

    Expert counts are summed over ranks (fractions of all routed slots); drop fraction, gate
    mean, InfoNCE accuracy and the layer's balance loss (``l_aux``, before ``balance_coef``) are
    averaged over ranks. One all-reduce for all layers."""
    import torch.distributed as dist

    rows = []
    for _, layer in moe_layers:
        st = layer.stats  # moe.stats.RoutingStats of the last forward
        counts = st.expert_counts.to(device=device, dtype=torch.float64)
        extras = torch.tensor([float(st.drop_fraction),
                               float(st.gate_mean) if st.gate_mean is not None else float("nan"),
                               float(st.infonce_accuracy) if st.infonce_accuracy is not None else float("nan"),
                               float(layer.l_aux.detach())],
                              dtype=torch.float64, device=device)
        rows.append(torch.cat([counts, extras]))
    if not rows:
        return {}
    flat = torch.cat(rows)
    world = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        dist.all_reduce(flat)
    out, pos = {}, 0
    for (i, layer), row in zip(moe_layers, rows):
        n = row.numel()
        part = flat[pos:pos + n].cpu()
        pos += n
        counts, extras = part[:-4], part[-4:] / world
        frac = counts / counts.sum().clamp_min(1)
        stats = {"expert_fraction": frac, "expert_fraction_max_over_mean": float(frac.max() / frac.mean()),
                 "drop_fraction": float(extras[0]), "balance_loss": float(extras[3])}
        if not torch.isnan(extras[1]):
            stats["gate_mean"] = float(extras[1])
        if not torch.isnan(extras[2]):
            stats["infonce_accuracy"] = float(extras[2])
        out[i] = stats
    return out


class Logger:
    """TensorBoard writer and ``metrics.jsonl`` on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: str, rank: int, purge_step: Optional[int] = None):
        self.enabled = rank == 0
        self.writer = None
        self.jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb_dir = os.path.join(output_dir, "tensorboard")
            # purge_step: on resume, TensorBoard hides the old run's events from that step on
            self.writer = SummaryWriter(self.tb_dir, purge_step=purge_step)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def moe(self, step: int, stats: Dict[int, Dict[str, object]]) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for i, st in stats.items():
            row.update({layer_tag(i, k): (v.tolist() if torch.is_tensor(v) else v) for k, v in st.items()})
            frac = st["expert_fraction"].double()
            n = frac.numel()
            # x axis: expert id (bucket e covers [e, e+1)); height: fraction of routed slots
            ids = torch.arange(n, dtype=torch.float64)
            self.writer.add_histogram_raw(
                layer_tag(i, LAYER_HISTOGRAM), min=0.0, max=float(n), num=1.0,
                sum=float((frac * (ids + 0.5)).sum()), sum_squares=float((frac * (ids + 0.5) ** 2).sum()),
                bucket_limits=[float(e + 1) for e in range(n)], bucket_counts=frac.tolist(), global_step=step)
            for name in LAYER_SCALARS:
                if name in st:
                    self.writer.add_scalar(layer_tag(i, name), st[name], step)
        self.jsonl.write(json.dumps(row) + "\n")  # the same values, expert fractions as a list

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
