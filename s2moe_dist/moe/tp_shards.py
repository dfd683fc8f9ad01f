"""Tensor-parallel (TP) layout of the expert weights, and checkpoint conversion between TP sizes.

TP rank t of ``tp`` holds, for every local expert:
- ``w1`` [d, h/tp] columns ``[t*h/tp, (t+1)*h/tp)`` (column-parallel); for swiglu ``w1`` is
  [d, 2h] = [gate | up] and the shard is [gate cols of t | up cols of t], so the activation
  ``silu(gate) * up`` stays local; ``b1`` the same columns;
- ``w2`` [h/tp, d] rows ``[t*h/tp, (t+1)*h/tp)`` (row-parallel, partial sums reduced over TP);
- ``b2`` whole (replicated; added once after the reduction).
The expert dimension, if any, leads (``experts.w1`` [E_local, d, h]); per-expert keys of
DeepSpeed's layout (``deepspeed_experts.<i>.w1`` [d, h]) work the same way.

Checkpoints hold each TP rank's shard; ``merge_expert_state`` turns the TP shards of one layer (or
model) state dict into the full layout (TP=1), ``split_expert_state`` splits it back, and
``reshard_expert_state`` goes from any TP size to any other.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..checkpoint.keys import ExpertKey, parse_bank_tensor_key


def _columns(width: int, tp_rank: int, tp_size: int, swiglu: bool, device=None) -> torch.Tensor:
    """Column indices of TP rank ``tp_rank`` in a w1 of ``width`` columns (on ``device``, not the
    default device)."""
    if swiglu:
        half = width // 2
        step = half // tp_size
        own = torch.arange(tp_rank * step, (tp_rank + 1) * step, device=device)
        return torch.cat([own, own + half])
    step = width // tp_size
    return torch.arange(tp_rank * step, (tp_rank + 1) * step, device=device)


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, swiglu: bool) -> torch.Tensor:
    """This TP rank's shard of the full expert tensor ``name`` (w1, b1, w2 or b2)."""
    if tp_size == 1 or name == "b2":
        return full.clone()
    if name in ("w1", "b1"):
        width = full.shape[-1]
        if width % (2 * tp_size if swiglu else tp_size):
            raise ValueError(f"{name} width {width} cannot be split over tp_size={tp_size}")
        cols = _columns(width, tp_rank, tp_size, swiglu, device=full.device)
        return full.index_select(full.dim() - 1, cols).contiguous()
    if name == "w2":
        rows = full.shape[-2]
        if rows % tp_size:
            raise ValueError(f"w2 rows {rows} cannot be split over tp_size={tp_size}")
        step = rows // tp_size
        return full.narrow(full.dim() - 2, tp_rank * step, step).contiguous()
    raise ValueError(f"unknown expert tensor {name!r}: expected w1, b1, w2 or b2")


def merge_tensors(name: str, shards: Sequence[torch.Tensor], swiglu: bool) -> torch.Tensor:
    """Inverse of ``shard_tensor`` over all TP ranks."""
    if len(shards) == 1 or name == "b2":
        return shards[0].clone()
    if name in ("w1", "b1"):
        if swiglu:
            halves = [s.chunk(2, dim=-1) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=-1)
        return torch.cat(list(shards), dim=-1)
    if name == "w2":
        return torch.cat(list(shards), dim=-2)
    raise ValueError(f"unknown expert tensor {name!r}: expected w1, b1, w2 or b2")


def _is_swiglu(state: Mapping[str, torch.Tensor], key: ExpertKey, activation: Optional[str]) -> bool:
    if activation is not None:
        return activation == "swiglu"
    w1, w2 = state.get(key.sibling("w1")), state.get(key.sibling("w2"))
    if w1 is None or w2 is None:
        raise ValueError(f"cannot tell the activation of {key.sibling('w1')}: pass activation=...")
    return w1.shape[-1] == 2 * w2.shape[-2]  # swiglu: w1 = [gate | up]


def _expert_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, ExpertKey]:
    """Every bank tensor key of ``state``: the layer's bank (``experts.w1``), DeepSpeed's per-expert
    keys (``deepspeed_experts.<i>.w1``) or an ``ExpertBank``'s own (``w1``), parsed
    (the scheme: ``s2moe_dist.checkpoint.keys``)."""
    return {key: parsed for key in state if (parsed := parse_bank_tensor_key(key)) is not None}


def _activations(state: Mapping[str, torch.Tensor], expert: Dict[str, ExpertKey],
                 activation: Optional[str]) -> Dict[str, bool]:
    """w1 key -> swiglu?, for every expert (or bank) in ``expert``."""
    return {k.sibling("w1"): _is_swiglu(state, k, activation) for k in expert.values()}


def split_expert_state(state: Mapping[str, torch.Tensor], tp_size: int,
                       activation: Optional[str] = None) -> List[Dict[str, torch.Tensor]]:
    """Full (TP=1) state dict -> one state dict per TP rank; non-expert entries are copied."""
    expert = _expert_keys(state)
    swiglu = _activations(state, expert, activation)
    out = []
    for t in range(tp_size):
        shard = OrderedDict()
        for key, value in state.items():
            if key in expert:
                k = expert[key]
                shard[key] = shard_tensor(k.param, value, t, tp_size, swiglu[k.sibling("w1")])
            else:
                shard[key] = value
        out.append(shard)
    return out


def merge_expert_state(states: Sequence[Mapping[str, torch.Tensor]],
                       activation: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """TP shards (rank order) of one state dict -> the full (TP=1) state dict. Entries other than
    w1/b1/w2 must be equal on every shard (replicated over TP); anything else is an error."""
    first = states[0]
    for t, s in enumerate(states[1:], 1):
        if s.keys() != first.keys():
            raise ValueError(f"TP shard {t} has keys {sorted(set(s) ^ set(first))} the others lack")
    expert = _expert_keys(first)
    swiglu = _activations(first, expert, activation)
    out = OrderedDict()
    for key, value in first.items():
        if key in expert and expert[key].param != "b2":
            k = expert[key]
            out[key] = merge_tensors(k.param, [s[key] for s in states], swiglu[k.sibling("w1")])
            continue
        for t, s in enumerate(states[1:], 1):
            if torch.is_tensor(value) and not torch.equal(s[key], value):
                raise ValueError(f"{key} differs between TP shard 0 and {t}: it must be replicated over TP "
                                 "(are these shards of one checkpoint, given in TP rank order?)")
        out[key] = value
    return out


def reshard_expert_state(states: Sequence[Mapping[str, torch.Tensor]], tp_size: int,
                         activation: Optional[str] = None) -> List[Dict[str, torch.Tensor]]:
    """TP shards at one TP size -> shards at ``tp_size`` (1: a one-element list, the full state)."""
    return split_expert_state(merge_expert_state(states, activation), tp_size, activation)


def shard_full_experts_(state: Dict[str, torch.Tensor], prefix: str, tp_rank: int, tp_size: int,
                        local_hidden: int, swiglu: bool) -> None:
    """In place: expert entries under ``prefix`` that hold the full hidden size (a TP=1 checkpoint)
    are replaced by this rank's shard, so a full checkpoint loads into a TP-split layer."""
    for key, parsed in _expert_keys(state).items():
        name = parsed.param
        if not key.startswith(prefix) or name == "b2":
            continue
        value = state[key]
        full_hidden = value.shape[-1] // (2 if swiglu else 1) if name in ("w1", "b1") else value.shape[-2]
        if full_hidden == local_hidden * tp_size and tp_size > 1:
            state[key] = shard_tensor(name, value, tp_rank, tp_size, swiglu)
