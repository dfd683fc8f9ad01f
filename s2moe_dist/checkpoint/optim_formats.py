"""DeepSpeed's optimizer checkpoint formats, read into (and ZeRO-0 written from) ``optim_state`` types.

- ZeRO-0: one torch optimizer state per EP rank (``expp_rank_<e>_mp_rank_00_optim_states.pt``),
  expert entries shaped ``[E_local, ...]``, parameters by position (torch optimizer, or DeepSpeed's
  FP16_UnfusedOptimizer wrapping one for bf16/fp16).
- ZeRO-1/2: flat fp32 partitions per data-parallel rank (``[bf16_]zero_pp_rank_<r>_...``), expert
  groups partitioned over the expert-data-parallel group of their EP rank.
- Portable: ``CanonicalState`` in ``s2moe_optim_states.pt`` (written by ``convert``).

Assumes DeepSpeed's default expert/data layout (EP groups contiguous ranks, EDP groups strided) and
optimizers whose state is per-element tensors plus scalars (Adam, AdamW, SGD with momentum, ...).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import keys
from .canonical import add_canonical, local_module_experts, zero0_to_canonical
from .io import load_pt, rank_files
from .optim_state import (PORTABLE_FILE, CanonicalState, Entry, OptimizerFormat, SavedLayout,
                          Zero0RankStates)

MODEL_FILE = keys.model_file(0)


# ---- ZeRO-1/2: flat partitions -> full per-parameter state ---------------------------------------
def read_zero12(ckpt_dir: str, files: List[Tuple[int, str]]) -> CanonicalState:
    model = load_pt(os.path.join(ckpt_dir, MODEL_FILE))
    sds = [load_pt(path)["optimizer_state_dict"] for _, path in files]
    world = len(sds)
    base = sds[0]["base_optimizer_state"]
    if not isinstance(base, dict):
        raise ValueError(f"{ckpt_dir}: elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint) are not "
                         "supported by the S2MoE resharder; save with elastic_checkpoint false")
    groups = base["param_groups"]
    shapes = model["param_shapes"]
    ep_sizes = {keys.parse_ep_group_name(g["name"]) for g in groups if g.get("moe")}
    if len(ep_sizes) > 1:
        raise ValueError(f"{ckpt_dir}: expert groups of several EP sizes {sorted(ep_sizes)} are not supported")
    ep = ep_sizes.pop() if ep_sizes else 1
    params: Dict[str, Entry] = {}
    step = None
    for g, group in enumerate(groups):
        moe = bool(group.get("moe"))
        # partitions of a dense group: all ranks; of an expert group: the EDP group of each EP rank
        owners = [list(range(e, world, ep)) for e in range(ep)] if moe else [list(range(world))]
        for ep_rank, ranks in enumerate(owners):
            pieces: Dict[str, Dict[str, List[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
            scalars: Dict[str, Any] = {}
            for r in ranks:
                sd = sds[r]
                flat = {"fp32": sd["single_partition_of_fp32_groups"][g]}
                for key, value in sd["base_optimizer_state"]["state"].get(g, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        flat[key] = value
                    else:
                        scalars[key] = value
                for name, addr in sd["param_slice_mappings"][g].items():
                    for key, t in flat.items():
                        pieces[name][key].append(t.narrow(0, addr.start, addr.numel))
            step = scalars.get("step", step)
            counts = local_module_experts(shapes[g])
            for name, by_key in pieces.items():
                shape = tuple(shapes[g][name])
                entry = {k: torch.cat(v).view(shape).clone() for k, v in by_key.items()}
                entry.update(scalars)
                add_canonical(params, name, entry, moe, ep_rank, counts)
    return CanonicalState(params=params, step=step, ep_size=ep, source=OptimizerFormat.ZERO12)


# ---- ZeRO-0: one optimizer state per EP rank, parameters by position ------------------------------
def zero0_unpack(opt_sd: Dict[str, Any]) -> Tuple[List[Entry], List[bool]]:
    """-> (per-position entries [{key: tensor}], per-position moe flag). Handles the torch optimizer
    (fp32) and DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 with a torch optimizer)."""
    if "state" in opt_sd and "param_groups" in opt_sd:
        inner, masters = opt_sd, None
    elif "optimizer_state_dict" in opt_sd and "fp32_groups" in opt_sd:
        inner, masters = opt_sd["optimizer_state_dict"], [t for grp in opt_sd["fp32_groups"] for t in grp]
    else:
        raise ValueError(f"unsupported ZeRO-0 optimizer state with keys {sorted(opt_sd)} (the fused FP16 "
                         "optimizer of DeepSpeed's FusedAdam is not supported; use a torch optimizer)")
    entries, moe = [], []
    for group in inner["param_groups"]:
        for idx in group["params"]:
            entry = dict(inner["state"].get(idx, {}))
            if masters is not None:
                entry["fp32"] = masters[len(entries)]
            entries.append(entry)
            moe.append(bool(group.get("moe")))
    return entries, moe


def read_zero0(files: List[Tuple[int, str]]) -> Zero0RankStates:
    """Per EP rank, by position (the files carry no parameter names)."""
    ranks = [zero0_unpack(load_pt(path)["optimizer"]) for _, path in files]
    return Zero0RankStates(ranks=[entries for entries, _ in ranks], moe=ranks[0][1])


def merge_zero0_banks(full: Zero0RankStates) -> List[Entry]:
    """Positions with expert entries concatenated over the saved EP ranks (expert banks only)."""
    merged = []
    for pos, entry in enumerate(full.ranks[0]):
        if full.moe[pos]:
            entry = {k: (torch.cat([r[pos][k] for r in full.ranks]) if torch.is_tensor(v) and v.dim() > 0 else v)
                     for k, v in entry.items()}
        merged.append(entry)
    return merged


def zero0_pack(template: Dict[str, Any], merged: List[Entry], ep_rank: int, ep: int) -> Dict[str, Any]:
    """EP rank ``ep_rank`` of ``ep``'s ZeRO-0 optimizer state (``template``'s format) from ``merged``."""
    def local(entry, moe):
        if not moe:
            return entry
        out = {}
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0:
                if v.shape[0] % ep:
                    raise ValueError(f"{v.shape[0]} experts do not split over ep_size={ep}")
                n = v.shape[0] // ep
                v = v[ep_rank * n:(ep_rank + 1) * n].clone()
            out[k] = v
        return out

    moe = zero0_unpack(template)[1]
    entries = [local(e, m) for e, m in zip(merged, moe)]
    if "state" in template:  # torch optimizer
        state, pos = {}, 0
        for group in template["param_groups"]:
            for idx in group["params"]:
                state[idx] = {k: v for k, v in entries[pos].items() if k != "fp32"}
                pos += 1
        return {"state": state, "param_groups": template["param_groups"]}
    inner = template["optimizer_state_dict"]  # FP16_UnfusedOptimizer
    state, masters, pos = {}, [], 0
    for group in inner["param_groups"]:
        grp = []
        for idx in group["params"]:
            state[idx] = {k: v for k, v in entries[pos].items() if k != "fp32"}
            grp.append(entries[pos]["fp32"])
            pos += 1
        masters.append(grp)
    return {**template, "optimizer_state_dict": {"state": state, "param_groups": inner["param_groups"]},
            "fp32_groups": masters}


# ---- reading any checkpoint ---------------------------------------------------------------------
def zero0_files(ckpt_dir: str) -> List[Tuple[int, str]]:
    return rank_files(ckpt_dir, keys.parse_zero0_optim_file)


def zero12_files(ckpt_dir: str) -> List[Tuple[int, str]]:
    return rank_files(ckpt_dir, keys.parse_zero12_optim_file)


def saved_layout(ckpt_dir: str) -> SavedLayout:
    """The optimizer format, EP size and data-parallel size of a tag directory."""
    model = load_pt(os.path.join(ckpt_dir, MODEL_FILE))
    dp, experts = model.get("dp_world_size"), model.get("num_experts")
    if os.path.exists(os.path.join(ckpt_dir, PORTABLE_FILE)):
        return SavedLayout(OptimizerFormat.PORTABLE, None, dp, experts)
    zero0 = zero0_files(ckpt_dir)
    if zero0:
        return SavedLayout(OptimizerFormat.ZERO0, len(zero0), dp, experts)
    zero12 = zero12_files(ckpt_dir)
    if zero12:
        groups = load_pt(zero12[0][1])["optimizer_state_dict"]["base_optimizer_state"]
        names = [g["name"] for g in groups["param_groups"] if g.get("moe")] if isinstance(groups, dict) else []
        return SavedLayout(OptimizerFormat.ZERO12, keys.parse_ep_group_name(names[0]) if names else 1, dp, experts)
    return SavedLayout(OptimizerFormat.NONE, None, dp, experts)


def full_optimizer_state(ckpt_dir: str, engine=None, layout: Optional[SavedLayout] = None) -> CanonicalState:
    """The full optimizer state of a checkpoint tag directory, by canonical parameter name (ZeRO-0
    checkpoints name their parameters through ``engine``, whose model must be the saved one)."""
    fmt = (layout or saved_layout(ckpt_dir)).format
    if fmt is OptimizerFormat.PORTABLE:
        return CanonicalState.from_portable(load_pt(os.path.join(ckpt_dir, PORTABLE_FILE)),
                                            f"{ckpt_dir}/{PORTABLE_FILE}")
    if fmt is OptimizerFormat.ZERO12:
        return read_zero12(ckpt_dir, zero12_files(ckpt_dir))
    if fmt is OptimizerFormat.ZERO0:
        if engine is None:
            raise ValueError("a ZeRO-0 checkpoint names its optimizer entries by position: pass the engine")
        return zero0_to_canonical(read_zero0(zero0_files(ckpt_dir)), engine)
    raise ValueError(f"{ckpt_dir}: no optimizer state found")
