"""DeepSpeed checkpoints of S2MoE models across a change of expert-parallel (EP) size.

What is already EP-independent: the model weights. DeepSpeed writes one file per GLOBAL expert
(``layer_<l>_expert_<g>_mp_rank_00_model_states.pt``, from the keys ``ds_checkpoint.py`` maps the
expert bank to) and the dense weights once (``mp_rank_00_model_states.pt``); loading reads the
files of the loading rank's experts. What is not: the optimizer state.

- ZeRO-0: one torch optimizer state per EP rank (``expp_rank_<e>_mp_rank_00_optim_states.pt``),
  expert entries shaped ``[E_local, ...]``: with another EP size DeepSpeed loads the wrong shapes
  (or a file that does not exist).
- ZeRO-1/2: flat fp32 partitions per data-parallel rank (``[bf16_]zero_pp_rank_<r>_...``), expert
  groups partitioned over the expert-data-parallel group: with another EP size, DeepSpeed copies
  the saved partition of the same rank, SAME SIZE, OTHER EXPERTS, into the fp32 master weights
  (silently wrong training from the next step on).

This module rebuilds the full optimizer state of every parameter from the saved files (any stage,
any saved EP and data-parallel size; expert entries stacked over the global experts) and writes it
into a live engine of any layout:

- ``load_checkpoint(engine, dir, tag)``: ``engine.load_checkpoint`` when the layout is unchanged;
  otherwise weights through DeepSpeed (``load_optimizer_states=False``) then the optimizer state
  rebuilt here (fp32 master weights, Adam moments, step). ``deepspeed.initialize`` installs it as
  ``engine.load_checkpoint`` for models with S2MoE layers, so the engine's own call does this.
- ``reshard_checkpoint(src, dst, new_ep_size)``: offline converter (``s2moe-ckpt reshard``). ZeRO-0
  optimizer files are rewritten for ``new_ep_size`` (plain DeepSpeed loads them); ZeRO-1/2 state is
  written EP- and DP-independent to ``s2moe_optim_states.pt`` (its layout is fixed only when an
  engine exists) and restored by ``load_checkpoint``.

Assumes DeepSpeed's default expert/data layout (EP groups contiguous ranks, EDP groups strided),
one model-parallel rank, and optimizers whose state is per-element tensors plus scalars (Adam,
AdamW, SGD with momentum, ...). Every rank reads the whole optimizer state once while loading.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch

MODEL_FILE = "mp_rank_00_model_states.pt"
PORTABLE_FILE = "s2moe_optim_states.pt"
PORTABLE_FORMAT = "s2moe-portable-optimizer-state-v1"
DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
_ZERO0 = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_ZERO12 = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_BANK = re.compile(r"^(.*?)experts\.(w1|w2|b1|b2)$")
_MODULE = re.compile(r"^(.*?)experts\.experts\.(\d+)\.(.+)$")
_EP_NAME = re.compile(r"^ep_size_(\d+)$")
_EXPERT_FILE = re.compile(r"^layer_\d+_expert_(\d+)_mp_rank_00_model_states\.pt$")

FullState = Dict[str, Any]  # {"step": ..., "params": {canonical name: {"fp32"?: t, key: t}}, "ep_size": int}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve_tag(load_dir: str, tag: Optional[str] = None) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise ValueError(f"no tag given and no 'latest' file in {load_dir!r}: pass tag=")
    with open(latest) as f:
        return f.read().strip()


def _files(ckpt_dir: str, pattern) -> List[Tuple[int, str]]:
    found = []
    for name in os.listdir(ckpt_dir):
        m = pattern.match(name)
        if m:
            found.append((int(m.groups()[-1]), os.path.join(ckpt_dir, name)))
    return sorted(found)


# ---- canonical (EP-independent) parameter names ------------------------------------------------
def canonical_expert_names(name: str, local: torch.Tensor, first_expert: int) -> List[Tuple[str, Any]]:
    """An expert parameter of one EP rank -> [(per-global-expert name, index or None)].

    Bank ``<l>.experts.w1`` [E_local, ...] -> ``<l>.deepspeed_moe.experts.deepspeed_experts.<g>.w1``
    (one per expert, index i into dim 0); user expert module ``<l>.experts.experts.<i>.<path>`` ->
    ``<l>.deepspeed_moe.experts.deepspeed_experts.<first+i>.<path>`` (index None: the whole tensor)."""
    m = _MODULE.match(name)
    if m:
        return [(f"{m.group(1)}{DS_EXPERTS}{first_expert + int(m.group(2))}.{m.group(3)}", None)]
    m = _BANK.match(name)
    if m:
        return [(f"{m.group(1)}{DS_EXPERTS}{first_expert + i}.{m.group(2)}", i) for i in range(local.shape[0])]
    raise ValueError(f"parameter {name!r} is in an expert group but is not an S2MoE expert parameter "
                     "(<layer>.experts.w1|w2|b1|b2 or <layer>.experts.experts.<i>.<...>)")


def _is_module_expert_key(key: str) -> bool:
    """A per-expert key of a user expert module (not of the built-in bank)."""
    m = re.search(r"deepspeed_experts\.\d+\.(.+)$", key)
    return bool(m) and m.group(1) not in ("w1", "w2", "b1", "b2")


def _local_module_experts(names) -> Dict[str, int]:
    """Layer prefix -> number of local user expert modules, from parameter names."""
    ids: Dict[str, set] = defaultdict(set)
    for name in names:
        m = _MODULE.match(name)
        if m:
            ids[m.group(1)].add(int(m.group(2)))
    return {prefix: len(v) for prefix, v in ids.items()}


def _first_expert(name: str, local: torch.Tensor, ep_rank: int, module_counts: Dict[str, int]) -> int:
    m = _MODULE.match(name)
    return ep_rank * (module_counts[m.group(1)] if m else local.shape[0])


def _add_canonical(out: Dict[str, Dict[str, Any]], name: str, entry: Dict[str, Any], is_expert: bool,
                   ep_rank: int, module_counts: Dict[str, int]) -> None:
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


# ---- ZeRO-1/2: flat partitions -> full per-parameter state ---------------------------------------
def _read_zero12(ckpt_dir: str, files: List[Tuple[int, str]]) -> FullState:
    model = _load(os.path.join(ckpt_dir, MODEL_FILE))
    sds = [_load(path)["optimizer_state_dict"] for _, path in files]
    world = len(sds)
    base = sds[0]["base_optimizer_state"]
    if not isinstance(base, dict):
        raise ValueError(f"{ckpt_dir}: elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint) are not "
                         "supported by the S2MoE resharder; save with elastic_checkpoint false")
    groups = base["param_groups"]
    shapes = model["param_shapes"]
    ep_sizes = {int(_EP_NAME.match(g["name"]).group(1)) for g in groups if g.get("moe")}
    if len(ep_sizes) > 1:
        raise ValueError(f"{ckpt_dir}: expert groups of several EP sizes {sorted(ep_sizes)} are not supported")
    ep = ep_sizes.pop() if ep_sizes else 1
    params: Dict[str, Dict[str, torch.Tensor]] = {}
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
            counts = _local_module_experts(shapes[g])
            for name, by_key in pieces.items():
                shape = tuple(shapes[g][name])
                entry = {k: torch.cat(v).view(shape).clone() for k, v in by_key.items()}
                entry.update(scalars)
                _add_canonical(params, name, entry, moe, ep_rank, counts)
    return {"step": step, "params": params, "ep_size": ep, "kind": "zero12"}


# ---- ZeRO-0: one optimizer state per EP rank, parameters by position ------------------------------
def _zero0_unpack(opt_sd: Dict[str, Any]):
    """-> (per-position entries [{key: tensor}], per-position moe flag, wrapper keys). Handles the torch
    optimizer (fp32) and DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 with a torch optimizer)."""
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


def _read_zero0(files: List[Tuple[int, str]]) -> FullState:
    """Per EP rank, by position (the files carry no parameter names)."""
    ranks = [_zero0_unpack(_load(path)["optimizer"]) for _, path in files]
    return {"ranks": [entries for entries, _ in ranks], "moe": ranks[0][1], "ep_size": len(files), "kind": "zero0"}


def _merge_zero0_banks(full: FullState) -> List[Dict[str, Any]]:
    """Positions with expert entries concatenated over the saved EP ranks (expert banks only)."""
    merged = []
    for pos, entry in enumerate(full["ranks"][0]):
        if full["moe"][pos]:
            entry = {k: (torch.cat([r[pos][k] for r in full["ranks"]]) if torch.is_tensor(v) and v.dim() > 0 else v)
                     for k, v in entry.items()}
        merged.append(entry)
    return merged


def _zero0_names(engine) -> List[Tuple[str, torch.nn.Parameter]]:
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


def _zero0_to_canonical(full: FullState, engine) -> FullState:
    from deepspeed.moe.utils import is_moe_param
    order = _zero0_names(engine)
    if _local_module_experts([name for name, _ in order]):
        raise ValueError("resharding the ZeRO-0 optimizer state of user expert modules (S2MoE(hidden, "
                         "expert_module, ...)) is not supported: their parameters are numbered per rank. Use "
                         "the built-in expert bank, ZeRO stage 1/2, or load_optimizer_states=False")
    if len(order) != len(full["moe"]):
        raise ValueError(f"the checkpoint's optimizer holds {len(full['moe'])} parameters, this engine's "
                         f"{len(order)}: resharding needs the same model and param groups")
    params: Dict[str, Dict[str, Any]] = {}
    step = None
    for pos, ((name, p), moe) in enumerate(zip(order, full["moe"])):
        if moe != is_moe_param(p):
            raise ValueError(f"parameter {name!r}: expert in the checkpoint's optimizer but not in this model "
                             "(or the reverse): resharding needs the same model and param groups")
        for ep_rank, entries in enumerate(full["ranks"] if moe else full["ranks"][:1]):
            step = entries[pos].get("step", step)
            _add_canonical(params, name, entries[pos], moe, ep_rank, {})
    return {"step": step, "params": params, "ep_size": full["ep_size"], "kind": "zero0"}


# ---- reading any checkpoint ---------------------------------------------------------------------
def saved_layout(ckpt_dir: str) -> Dict[str, Any]:
    """{"kind": "zero0" | "zero12" | "portable" | "none", "ep_size", "dp_world_size"} of a tag directory."""
    model = _load(os.path.join(ckpt_dir, MODEL_FILE))
    out = {"dp_world_size": model.get("dp_world_size"), "num_experts": model.get("num_experts")}
    if os.path.exists(os.path.join(ckpt_dir, PORTABLE_FILE)):
        return {**out, "kind": "portable", "ep_size": None}
    zero0 = _files(ckpt_dir, _ZERO0)
    if zero0:
        return {**out, "kind": "zero0", "ep_size": len(zero0)}
    zero12 = _files(ckpt_dir, _ZERO12)
    if zero12:
        groups = _load(zero12[0][1])["optimizer_state_dict"]["base_optimizer_state"]
        names = [g["name"] for g in groups["param_groups"] if g.get("moe")] if isinstance(groups, dict) else []
        ep = int(_EP_NAME.match(names[0]).group(1)) if names else 1
        return {**out, "kind": "zero12", "ep_size": ep}
    return {**out, "kind": "none", "ep_size": None}


def full_optimizer_state(ckpt_dir: str, engine=None) -> FullState:
    """The full optimizer state of a checkpoint tag directory, by canonical parameter name (ZeRO-0
    checkpoints name their parameters through ``engine``, whose model must be the saved one)."""
    layout = saved_layout(ckpt_dir)
    if layout["kind"] == "portable":
        full = _load(os.path.join(ckpt_dir, PORTABLE_FILE))
        if full.get("format") != PORTABLE_FORMAT:
            raise ValueError(f"{ckpt_dir}/{PORTABLE_FILE}: unknown format {full.get('format')!r}")
        return full
    if layout["kind"] == "zero12":
        return _read_zero12(ckpt_dir, _files(ckpt_dir, _ZERO12))
    if layout["kind"] == "zero0":
        if engine is None:
            raise ValueError("a ZeRO-0 checkpoint names its optimizer entries by position: pass the engine")
        return _zero0_to_canonical(_read_zero0(_files(ckpt_dir, _ZERO0)), engine)
    raise ValueError(f"{ckpt_dir}: no optimizer state found")


# ---- writing into a live engine -----------------------------------------------------------------
def _expert_layers(module) -> Dict[str, Any]:
    from .deepspeed import DeepSpeedS2MoE
    return {name + "." if name else "": m for name, m in module.named_modules() if isinstance(m, DeepSpeedS2MoE)}


def _param_entry(name: str, p, full: FullState, layers) -> Dict[str, Any]:
    from deepspeed.moe.utils import is_moe_param
    params = full["params"]
    if not is_moe_param(p):
        if name not in params:
            raise ValueError(f"parameter {name!r} has no optimizer state in the checkpoint")
        return params[name]
    prefix = max((q for q in layers if name.startswith(q + "experts.")), key=len, default=None)
    if prefix is None:
        raise ValueError(f"expert parameter {name!r} is not in an S2MoE layer")
    layer = layers[prefix]
    items = canonical_expert_names(name, p, layer.first_expert)
    missing = [c for c, _ in items if c not in params]
    if missing:
        raise ValueError(f"no optimizer state for experts {missing[:3]}... in the checkpoint (wrong num_experts?)")
    if items[0][1] is None:
        return params[items[0][0]]
    entries = [params[c] for c, _ in items]
    return {k: (torch.stack([e[k] for e in entries]) if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in entries[0].items()}


def _fill_state(state: Dict[str, Any], like: torch.Tensor, entry: Dict[str, Any], write) -> None:
    """Create missing per-element state tensors (optimizers create them lazily at the first step),
    copy scalars, and ``write(dst_flat_state, src_full_tensor)`` the tensors."""
    for key, value in entry.items():
        if key == "fp32":
            continue
        if torch.is_tensor(value) and value.dim() > 0:
            if key not in state:
                state[key] = torch.zeros_like(like)
            write(state[key], value)
        else:
            state[key] = value.clone() if torch.is_tensor(value) else value


def apply_full_optimizer_state(engine, full: FullState) -> None:
    """Write fp32 master weights and optimizer state of every parameter of ``engine`` from ``full``."""
    opt = engine.optimizer
    layers = _expert_layers(engine.module)
    unfused = {}
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer
        unfused = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
    inner = getattr(opt, "optimizer", opt)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            entry = _param_entry(name, p, full, layers)
            mapping = getattr(p, "_hp_mapping", "absent")
            if mapping is None:  # ZeRO 1/2: no fragment of this parameter on this rank
                continue
            if mapping != "absent":  # ZeRO 1/2, BF16_Optimizer: a fragment of a flat fp32 partition
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                flat = inner.param_groups[mapping.param_group_index]["params"][0]

                def write(dst, src, lp=lp, hp=hp):
                    dst.narrow(0, hp.start, hp.numel).copy_(src.reshape(-1).narrow(0, lp.start, lp.numel))

                if "fp32" in entry:
                    write(flat.data, entry["fp32"])
                _fill_state(inner.state[flat], flat, entry, write)
            else:  # ZeRO-0: the torch optimizer holds the parameter (or its fp32 copy) itself
                hp = unfused.get(id(p), p)
                if "fp32" in entry and hp is not p:
                    hp.data.copy_(entry["fp32"].view_as(hp))
                _fill_state(inner.state[hp], hp.data, entry, lambda dst, src: dst.copy_(src.view_as(dst)))


# ---- load / convert -----------------------------------------------------------------------------
def _current_ep_size(engine) -> int:
    sizes = {m.ep_size for m in _expert_layers(engine.module).values()}
    return max(sizes) if sizes else 1


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_strict: bool = True,
                    load_module_only: bool = False, _ds_load=None):
    """``engine.load_checkpoint`` that survives a change of EP size or data-parallel size (see the
    module docstring). Returns what ``engine.load_checkpoint`` returns; with no ``tag`` and no
    ``latest`` file in ``load_dir`` (an empty ``--load`` folder), DeepSpeed's warning and ``(None, None)``."""
    import deepspeed.comm as dist
    ds_load = _ds_load or engine.load_checkpoint
    if tag is None and not os.path.isfile(os.path.join(load_dir, "latest")):
        # DeepSpeed's contract for a first job whose --load folder is still empty: its own warning
        # and (None, None), not an error (Megatron-DeepSpeed then starts from iteration 0)
        return ds_load(load_dir, None, load_module_strict=load_module_strict,
                       load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=load_lr_scheduler_states,
                       load_module_only=load_module_only)
    tag = resolve_tag(load_dir, tag)
    ckpt_dir = os.path.join(load_dir, tag)
    layout = saved_layout(ckpt_dir)
    kwargs = dict(load_module_strict=load_module_strict, load_lr_scheduler_states=load_lr_scheduler_states,
                  load_module_only=load_module_only)
    dp_world = dist.get_world_size(group=engine.data_parallel_group)
    stage = engine.zero_optimization_stage()
    same = layout["kind"] == "none" or \
           (layout["kind"] == "zero0" and layout["ep_size"] == _current_ep_size(engine) and stage == 0) or \
           (layout["kind"] == "zero12" and layout["ep_size"] == _current_ep_size(engine)
            and layout["dp_world_size"] == dp_world and stage in (1, 2))
    if same or not load_optimizer_states or load_module_only:
        return ds_load(load_dir, tag, load_optimizer_states=load_optimizer_states and layout["kind"] != "portable",
                       **kwargs)
    tp = engine.mpu.get_model_parallel_world_size() if getattr(engine, "mpu", None) is not None else 1
    if tp > 1:  # the state is rebuilt from TP rank 0's files only: refuse rather than mix shards
        raise ValueError(f"load_checkpoint: {ckpt_dir} was saved with another expert- or data-parallel layout "
                         f"(saved ep_size={layout['ep_size']}, dp={layout['dp_world_size']}), and this model is "
                         f"tensor-parallel (TP={tp}): the optimizer state can be re-sharded at TP=1 only; resume "
                         "with the ep_size and the number of ranks it was saved with")
    out = ds_load(load_dir, tag, load_optimizer_states=False, **kwargs)
    if hasattr(engine.optimizer, "refresh_fp32_params"):  # masters from the loaded weights (ZeRO-0 bf16 skips it)
        engine.optimizer.refresh_fp32_params()
    apply_full_optimizer_state(engine, full_optimizer_state(ckpt_dir, engine))
    return out


def install_ep_aware_checkpoint_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` this module's ``load_checkpoint`` (same signature)."""
    original = engine.load_checkpoint

    def ep_aware_load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                                 load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        if custom_load_fn is not None:
            return original(load_dir, tag, load_module_strict, load_optimizer_states, load_lr_scheduler_states,
                            load_module_only, custom_load_fn)
        return load_checkpoint(engine, load_dir, tag, load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states,
                               load_module_strict=load_module_strict, load_module_only=load_module_only,
                               _ds_load=original)

    engine.load_checkpoint = ep_aware_load_checkpoint


def _reshard_zero0_files(src: str, dst: str, files: List[Tuple[int, str]], new_ep: int) -> None:
    """Rewrite ZeRO-0 optimizer files (one per EP rank) for ``new_ep`` ranks: expert entries are
    concatenated over the saved EP ranks and split again; dense entries copied."""
    per_rank = [_load(path) for _, path in files]
    merged = _merge_zero0_banks(_read_zero0(files))
    for e in range(new_ep):
        ckpt = {**per_rank[0], "optimizer": _zero0_pack(per_rank[0]["optimizer"], merged, e, new_ep)}
        torch.save(ckpt, os.path.join(dst, f"expp_rank_{e}_mp_rank_00_optim_states.pt"))


def _zero0_pack(template: Dict[str, Any], merged: List[Dict[str, Any]], ep_rank: int, ep: int) -> Dict[str, Any]:
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

    moe = _zero0_unpack(template)[1]
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


def reshard_checkpoint(src_dir: str, dst_dir: str, new_ep_size: int, tag: Optional[str] = None) -> str:
    """Write a copy of checkpoint ``src_dir``/``tag`` into ``dst_dir`` for ``new_ep_size``; returns
    the tag. Model and expert files are copied (they are EP-independent); optimizer state: see the
    module docstring. Run on one process (no torch.distributed needed)."""
    from ..config import check_int
    check_int("reshard", "new_ep_size", new_ep_size, 1)
    tag = resolve_tag(src_dir, tag)
    src, dst = os.path.join(src_dir, tag), os.path.join(dst_dir, tag)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("reshard_checkpoint: dst_dir must differ from src_dir")
    if os.path.isfile(os.path.join(src, "mp_rank_01_model_states.pt")):
        raise ValueError(f"reshard: {src} is tensor-parallel (one model file per TP rank); changing the EP size "
                         "of a TP checkpoint is not supported: resume it with the ep_size it was saved with")
    layout = saved_layout(src)
    for n in layout["num_experts"] or []:
        if n % new_ep_size:
            raise ValueError(f"reshard: new_ep_size={new_ep_size} must divide every layer's num_experts ({n})")
    os.makedirs(dst, exist_ok=True)
    optimizer_files = {path for _, path in _files(src, _ZERO0) + _files(src, _ZERO12)}
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if path not in optimizer_files and os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
    if layout["kind"] == "zero0":
        if any(_is_module_expert_key(k) for _, path in _files(src, _EXPERT_FILE) for k in _load(path)):
            raise ValueError("reshard_checkpoint: the ZeRO-0 optimizer state of user expert modules "
                             "(S2MoE(hidden, expert_module, ...)) names no parameters and cannot be converted "
                             "offline; load the checkpoint on the new layout instead (engine.load_checkpoint "
                             "reshards on load)")
        files = _files(src, _ZERO0)
        _reshard_zero0_files(src, dst, files, new_ep_size)
        model = _load(os.path.join(src, MODEL_FILE))
        if model.get("optimizer") is not None:  # DeepSpeed also keeps rank 0's optimizer state here
            model["optimizer"] = _load(os.path.join(dst, "expp_rank_0_mp_rank_00_optim_states.pt"))["optimizer"]
            torch.save(model, os.path.join(dst, MODEL_FILE))
    elif layout["kind"] == "zero12":
        full = _read_zero12(src, _files(src, _ZERO12))
        torch.save({**full, "format": PORTABLE_FORMAT}, os.path.join(dst, PORTABLE_FILE))
    with open(os.path.join(dst_dir, "latest"), "w") as f:
        f.write(tag)
    return tag


def main(argv=None) -> int:
    """``s2moe-ckpt reshard SRC DST --ep-size N [--tag T]``."""
    p = argparse.ArgumentParser(prog="s2moe-ckpt reshard",
                                description="Convert a DeepSpeed checkpoint of an S2MoE model to another "
                                            "expert-parallel size.")
    p.add_argument("src", help="checkpoint directory (the one holding 'latest')")
    p.add_argument("dst", help="output directory")
    p.add_argument("--ep-size", type=int, required=True, help="new expert-parallel size")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = p.parse_args(argv)
    tag = reshard_checkpoint(args.src, args.dst, args.ep_size, tag=args.tag)
    print(f"wrote {os.path.join(args.dst, tag)} for ep_size={args.ep_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
