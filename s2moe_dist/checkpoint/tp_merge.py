"""A tensor-parallel ``s2moe-train`` checkpoint as ONE state dict of the TP=1 model.

With ``model.tp_size`` = n, DeepSpeed writes one model file per TP rank
(``mp_rank_<t>_model_states.pt``: dense layers, this rank's shard of the column/row-parallel
ones) and, per global expert g, ``layer_<l>_expert_<g>_mp_rank_<t>_model_states.pt`` (experts
split over TP: a file per TP rank, each a shard; experts whole: one file). ``merged_state_dict``
reads them all and undoes the split: dense shards by ``model.linear.merge_linear_tensors`` (which
dim each layer splits is read off a TP=1 model, its ``tp_parallel``), expert shards by
``moe.tp_shards.merge_expert_state``. The result loads into a TP=1 ``CharLM`` with
``load_state_dict`` (any ``ep_size``: the expert keys carry global ids). Model weights only; the
optimizer state is not converted (resume with the same TP size).
"""
from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from typing import Dict, List

import torch
from torch import nn

from ..model.linear import merge_linear_tensors
from ..moe.tp_shards import merge_expert_state
from . import keys
from .io import load_pt


def merged_state_dict(ckpt_dir: str, tag: str, model: nn.Module, tp_size: int, activation: str,
                      experts_split: bool) -> "OrderedDict[str, torch.Tensor]":
    """State dict of the TP=1 ``model`` from the TP shards of ``ckpt_dir/tag``. ``activation``,
    ``experts_split``: the run's ``model.moe.activation`` / ``enable_expert_tensor_parallelism``."""
    folder = os.path.join(ckpt_dir, tag)
    paths = [os.path.join(folder, keys.model_file(t)) for t in range(tp_size)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--checkpoint: {missing[0]} is missing: a model.tp_size={tp_size} checkpoint has one "
                         "model file per tensor-parallel rank")
    shards = [load_pt(p)["module"] for p in paths]
    parallel = {name: m.tp_parallel for name, m in model.named_modules() if getattr(m, "tp_parallel", None)}
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in shards[0].items():
        if key.endswith("_extra_state"):  # Megatron's (None) extra state
            continue
        module, _, name = key.rpartition(".")
        out[key] = merge_linear_tensors([s[key] for s in shards], parallel[module], name) \
            if module in parallel else value
    files: Dict[tuple, Dict[int, str]] = defaultdict(dict)
    for fname in os.listdir(folder):
        parsed = keys.parse_expert_file(fname)
        if parsed is not None:
            files[(parsed.layer, parsed.expert)][parsed.tp_rank] = os.path.join(folder, fname)
    for (layer, expert), by_rank in sorted(files.items()):
        if experts_split:
            if sorted(by_rank) != list(range(tp_size)):
                raise ValueError(f"--checkpoint: expert {expert} of MoE layer {layer} has TP shards {sorted(by_rank)}, "
                                 f"expected 0..{tp_size - 1}")
            states: List[dict] = [load_pt(by_rank[t]) for t in range(tp_size)]
            out.update(merge_expert_state(states, activation))
        else:  # whole experts: one file (a replica when several TP ranks wrote it)
            out.update(load_pt(by_rank[min(by_rank)]))
    return out
