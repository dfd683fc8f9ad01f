"""Canonical (EP-independent) parameter names of the optimizer state.

Dense parameters keep their names; an expert parameter of one EP rank becomes one entry per
GLOBAL expert under DeepSpeed's per-expert key (``keys.to_deepspeed``), so state saved at one EP
size is found by name at any other.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from . import keys
from .optim_state import CanonicalState, Entry, OptimizerFormat, Zero0RankStates


def canonical_expert_names(name: str, local: torch.Tensor, first_expert: int) -> List[Tuple[str, Optional[int]]]:
    """An expert parameter of one EP rank -> [(per-global-expert name, index into dim 0 or None)]
    (see ``keys.to_deepspeed``); ``local``: the parameter (or a tensor of its shape)."""
    parsed = keys.parse_expert_key(name)
    if parsed is None or parsed.layout not in (keys.Layout.BANK, keys.Layout.MODULE):
        raise ValueError(f"parameter {name!r} is in an expert group but is not an S2MoE expert parameter "
                         "(<layer>.experts.w1|w2|b1|b2 or <layer>.experts.experts.<i>.<...>)")
    return keys.to_deepspeed(parsed, first_expert, local.shape[0] if parsed.layout is keys.Layout.BANK else 0)


def local_module_experts(names: Iterable[str]) -> Dict[str, int]:
    """Layer prefix -> number of local user expert modules, from parameter names."""
    ids: Dict[str, set] = defaultdict(set)
    for name in names:
        parsed = keys.parse_expert_key(name)
        if parsed is not None and parsed.layout is keys.Layout.MODULE:
            ids[parsed.layer].add(parsed.expert)
    return {prefix: len(v) for prefix, v in ids.items()}


def _first_expert(name: str, local: torch.Tensor, ep_rank: int, module_counts: Dict[str, int]) -> int:
    parsed = keys.parse_expert_key(name)
    module = parsed is not None and parsed.layout is keys.Layout.MODULE
    return ep_rank * (module_counts[parsed.layer] if module else local.shape[0])


def add_canonical(out: Dict[str, Entry], name: str, entry: Entry, is_expert: bool, ep_rank: int,
                  module_counts: Dict[str, int]) -> None:
    """Store one parameter's entry (fp32 master + optimizer state, this EP rank's local shapes) under
    canonical names: dense by name, experts one entry per global expert."""
    if not is_expert:
        out[name] = entry
        return
    local = next(v for v in entry.values() if torch.is_tensor(v) and v.dim() > 0)
    first = _first_expert(name, local, ep_rank, module_counts)
    for cname, i in canonical_expert_names(name, local, first):
        out[cname] = {k: (v[i] if i is not None and torch.is_tensor(v) and v.dim() > 0 else v)
                      for k, v in entry.items()}


def zero0_names(engine) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, param) in the position order of the engine's ZeRO-0 optimizer state."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    for attr in ("fp16_groups", "bit16_groups", "bf16_groups"):  # unfused fp16/bf16, ZeRO-1/2, BF16_Optimizer
        if hasattr(opt, attr):
            order = [p for group in getattr(opt, attr) for p in group]
            break
    else:
        order = [p for group in opt.param_groups for p in group["params"]]
    return [(names[id(p)], p) for p in order]


def zero0_to_canonical(full: Zero0RankStates, engine) -> CanonicalState:
    """Name ZeRO-0 entries through ``engine`` (whose model must be the saved one)."""
    from deepspeed.moe.utils import is_moe_param
    order = zero0_names(engine)
    if local_module_experts([name for name, _ in order]):
        raise ValueError("resharding the ZeRO-0 optimizer state of user expert modules (S2MoE(hidden, "
                         "expert_module, ...)) is not supported: their parameters are numbered per rank. Use "
                         "the built-in expert bank, ZeRO stage 1/2, or load_optimizer_states=False")
    if len(order) != len(full.moe):
        raise ValueError(f"the checkpoint's optimizer holds {len(full.moe)} parameters, this engine's "
                         f"{len(order)}: resharding needs the same model and param groups")
    params: Dict[str, Entry] = {}
    step: Any = None
    for pos, ((name, p), moe) in enumerate(zip(order, full.moe)):
        if moe != is_moe_param(p):
            raise ValueError(f"parameter {name!r}: expert in the checkpoint's optimizer but not in this model "
                             "(or the reverse): resharding needs the same model and param groups")
        for ep_rank, entries in enumerate(full.ranks if moe else full.ranks[:1]):
            step = entries[pos].get("step", step)
            add_canonical(params, name, entries[pos], moe, ep_rank, {})
    return CanonicalState(params=params, step=step, ep_size=full.ep_size, source=OptimizerFormat.ZERO0)
